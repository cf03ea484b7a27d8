"""Choosing a policy's backend: torch eager, or its ONNX export on ONNX Runtime, built on first use.

Exports live in a cache folder (`$RTDIFF_CACHE`, default ~/.cache/rtdiff), one
per (weights, schedule, batch sizes). One that is missing, corrupted or made
from other weights is rebuilt, never half-used; a new one is written beside
its final place and moved there whole, so a reader never sees a partial one.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from rtdiff.export.exported import ExportError, load_manifest
from rtdiff.export.onnx_export import export_onnx, sha256
from rtdiff.export.onnxruntime_backend import use_onnxruntime
from rtdiff.policies.accelerate import schedule_path_for
from rtdiff.policies.checkpoint import checkpoint_hash
from rtdiff.runtime.accel.bac import load_schedule

log = logging.getLogger("rtdiff.export")

BACKENDS = ("torch", "onnxruntime", "tensorrt", "cudagraph")  # the last two: where a GPU (and tensorrt) exist


def cache_root() -> Path:
    return Path(os.environ.get("RTDIFF_CACHE", Path.home() / ".cache" / "rtdiff"))


def export_folder(checkpoint: str, schedule: Path | None, batch_sizes: tuple[int, ...]) -> Path:
    schedule_tag = sha256(schedule.read_bytes())[:12] if schedule else "no-schedule"
    batches = "-".join(map(str, batch_sizes))
    return cache_root() / "onnx" / f"{checkpoint_hash(checkpoint)[:16]}-{schedule_tag}-b{batches}"


def ensure_onnx_export(checkpoint: str, schedule: Path | None, batch_sizes: tuple[int, ...]) -> Path:
    """The folder of a usable export for these settings, exporting (again) when there is none."""
    folder = export_folder(checkpoint, schedule, batch_sizes)
    try:
        load_manifest(folder, checkpoint_hash(checkpoint))
        return folder
    except ExportError as error:
        if folder.exists():
            log.warning("rebuilding the export: %s", error)
    staging = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    export_onnx(checkpoint, staging, schedule, batch_sizes)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staging, folder)
    return folder


def with_backend(policy, checkpoint: str, backend: str, solver: str, steps: int, accel: str,
                 batch_sizes: tuple[int, ...] = (1,), threads: int = 1):
    """The policy running on `backend` (its denoiser replaced in place; unchanged for torch)."""
    if backend == "torch":
        return policy
    if backend == "cudagraph":
        from rtdiff.export.cudagraph import use_cudagraph

        return use_cudagraph(policy)
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    schedule = schedule_path_for(checkpoint, solver, steps) if accel in ("bac", "bac+sada") else None
    if schedule is not None:
        load_schedule(schedule)  # a missing or broken schedule is named here, before any export
    folder = ensure_onnx_export(checkpoint, schedule, batch_sizes)
    if backend == "onnxruntime":
        return use_onnxruntime(policy, folder, checkpoint_hash(checkpoint), threads)
    from rtdiff.export.tensorrt_backend import TrtDenoiser

    policy.denoiser = TrtDenoiser(folder, checkpoint_hash(checkpoint))
    return policy
