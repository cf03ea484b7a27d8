"""A policy checkpoint described for export (export/source.py): its denoiser, example inputs, trajectories."""

from __future__ import annotations

from pathlib import Path

import torch

from rtdiff.export.source import ExportSource
from rtdiff.policies.checkpoint import load_policy
from rtdiff.runtime.checkpoints import checkpoint_hash
from rtdiff.runtime.sampling import sample


def policy_export_source(folder: Path, label: str | None = None) -> ExportSource:
    policy = load_policy(folder)
    config = policy.config

    def example_inputs(batch: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(0)
        return {
            "x": torch.randn(batch, config.horizon, config.action_dim, generator=generator),
            "t": torch.full((batch,), float(config.scheduler.num_train_timesteps // 2)),
            "obs": torch.rand(batch, config.n_obs_steps, config.obs_dim, generator=generator) * 2 - 1,
        }

    @torch.no_grad()
    def trajectory_inputs(batch: int, solver_name: str, steps: int):
        """The denoiser's inputs at every step of trajectories from demonstration observations (random ones
        when the task's demonstrations are not at hand)."""
        from rtdiff.policies.accelerate import calibration_observations
        from rtdiff.sims.tasks import TASKS

        solver = policy.make_solver(solver_name, steps)
        task = TASKS.get(config.task)
        if task is not None and task.demos.is_file():
            cond, origin = policy.obs_normalizer.normalize(calibration_observations(task.demos, policy, batch, 0)), \
                "demonstrations"
        else:
            cond, origin = torch.rand(batch, config.n_obs_steps, config.obs_dim) * 2 - 1, "random"
        recorded = {"x": [], "t": []}

        def recording(x, t, **condition):
            recorded["x"].append(x.clone())
            recorded["t"].append(t.to(torch.float32))
            return policy.denoiser(x, t, **condition)

        sample(recording, solver, policy.initial_noise(batch, torch.Generator().manual_seed(0)), {"obs": cond})
        return {"x": torch.stack(recorded["x"]), "t": torch.stack(recorded["t"]), "obs": cond}, origin

    description = {"arch": config.arch, "inputs": {"x": [config.horizon, config.action_dim], "t": [],
                                                    "obs": [config.n_obs_steps, config.obs_dim]}}
    return ExportSource(label or str(folder), policy.denoiser.eval(), checkpoint_hash(folder), example_inputs,
                        description, trajectory_inputs)
