"""Policy checkpoints: rtdiff's own folders, bundled names, and LeRobot `pretrained_model/` folders.

An rtdiff checkpoint is a folder with `config.json` (PolicyConfig) and
`model.safetensors` (the policy's state dict, normaliser buffers included).
Loading builds a fresh policy and checks every tensor's name and shape before
copying anything, so a wrong checkpoint fails whole, with a message naming the
problem, and never leaves a half-loaded model behind.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from rtdiff.policies.config import PolicyConfig
from rtdiff.policies.modeling import DiffusionPolicy

BUNDLED = Path(__file__).resolve().parent / "checkpoints"
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


def bundled_names() -> list[str]:
    return sorted(p.name for p in BUNDLED.iterdir() if (p / CONFIG_FILE).is_file()) if BUNDLED.is_dir() else []


def resolve(name_or_path: str | Path) -> Path:
    """A bundled checkpoint's name (`pusht-unet`) or a folder path -> the folder."""
    path = Path(name_or_path)
    if path.name == str(name_or_path) and (BUNDLED / path.name / CONFIG_FILE).is_file():
        return BUNDLED / path.name
    if path.is_dir() and (path / "pretrained_model").is_dir():
        path = path / "pretrained_model"  # a LeRobot training output folder
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {str(name_or_path)!r} is neither a bundled name {bundled_names()} "
                                f"nor a folder")
    for required in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / required).is_file():
            raise FileNotFoundError(f"checkpoint {path} has no {required}")
    return path


def save_policy(policy: DiffusionPolicy, folder: str | Path, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    policy.config.save(folder / CONFIG_FILE)
    tensors = {name: value.detach().contiguous().cpu() for name, value in policy.state_dict().items()}
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={k: str(v) for k, v in (metadata or {}).items()})
    return folder


def load_policy(name_or_path: str | Path) -> DiffusionPolicy:
    folder = resolve(name_or_path)
    payload = _read_json(folder / CONFIG_FILE)
    if payload.get("type") == "diffusion":
        from rtdiff.policies.lerobot import load_lerobot_policy

        return load_lerobot_policy(folder, payload)
    policy = DiffusionPolicy(PolicyConfig.from_dict(payload))
    load_state_dict_checked(policy, read_safetensors(folder / WEIGHTS_FILE), source=str(folder))
    return policy.eval()


def checkpoint_hash(name_or_path: str | Path) -> str:
    """sha256 of the weights file: what a cache schedule or an engine is tied to."""
    digest = hashlib.sha256((resolve(name_or_path) / WEIGHTS_FILE).read_bytes())
    return digest.hexdigest()


def read_metadata(name_or_path: str | Path) -> dict[str, str]:
    """The string metadata a checkpoint was saved with (training command, demonstrations, report)."""
    from safetensors import safe_open

    with safe_open(str(resolve(name_or_path) / WEIGHTS_FILE), "pt") as weights:
        return weights.metadata() or {}


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from None


def load_state_dict_checked(module: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint {source} does not match its config: missing {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{' ...' if len(unexpected) > 5 else ''}")
    for name, value in expected.items():
        if tensors[name].shape != value.shape:
            raise ValueError(f"checkpoint {source}: {name} has shape {tuple(tensors[name].shape)}, "
                             f"config expects {tuple(value.shape)}")
        if not torch.isfinite(tensors[name]).all():
            raise ValueError(f"checkpoint {source}: {name} contains NaN or infinite values")
    module.load_state_dict(tensors, strict=True)


def _read_json(path: Path) -> dict:
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(payload, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return payload
