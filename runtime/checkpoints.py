"""Checkpoints of any modality: one registry keyed by the checkpoint's format, and checked loading.

A modality registers its formats (runtime/registry.py): an rtdiff policy
folder, a LeRobot `pretrained_model/` folder, later a diffusers folder. The
core resolves a name or a path to a folder, asks each registered format
whether the folder is one of its own, and hands it to that format's loader.
Everything a schedule or an export is tied to (the weights' hash, where a
schedule lives) is computed here, once, the same way for every modality.

Loading checks every tensor's name, shape and finiteness before copying
anything (`load_state_dict_checked`), so a wrong checkpoint fails whole with a
message naming the problem and never leaves a half-loaded model behind.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class CheckpointFormat:
    """How one kind of checkpoint folder is recognised and loaded.

    `detect(folder)` says whether a folder is of this format; `load(folder)` builds the model; `locate(path)`
    (optional) maps a path the user gave to the folder that holds the checkpoint (LeRobot's training output
    keeps it in `pretrained_model/`); `weights(folder)` lists the files the hash covers; `service(folder, run)`
    serves it (runtime/service.py) and `export_source(folder)` describes it for export (export/source.py)."""

    name: str
    modality: str
    detect: Callable[[Path], bool]
    load: Callable[[Path], torch.nn.Module]
    weights: Callable[[Path], list[Path]] = lambda folder: [folder / WEIGHTS_FILE]
    locate: Callable[[Path], Path | None] | None = None
    service: Callable | None = None
    export_source: Callable | None = None


def formats() -> list[CheckpointFormat]:
    from rtdiff.runtime.registry import modalities

    return [fmt for modality in modalities() for fmt in modality.checkpoint_formats]


def bundled() -> dict[str, Path]:
    """{name: folder} of every checkpoint the installed modalities ship."""
    from rtdiff.runtime.registry import modalities

    found = {}
    for modality in modalities():
        if modality.bundled is not None and modality.bundled.is_dir():
            found.update({p.name: p for p in sorted(modality.bundled.iterdir()) if p.is_dir()})
    return found


def resolve(name_or_path: str | Path) -> Path:
    """A bundled checkpoint's name (`pusht-unet`) or a folder path -> the checkpoint's folder."""
    path = Path(name_or_path)
    shipped = bundled()
    if path.name == str(name_or_path) and path.name in shipped:
        return shipped[path.name]
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {str(name_or_path)!r} is neither a bundled name {sorted(shipped)} "
                                f"nor a folder")
    for fmt in formats():
        located = fmt.locate(path) if fmt.locate is not None else None
        if located is not None:
            return located
    return path


def checkpoint_format(name_or_path: str | Path) -> tuple[CheckpointFormat, Path]:
    """The registered format of a checkpoint and its folder; a folder no format claims is refused by name."""
    folder = resolve(name_or_path)
    claimed = [fmt for fmt in formats() if fmt.detect(folder)]
    if not claimed:
        files = sorted(p.name for p in folder.iterdir())[:8]
        raise ValueError(f"checkpoint {folder} is in no format rtdiff knows ({', '.join(f.name for f in formats())}); "
                         f"it holds {files}")
    return claimed[0], folder


def load_checkpoint(name_or_path: str | Path) -> torch.nn.Module:
    fmt, folder = checkpoint_format(name_or_path)
    for weights in fmt.weights(folder):
        if not weights.is_file():
            raise FileNotFoundError(f"checkpoint {folder} has no {weights.name}")
    return fmt.load(folder)


def checkpoint_hash(name_or_path: str | Path) -> str:
    """sha256 over the weights files: what a cache schedule or an engine is tied to."""
    fmt, folder = checkpoint_format(name_or_path)
    files = tuple((str(path), path.stat().st_size, path.stat().st_mtime_ns) for path in fmt.weights(folder))
    return _hash_files(files)


@functools.lru_cache(maxsize=64)
def _hash_files(files: tuple[tuple[str, int, int], ...]) -> str:
    """Keyed by each file's path, size and modification time: one run asks for the hash of its checkpoint in
    several places (schedule lookup, accelerator, export cache), and the weights are read once; a file that
    changed is hashed again."""
    digest = hashlib.sha256()
    for path, _, _ in files:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


def schedule_filename(solver: str, steps: int, method: str = "bac") -> str:
    """`bac-ddim-10.json`; a schedule for bac+sada, whose refreshes avoid SADA's steps, is `bac+sada-ddim-10.json`."""
    return f"{method}-{solver}-{steps}.json"


def schedule_path(name_or_path: str | Path, solver: str, steps: int, method: str = "bac") -> Path:
    """Where `rtdiff calibrate METHOD` puts a checkpoint's schedule by default, and where `--accel METHOD` looks
    beside the checkpoint (`find_schedule` looks in the cache directory first)."""
    return resolve(name_or_path) / schedule_filename(solver, steps, method)


def cache_root() -> Path:
    """`$RTDIFF_CACHE`, default ~/.cache/rtdiff: exports, engines and schedules calibrated on first use."""
    import os

    return Path(os.environ.get("RTDIFF_CACHE", Path.home() / ".cache" / "rtdiff"))


def cached_schedule_path(name_or_path: str | Path, solver: str, steps: int, method: str = "bac") -> Path:
    """A schedule calibrated on first use lives in the cache, keyed by the weights: never in the source tree."""
    return cache_root() / "schedules" / checkpoint_hash(name_or_path)[:16] / schedule_filename(solver, steps, method)


def find_schedule(name_or_path: str | Path, solver: str, steps: int, method: str = "bac") -> Path | None:
    """The schedule for this checkpoint, solver, step count and accelerator: the cache's (a user's own
    calibration), else the one beside the checkpoint (shipped with it)."""
    for path in (cached_schedule_path(name_or_path, solver, steps, method),
                 schedule_path(name_or_path, solver, steps, method)):
        if path.is_file():
            return path
    return None


def read_metadata(name_or_path: str | Path) -> dict[str, str]:
    """The string metadata a checkpoint's weights were saved with (training command, demonstrations, report)."""
    from safetensors import safe_open

    fmt, folder = checkpoint_format(name_or_path)
    with safe_open(str(fmt.weights(folder)[0]), "pt") as weights:
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


def read_json(path: Path) -> dict:
    try:
        payload = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(payload, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return payload
