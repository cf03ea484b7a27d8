"""Accelerators for policy checkpoints: BAC calibration on demonstrations, and schedules found beside checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rtdiff.policies.checkpoint import load_policy
from rtdiff.runtime.accel import make_accelerator
from rtdiff.runtime.accel.schedules import accelerator_spec, default_schedule_path
from rtdiff.runtime.accel.bac import (
    FORMAT,
    calibrate,
    calibrate_to_fraction,
    plot_schedule,
    record_block_outputs,
    save_schedule,
    step_sensitivity,
)
from rtdiff.runtime.checkpoints import checkpoint_hash
from rtdiff.runtime.accel.base import Accelerator
from rtdiff.runtime.accel.hooks import feed_forward_blocks
from rtdiff.runtime.accel.composed import skip_lattice


def calibration_observations(demos_path: str | Path, policy, count: int, seed: int) -> torch.Tensor:
    """`count` observation histories drawn from the demonstrations, as the policy sees them in closed loop."""
    from rtdiff.policies.train import windows
    from rtdiff.sims.demos import load_demos

    obs, _ = windows(load_demos(demos_path), policy.config)
    if obs.shape[-1] != policy.config.obs_dim:
        raise ValueError(f"demonstrations have {obs.shape[-1]}-d observations, the policy takes {policy.config.obs_dim}")
    pick = np.random.default_rng(seed).choice(len(obs), size=min(count, len(obs)), replace=False)
    return torch.from_numpy(obs[np.sort(pick)])


def record_calibration(policy, solver_name: str, steps: int, demos_path: str | Path, observations: int = 32,
                       seed: int = 0) -> dict[str, torch.Tensor]:
    """Every cacheable block's output at every step, for `observations` demonstration histories (seeded)."""
    solver = policy.make_solver(solver_name, steps)
    obs = calibration_observations(demos_path, policy, observations, seed)
    generator = torch.Generator().manual_seed(seed)
    return record_block_outputs(lambda recorder: policy.predict_chunk(obs, solver, generator, recorder))


def bac_output_error(policy, solver_name: str, steps: int, demos_path: str | Path, observations: int = 32,
                     seed: int = 0):
    """`error(blocks)`: mean squared error of the action chunk (normalised) that a BAC schedule with these block
    updates yields on the calibration observations, against the full model's from the same noise."""
    solver = policy.make_solver(solver_name, steps)
    obs = calibration_observations(demos_path, policy, observations, seed)

    def chunk(accelerator=None) -> torch.Tensor:
        actions = policy.predict_chunk(obs, solver, torch.Generator().manual_seed(seed), accelerator)
        return policy.action_normalizer.normalize(actions)

    reference = chunk()

    def error(blocks: dict) -> float:
        schedule = {"format": FORMAT, "steps": steps, "solver": solver_name, "blocks": blocks}
        accelerator = make_accelerator("bac", schedule=schedule, solver=solver_name, steps=steps)
        try:
            return float(((chunk(accelerator) - reference) ** 2).mean())
        finally:
            accelerator.unbind()

    return error


def bac_step_sensitivity(policy, solver_name: str, steps: int, demos_path: str | Path, observations: int = 8,
                         seed: int = 0) -> list[float]:
    """Each step's action error when every block reuses the step before's output there (`step_sensitivity`).

    Eight observations: the sensitivities span five orders of magnitude and agree across observation sets;
    a 100-step UNet takes about two minutes on two cores."""
    names = [name for name, _, _ in policy.denoiser.cache_blocks()]
    return step_sensitivity(names, steps, bac_output_error(policy, solver_name, steps, demos_path, observations, seed))


def calibrate_bac(checkpoint: str, solver_name: str | None, steps: int | None, budget: int | None,
                  demos_path: str | Path | None,
                  observations: int = 32, seed: int = 0, bubble: int = 5, out: str | Path | None = None,
                  fraction: float | None = None, sada: dict | None = None, command: str | None = None
                  ) -> tuple[dict, Path]:
    """A BAC schedule: `budget` updates per block and the paper's union of `bubble` blocks, or, with `fraction`,
    at most that fraction of block evaluations with the budget, union size and objective (feature similarity, or
    similarity weighted by each step's measured sensitivity) that leave the least action error.

    With `sada` ({"window": (lo, hi), "max_consecutive": m}) it is a bac+sada schedule: no block refreshes on
    the lattice of steps SADA may skip (`skip_lattice`), which the schedule lists as `skippable`."""
    if (budget is None) == (fraction is None):
        raise ValueError("give a BAC budget (updates per block) or a fraction of block evaluations, not both")
    if fraction is not None and not 0 < fraction <= 1:
        raise ValueError(f"fraction of block evaluations must be in (0, 1], got {fraction}")
    policy = load_policy(checkpoint)
    solver_name, steps = policy.solver_settings(solver_name, steps)
    demos_path = demos_path or task_demos(policy)
    outputs = record_calibration(policy, solver_name, steps, demos_path, observations, seed)
    skippable = skip_lattice(steps, **sada) if sada is not None else set()
    allowed = set(range(steps)) - skippable
    if fraction is None:
        schedule = calibrate(outputs, budget, feed_forward_blocks(policy.denoiser), bubble, allowed)
    else:
        error = bac_output_error(policy, solver_name, steps, demos_path, observations, seed)
        sensitivity = bac_step_sensitivity(policy, solver_name, steps, demos_path, seed=seed)
        schedule = calibrate_to_fraction(outputs, fraction, feed_forward_blocks(policy.denoiser), error, allowed,
                                         sensitivity)
    if sada is not None:
        schedule.update(skippable=sorted(skippable), sada={"window": list(sada["window"]),
                                                            "max_consecutive": sada["max_consecutive"]})
    schedule.update(
        command=command,
        solver=solver_name,
        checkpoint=str(checkpoint),
        checkpoint_sha256=checkpoint_hash(checkpoint),
        calibration={"observations": next(iter(outputs.values())).shape[1], "seed": seed,
                     "bubble_blocks": len(schedule["bubbled"]),
                     "similarity": "cached step vs every step that reuses it (official code's variant)"},
    )
    method = "bac" if sada is None else "bac+sada"
    path = Path(out) if out else default_schedule_path(checkpoint, solver_name, steps, method)
    save_schedule(schedule, path)
    plot_schedule(schedule, path.with_suffix(".png"))
    return schedule, path


def task_demos(policy) -> Path:
    """The demonstrations of the task a policy was trained for: what calibration draws observations from."""
    from rtdiff.sims.tasks import get_task

    return get_task(policy.config.task).demos


def policy_accelerator(name: str, checkpoint: str, solver_name: str, steps: int, schedule: dict | None = None,
                       **options) -> Accelerator:
    """One accelerator (one trajectory's context at a time) for a checkpoint: `accelerator_spec(...)()`."""
    return accelerator_spec(name, checkpoint, solver_name, steps, options, schedule)()
