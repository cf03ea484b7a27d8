"""A policy on a backend: its denoiser swapped for an exported one (export/backends.py), or its sampler for
captured CUDA graphs. The export layer returns denoisers; deciding that a policy uses one is the policy's."""

from __future__ import annotations

from pathlib import Path

from rtdiff.export.backends import check_backend, exported_denoiser
from rtdiff.export.exported import ExportError
from rtdiff.runtime.accel import SCHEDULED
from rtdiff.runtime.checkpoints import find_schedule, schedule_path


def with_backend(policy, checkpoint: str, backend: str, solver: str, steps: int, accel: str,
                 batch_sizes: tuple[int, ...] = (1,), threads: int = 1):
    """The policy running on `backend` (returned; unchanged for torch). An accelerator with a block schedule is
    exported with the schedule of that accelerator, so its segments follow what the schedule computes together."""
    check_backend(backend)
    if backend == "torch":
        return policy
    if backend == "cudagraph":
        from rtdiff.export.cudagraph import use_cudagraph

        return use_cudagraph(policy)
    schedule = None
    if accel in SCHEDULED:
        schedule = find_schedule(checkpoint, solver, steps, accel)
        if schedule is None:
            raise FileNotFoundError(f"no {accel} schedule for {checkpoint} at {solver} {steps} "
                                    f"({schedule_path(checkpoint, solver, steps, accel)}): run `rtdiff calibrate {accel}`")
    blocks = [name for name, _, _ in policy.denoiser.cache_blocks()]
    policy.denoiser = exported_denoiser(checkpoint, backend, schedule, batch_sizes, threads, blocks)
    return policy


def use_onnxruntime(policy, folder: str | Path, checkpoint_sha256: str | None = None, threads: int = 1):
    """The policy with its denoiser replaced by the export in `folder` (returns the policy)."""
    from rtdiff.export.onnxruntime_backend import OrtDenoiser

    denoiser = OrtDenoiser(folder, checkpoint_sha256, threads)
    if denoiser.manifest["blocks"] != [name for name, _, _ in policy.denoiser.cache_blocks()]:
        raise ExportError(f"{folder} was exported from a model with other blocks than this policy's")
    policy.denoiser = denoiser
    return policy
