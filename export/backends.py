"""Backends for any exported denoiser: torch eager, or its ONNX export on ONNX Runtime or TensorRT, built on
first use.

Exports live in a cache folder (`$RTDIFF_CACHE`, default ~/.cache/rtdiff), one
per (weights, schedule, batch sizes). One that is missing, corrupted or made
from other weights is rebuilt, never half-used; a new one is written beside
its final place and moved there whole, so a reader never sees a partial one.
A backend returns a new denoiser module; the caller decides where it goes.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from rtdiff.export.exported import ExportError, load_manifest
from rtdiff.export.onnx_export import export_onnx, sha256
from rtdiff.export.source import export_source
from rtdiff.runtime.accel.bac import load_schedule
from rtdiff.runtime.checkpoints import cache_root, checkpoint_hash

log = logging.getLogger("rtdiff.export")

BACKENDS = ("torch", "onnxruntime", "tensorrt", "cudagraph")  # the last two: where a GPU (and tensorrt) exist
EXPORTED = ("onnxruntime", "tensorrt")


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
    export_onnx(export_source(checkpoint), staging, schedule, batch_sizes)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staging, folder)
    return folder


def exported_denoiser(checkpoint: str, backend: str, schedule: Path | None = None, batch_sizes: tuple[int, ...] = (1,),
                      threads: int = 1, blocks: list[str] | None = None):
    """The checkpoint's denoiser as an export running on `backend` (onnxruntime or tensorrt), exported on first
    use with `schedule`'s segments; `blocks`: the torch model's block names, which the export must have."""
    if backend not in EXPORTED:
        raise ValueError(f"backend {backend!r} is not an exported backend; expected one of {', '.join(EXPORTED)}")
    if schedule is not None:
        load_schedule(schedule)  # a missing or broken schedule is named here, before any export
    folder = ensure_onnx_export(checkpoint, schedule, batch_sizes)
    if backend == "onnxruntime":
        from rtdiff.export.onnxruntime_backend import OrtDenoiser

        denoiser = OrtDenoiser(folder, checkpoint_hash(checkpoint), threads)
    else:
        from rtdiff.export.tensorrt_backend import TrtDenoiser

        denoiser = TrtDenoiser(folder, checkpoint_hash(checkpoint))
    if blocks is not None and denoiser.manifest["blocks"] != list(blocks):
        raise ExportError(f"{folder} was exported from a model with other blocks than this one's")
    return denoiser


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}; expected one of {', '.join(BACKENDS)}")
