"""The sampling loop: integrate a denoiser from noise to data with a solver."""

from __future__ import annotations

from typing import Callable

import torch

from runtime.solvers import History, Solver

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def sample(
    denoiser: Denoiser,
    solver: Solver,
    x: torch.Tensor,
    cond: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Run the whole trajectory from `x` (noise at the first timestep) and return the final sample.

    `denoiser(x_t, t, cond)` takes a batch of timesteps (int64, shape (B,)) and
    returns the prediction the solver's config names (epsilon, sample or v).
    """
    history = History()
    for i, t in enumerate(solver.timesteps):
        timestep = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        x0, eps = solver.predict(i, x, denoiser(x, timestep, cond))
        history.append(t, x0, eps)
        x = solver.step(i, x, history, generator)
    return x
