"""ONNX Runtime backend: a drop-in denoiser that runs an export's pieces, one session per graph.

`OrtDenoiser` replaces a policy's torch denoiser (`use_onnxruntime(policy,
folder)`); solvers and accelerators do not change. An accelerator that caches
blocks gets this backend's own block cache instead of forward hooks (there are
no torch blocks to hook): before each model call it names the blocks to
compute, and each piece runs in its `full` form when all of its blocks are
named, in its `cached` form when none are. A schedule that splits an exported
segment is refused: export with that schedule.

Everything in the folder is checked against the manifest's hashes before any
session is made, so a corrupted or swapped graph is never half-used.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from export.onnx_export import FORMAT, FORMS, MANIFEST, sha256
from export.segments import MODEL_OUTPUT
from runtime.accel.hooks import BlockCache


class ExportError(ValueError):
    """An export folder that cannot be used as it is (missing, corrupted, or made for something else)."""


def load_manifest(folder: str | Path, checkpoint_sha256: str | None = None) -> dict:
    """The manifest, after checking its format, the checkpoint it was made from, and every graph's hash."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise ExportError(f"{folder} holds no {MANIFEST}: not an export, or an interrupted one") from None
    except json.JSONDecodeError as error:
        raise ExportError(f"{folder / MANIFEST} is not valid JSON: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExportError(f"{folder / MANIFEST} is not an rtdiff export manifest ({FORMAT!r} expected)")
    if checkpoint_sha256 is not None and manifest["checkpoint_sha256"] != checkpoint_sha256:
        raise ExportError(f"{folder} was exported from other weights than the checkpoint given")
    for k, piece in enumerate(manifest["pieces"]):
        for form in FORMS:
            for batch, entry in piece[form]["files"].items():
                path = folder / entry["file"]
                if not path.is_file():
                    raise ExportError(f"{path} is missing (piece {k}, {form}, batch {batch})")
                if sha256(path.read_bytes()) != entry["sha256"]:
                    raise ExportError(f"{path} does not match its hash in the manifest: corrupted or replaced")
    return manifest


def session_options(threads: int = 1):
    import onnxruntime as ort

    options = ort.SessionOptions()
    # Small graphs at batch 1: one thread per session beats a pool that wakes for microseconds of work.
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class _OwnCache:
    """What an accelerator binds to instead of CacheHooks: the backend's own block cache."""

    def __init__(self, cache: BlockCache):
        self.cache = cache

    def detach(self) -> None:
        self.cache.compute = set(self.cache.names)
        self.cache.tokens = None


class OrtDenoiser(nn.Module):
    def __init__(self, folder: str | Path, checkpoint_sha256: str | None = None, threads: int = 1):
        super().__init__()
        import onnxruntime as ort

        self.folder = Path(folder)
        self.manifest = load_manifest(self.folder, checkpoint_sha256)
        self.pieces = self.manifest["pieces"]
        options, chosen = session_options(threads), providers()
        self.sessions = {
            (int(batch), k, form): ort.InferenceSession(str(self.folder / entry["file"]), options, providers=chosen)
            for k, piece in enumerate(self.pieces) for form in FORMS
            for batch, entry in piece[form]["files"].items()
        }
        self.cache = BlockCache(list(self.manifest["blocks"]))
        self.cache.compute = set(self.cache.names)

    def block_cache_hooks(self) -> _OwnCache:
        """For an accelerator binding: an empty cache and fresh counts, as a newly hooked torch model has."""
        self.cache.reset()
        return _OwnCache(self.cache)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        cache = self.cache
        if cache.tokens is not None:
            raise NotImplementedError("token-wise compute (SADA's partial steps) runs on the torch backend only")
        given = x.shape[0]
        batch = self._exported_batch(given)
        values = {name: _padded(_array(value), batch)
                  for name, value in (("x", x), ("t", t.to(torch.float32)), ("cond", cond))}
        for k, piece in enumerate(self.pieces):
            computed = [name in cache.compute for name in piece["blocks"]]
            cache.requested += len(computed)
            if all(computed):
                self._run(batch, k, "full", values)
                cache.outputs.update({name: values[value] for name, value in zip(piece["blocks"], piece["block_values"])})
                cache.evaluated += len(computed)
            elif not any(computed):
                values.update({value: cache.outputs[name] for name, value in zip(piece["blocks"], piece["block_values"])})
                if piece["cached"]["outputs"]:
                    self._run(batch, k, "cached", values)
            else:
                raise ValueError(f"blocks {piece['blocks']} form one exported segment but are asked to run at "
                                 "different steps; export with the schedule in use")
        return torch.from_numpy(values[MODEL_OUTPUT][:given])

    def _exported_batch(self, batch: int) -> int:
        """Graphs have static shapes: a batch runs at the smallest exported size that holds it."""
        fits = [size for size in self.manifest["batch_sizes"] if size >= batch]
        if not fits:
            raise ValueError(f"batch {batch} is larger than any exported batch size {self.manifest['batch_sizes']}")
        return min(fits)

    def _run(self, batch: int, k: int, form: str, values: dict[str, np.ndarray]) -> None:
        part = self.pieces[k][form]
        outputs = self.sessions[batch, k, form].run(part["outputs"], {name: values[name] for name in part["inputs"]})
        values.update(zip(part["outputs"], outputs))


def _array(tensor: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(tensor.detach().cpu().numpy(), dtype=np.float32)


def _padded(array: np.ndarray, batch: int) -> np.ndarray:
    """Rows repeated from the last up to `batch`; rows are independent, so the extra ones are dropped after."""
    if len(array) == batch:
        return array
    return np.concatenate([array, np.repeat(array[-1:], batch - len(array), axis=0)])


def use_onnxruntime(policy, folder: str | Path, checkpoint_sha256: str | None = None, threads: int = 1):
    """The policy with its denoiser replaced by the export in `folder` (in place; returns the policy)."""
    denoiser = OrtDenoiser(folder, checkpoint_sha256, threads)
    if denoiser.manifest["blocks"] != [name for name, _ in policy.denoiser.cache_blocks()]:
        raise ExportError(f"{folder} was exported from a model with other blocks than this policy's")
    policy.denoiser = denoiser
    return policy
