"""A diffusion policy: a denoiser, its normalisers, and the observation -> action-chunk mapping."""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from rtdiff.policies.config import PolicyConfig
from rtdiff.policies.normalizer import MinMaxNormalizer
from rtdiff.policies.transformer import TransformerDenoiser
from rtdiff.policies.unet import ConditionalUnet1d
from rtdiff.runtime.accel.base import Accelerator
from rtdiff.runtime.sampling import sample, trajectory
from rtdiff.runtime.solvers import Solver, make_solver

DENOISERS = {"unet": ConditionalUnet1d, "transformer": TransformerDenoiser}


class DiffusionPolicy(nn.Module):
    def __init__(self, config: PolicyConfig):
        super().__init__()
        self.config = config
        self.denoiser = DENOISERS[config.arch](config)
        self.obs_normalizer = MinMaxNormalizer(config.obs_dim)
        self.action_normalizer = MinMaxNormalizer(config.action_dim)
        self.sampler = sample  # the whole trajectory; a backend may swap it (export/cudagraph.py replays a graph)

    def make_solver(self, name: str | None = None, steps: int | None = None) -> Solver:
        """The named solver on this policy's noise schedule; without a name or step count, the checkpoint's own."""
        name, steps = self.solver_settings(name, steps)
        return make_solver(name, self.config.scheduler, steps)

    def solver_settings(self, name: str | None = None, steps: int | None = None) -> tuple[str, int]:
        """(solver, steps) with what the user left out taken from the checkpoint."""
        return name or self.config.default_solver, steps or self.config.default_steps

    def check_observations(self, obs: torch.Tensor) -> None:
        expected = (self.config.n_obs_steps, self.config.obs_dim)
        if obs.ndim != 3 or tuple(obs.shape[1:]) != expected:
            raise ValueError(f"observation history must have shape (batch, {expected[0]}, {expected[1]}), "
                             f"got {tuple(obs.shape)}")

    @torch.no_grad()
    def predict_chunk(self, obs: torch.Tensor, solver: Solver, generator: torch.Generator | None = None,
                      accelerator: Accelerator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """The whole predicted action sequence, (B, horizon, action_dim), in environment units.

        The initial noise is drawn from `generator` unless given (a server draws it per request, so a
        request's answer does not depend on what it was batched with)."""
        cond, noise = self._inputs(obs, generator, noise)
        actions = self.sampler(self.denoiser, solver, noise, cond, generator, accelerator)
        return self.action_normalizer.unnormalize(actions).to(obs.device)

    def _inputs(self, obs: torch.Tensor, generator, noise: torch.Tensor | None) -> tuple[dict, torch.Tensor]:
        """The conditioning and the initial noise, on the policy's device (the noise is drawn on the CPU)."""
        self.check_observations(obs)
        device = self.obs_normalizer.min.device
        cond = {"obs": self.obs_normalizer.normalize(obs.to(device, torch.float32))}
        if noise is None:
            noise = self.initial_noise(obs.shape[0], generator)
        return cond, noise.to(device)

    def initial_noise(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn((batch, self.config.horizon, self.config.action_dim), generator=generator, dtype=torch.float32)

    def executed(self, chunk: torch.Tensor) -> torch.Tensor:
        """The part of a chunk that is executed: n_action_steps from the current step on."""
        start = self.config.n_obs_steps - 1
        return chunk[:, start : start + self.config.n_action_steps]

    @torch.no_grad()
    def predict_actions(self, obs: torch.Tensor, solver: Solver, generator: torch.Generator | None = None,
                        accelerator: Accelerator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """The actions to execute, (B, n_action_steps, action_dim): the chunk from the current step on."""
        return self.executed(self.predict_chunk(obs, solver, generator, accelerator, noise))

    @torch.no_grad()
    def action_steps(self, obs: torch.Tensor, solver: Solver, generator: torch.Generator | None = None,
                     accelerator: Accelerator | None = None,
                     noise: torch.Tensor | None = None) -> Iterator[torch.Tensor | None]:
        """`predict_actions` one solver step at a time, so that a server can answer others between steps: yields
        None after every step but the last, then the actions. A backend that replaced the whole sampler (captured
        CUDA graphs) cannot stop midway and yields the actions at once."""
        if self.sampler is not sample:
            yield self.predict_actions(obs, solver, generator, accelerator, noise)
            return
        cond, noise = self._inputs(obs, generator, noise)
        last = len(solver.timesteps) - 1
        for step in trajectory(self.denoiser, solver, noise, cond, generator, accelerator):
            if step.i < last:
                yield None
        yield self.executed(self.action_normalizer.unnormalize(step.x).to(obs.device))

    @torch.no_grad()
    def refine_actions(self, obs: torch.Tensor, solver: Solver, noise: torch.Tensor,
                       accelerator: Accelerator | None = None, generator: torch.Generator | None = None):
        """The executed actions as the trajectory refines them: the clean-sample estimate after each solver
        step, and at the last step the final sample (what `predict_actions` returns)."""
        self.check_observations(obs)
        cond = {"obs": self.obs_normalizer.normalize(obs.to(torch.float32))}
        last = len(solver.timesteps) - 1
        for step in trajectory(self.denoiser, solver, noise, cond, generator, accelerator):
            estimate = step.x if step.i == last else step.x0
            yield step.i, self.executed(self.action_normalizer.unnormalize(estimate))
