"""An exported denoiser: a drop-in for a policy's torch denoiser that runs an export's pieces on some backend.

Solvers and accelerators do not change. An accelerator that caches blocks
binds to the backend itself instead of forward hooks (there are no torch
blocks to hook): its own block cache is the active one for each model call
it makes, and names the blocks to compute; each piece runs in its `full`
form when all of its blocks are named, in its `cached` form when none are.
With no cache active every piece runs in full. A schedule that splits an exported segment is
refused: export with that schedule.

Everything in the folder is checked against the manifest's hashes before a
backend loads anything, so a corrupted or swapped graph is never half-used.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from rtdiff.export.onnx_export import FORMAT, FORMS, MANIFEST, sha256
from rtdiff.export.segments import MODEL_OUTPUT
from rtdiff.runtime.accel.hooks import BlockCache


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
    calibration = manifest.get("calibration")
    if calibration is not None:
        path = folder / calibration["file"]
        if not path.is_file() or sha256(path.read_bytes()) != calibration["sha256"]:
            raise ExportError(f"{path} is missing or does not match its hash in the manifest")
    return manifest


class ExportedDenoiser(nn.Module):
    """The piece-by-piece forward shared by backends; a backend says how values move and how a graph runs."""

    def __init__(self, folder: str | Path, checkpoint_sha256: str | None = None):
        super().__init__()
        self.folder = Path(folder)
        self.manifest = load_manifest(self.folder, checkpoint_sha256)
        self.pieces = self.manifest["pieces"]
        self.names = list(self.manifest["blocks"])
        self.token_inputs: dict = {}  # token-wise compute runs on the torch backend only
        self.cache: BlockCache | None = None  # the calling request's cache, for the duration of its call

    def graphs(self):
        """(batch, piece index, form, path) of every graph in the export."""
        for k, piece in enumerate(self.pieces):
            for form in FORMS:
                for batch, entry in piece[form]["files"].items():
                    yield int(batch), k, form, self.folder / entry["file"]

    def block_cache_hooks(self) -> ExportedDenoiser:
        """What an accelerator binds to: the backend plays the part of the torch model's hooks."""
        return self

    def new_cache(self) -> BlockCache:
        return BlockCache(list(self.names))

    def forward(self, x: torch.Tensor, t: torch.Tensor, *conditions: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        """As the torch model's forward: (x, t, then its conditioning tensors, by position or by name)."""
        cond = {**dict(zip(self.manifest["conditions"], conditions)), **cond}
        cache = self.cache
        if cache is None:  # no accelerator's cache: every block computes
            cache = BlockCache(self.names, compute=set(self.names))
        if cache.tokens is not None:
            raise NotImplementedError("token-wise compute (SADA's partial steps) runs on the torch backend only")
        if cache.reuse != "last":
            raise NotImplementedError(f"reuse={cache.reuse!r} (forecast cached blocks) runs on the torch backend only")
        given = x.shape[0]
        batch = self._exported_batch(given)
        values = {name: self.to_backend(value.to(torch.float32), batch)
                  for name, value in {"x": x, "t": t, **cond}.items()}
        for k, piece in enumerate(self.pieces):
            computed = [name in cache.compute for name in piece["blocks"]]
            cache.requested += len(computed)
            if all(computed):
                self.run(batch, k, "full", values)
                cache.outputs.update({name: values[value] for name, value in zip(piece["blocks"], piece["block_values"])})
                cache.evaluated += len(computed)
            elif not any(computed):
                values.update({value: cache.outputs[name] for name, value in zip(piece["blocks"], piece["block_values"])})
                if piece["cached"]["outputs"]:
                    self.run(batch, k, "cached", values)
            else:
                raise ValueError(f"blocks {piece['blocks']} form one exported segment but are asked to run at "
                                 "different steps; export with the schedule in use")
        return self.to_torch(values[MODEL_OUTPUT])[:given]

    def _exported_batch(self, batch: int) -> int:
        """Graphs have static shapes: a batch runs at the smallest exported size that holds it."""
        fits = [size for size in self.manifest["batch_sizes"] if size >= batch]
        if not fits:
            raise ValueError(f"batch {batch} is larger than any exported batch size {self.manifest['batch_sizes']}")
        return min(fits)

    # -- what a backend provides ----------------------------------------------------------------------------

    def to_backend(self, tensor: torch.Tensor, batch: int):
        """A float32 model input as the backend holds values, padded to `batch` rows (rows are independent:
        the extra ones repeat the last and are dropped after)."""
        raise NotImplementedError

    def to_torch(self, value) -> torch.Tensor:
        raise NotImplementedError

    def run(self, batch: int, k: int, form: str, values: dict) -> None:
        """Run piece k's graph in `form` at `batch`: read its inputs from `values`, write its outputs there
        (values that stay valid after the next run: the cache keeps them)."""
        raise NotImplementedError
