"""Policy checkpoints: rtdiff's own folders and LeRobot `pretrained_model/` folders, as registered formats.

An rtdiff policy checkpoint is a folder with `config.json` (PolicyConfig) and
`model.safetensors` (the policy's state dict, normaliser buffers included).
Resolving names, hashing and checked loading are the core's
(runtime/checkpoints.py); this module says how a policy folder is recognised,
built and saved.
"""

from __future__ import annotations

from pathlib import Path

from rtdiff.policies.config import FORMAT, PolicyConfig
from rtdiff.policies.modeling import DiffusionPolicy
from rtdiff.runtime.checkpoints import (
    WEIGHTS_FILE,
    CheckpointFormat,
    load_checkpoint,
    load_state_dict_checked,
    read_json,
    read_safetensors,
)

BUNDLED = Path(__file__).resolve().parent / "checkpoints"
CONFIG_FILE = "config.json"


def _config(folder: Path) -> dict | None:
    path = folder / CONFIG_FILE
    return read_json(path) if path.is_file() else None  # a config that is not JSON is named, not skipped


def is_rtdiff_policy(folder: Path) -> bool:
    config = _config(folder)
    return config is not None and config.get("format") == FORMAT


def is_lerobot_policy(folder: Path) -> bool:
    config = _config(folder)
    return config is not None and config.get("type") == "diffusion"


def locate_lerobot(path: Path) -> Path | None:
    """A LeRobot training output folder keeps the checkpoint in `pretrained_model/`."""
    inner = path / "pretrained_model"
    return inner if inner.is_dir() and is_lerobot_policy(inner) else None


def load_rtdiff_policy(folder: Path) -> DiffusionPolicy:
    policy = DiffusionPolicy(PolicyConfig.from_dict(read_json(folder / CONFIG_FILE)))
    load_state_dict_checked(policy, read_safetensors(folder / WEIGHTS_FILE), source=str(folder))
    return policy.eval()


def _load_lerobot(folder: Path) -> DiffusionPolicy:
    from rtdiff.policies.lerobot import load_lerobot_policy

    return load_lerobot_policy(folder, read_json(folder / CONFIG_FILE))


def _service(folder: Path, run):
    from rtdiff.policies.service import PolicyService

    return PolicyService(run)


def _export_source(folder: Path, label: str):
    from rtdiff.policies.export_source import policy_export_source

    return policy_export_source(folder, label)


RTDIFF_POLICY = CheckpointFormat("rtdiff-policy", "policy", is_rtdiff_policy, load_rtdiff_policy,
                                 service=_service, export_source=_export_source)
LEROBOT_POLICY = CheckpointFormat("lerobot-diffusion", "policy", is_lerobot_policy, _load_lerobot,
                                  locate=locate_lerobot, service=_service, export_source=_export_source)


def load_policy(name_or_path: str | Path) -> DiffusionPolicy:
    """A policy from any registered policy format; another modality's checkpoint is refused by name."""
    model = load_checkpoint(name_or_path)
    if not isinstance(model, DiffusionPolicy):
        raise ValueError(f"checkpoint {name_or_path} is not a diffusion policy ({type(model).__name__})")
    return model


def save_policy(policy: DiffusionPolicy, folder: str | Path, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    policy.config.save(folder / CONFIG_FILE)
    tensors = {name: value.detach().contiguous().cpu() for name, value in policy.state_dict().items()}
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={k: str(v) for k, v in (metadata or {}).items()})
    return folder
