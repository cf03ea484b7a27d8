"""A diffusion policy: a denoiser, its normalisers, and the observation -> action-chunk mapping."""

from __future__ import annotations

import torch
from torch import nn

from policies.config import PolicyConfig
from policies.normalizer import MinMaxNormalizer
from policies.transformer import TransformerDenoiser
from policies.unet import ConditionalUnet1d
from runtime.accel.base import Accelerator
from runtime.sampling import sample
from runtime.solvers import Solver, make_solver

DENOISERS = {"unet": ConditionalUnet1d, "transformer": TransformerDenoiser}


class DiffusionPolicy(nn.Module):
    def __init__(self, config: PolicyConfig):
        super().__init__()
        self.config = config
        self.denoiser = DENOISERS[config.arch](config)
        self.obs_normalizer = MinMaxNormalizer(config.obs_dim)
        self.action_normalizer = MinMaxNormalizer(config.action_dim)

    def make_solver(self, name: str, steps: int) -> Solver:
        return make_solver(name, self.config.scheduler, steps)

    def check_observations(self, obs: torch.Tensor) -> None:
        expected = (self.config.n_obs_steps, self.config.obs_dim)
        if obs.ndim != 3 or tuple(obs.shape[1:]) != expected:
            raise ValueError(f"observation history must have shape (batch, {expected[0]}, {expected[1]}), "
                             f"got {tuple(obs.shape)}")

    @torch.no_grad()
    def predict_chunk(self, obs: torch.Tensor, solver: Solver, generator: torch.Generator | None = None,
                      accelerator: Accelerator | None = None) -> torch.Tensor:
        """The whole predicted action sequence, (B, horizon, action_dim), in environment units."""
        self.check_observations(obs)
        cond = self.obs_normalizer.normalize(obs.to(torch.float32))
        noise = torch.randn(
            (obs.shape[0], self.config.horizon, self.config.action_dim), generator=generator, dtype=torch.float32
        )
        if accelerator is not None:
            accelerator.bind(self.denoiser)
        actions = sample(self.denoiser, solver, noise, cond, generator, accelerator)
        return self.action_normalizer.unnormalize(actions)

    @torch.no_grad()
    def predict_actions(self, obs: torch.Tensor, solver: Solver, generator: torch.Generator | None = None,
                        accelerator: Accelerator | None = None) -> torch.Tensor:
        """The actions to execute, (B, n_action_steps, action_dim): the chunk from the current step on."""
        start = self.config.n_obs_steps - 1
        chunk = self.predict_chunk(obs, solver, generator, accelerator)
        return chunk[:, start : start + self.config.n_action_steps]
