"""An accelerator spec for a checkpoint: `bac` and `bac+sada` with the block schedule calibrated for its weights."""

from __future__ import annotations

from rtdiff.runtime.accel import SCHEDULED, AcceleratorSpec
from rtdiff.runtime.accel.bac import load_schedule
from pathlib import Path

from rtdiff.runtime.checkpoints import (bundled, cached_schedule_path, checkpoint_hash, find_schedule, resolve,
                                       schedule_path)


def accelerator_spec(name: str, checkpoint: str, solver_name: str, steps: int, options: dict | None = None,
                     schedule: dict | None = None, calibrate_command: str = "rtdiff calibrate") -> AcceleratorSpec:
    """How to make the named accelerator for a checkpoint, once per request; `bac` and `bac+sada` read their own
    schedule (the cache's, else the one shipped beside the checkpoint) unless given one. `calibrate_command` is
    the modality's command that makes a missing schedule, named in the error."""
    if name in SCHEDULED and schedule is None:
        path = find_schedule(checkpoint, solver_name, steps, name)
        if path is None:
            raise FileNotFoundError(
                f"no {name} schedule for {checkpoint} at {solver_name} {steps} steps: run `{calibrate_command} "
                f"{name} --checkpoint {checkpoint} --solver {solver_name} --steps {steps} --fraction F`")
        schedule = load_schedule(path)
    if schedule is not None and name not in SCHEDULED:
        raise ValueError(f"accelerator {name!r} takes no schedule")
    return AcceleratorSpec(name, dict(options or {}), schedule, solver_name, steps,
                           checkpoint_hash(checkpoint) if schedule is not None else None)


def default_schedule_path(checkpoint: str, solver_name: str, steps: int, method: str = "bac") -> Path:
    """Where `rtdiff calibrate` writes without --out: beside a user's checkpoint, and for a bundled one into the
    cache directory (the source tree is never written); `find_schedule` looks in the cache first."""
    if resolve(checkpoint) in bundled().values():
        return cached_schedule_path(checkpoint, solver_name, steps, method)
    return schedule_path(checkpoint, solver_name, steps, method)
