"""The sampling loop: integrate a denoiser from noise to data with a solver, optionally accelerated."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Mapping

import torch

from rtdiff.runtime.solvers import History, Solver

if TYPE_CHECKING:
    from rtdiff.runtime.accel.base import Accelerator

# denoiser(x_t, t, **cond): the conditioning is a mapping of named tensors, passed as keyword arguments
Denoiser = Callable[..., torch.Tensor]
Conditioning = Mapping[str, torch.Tensor]


@torch.no_grad()
def sample(
    denoiser: Denoiser,
    solver: Solver,
    x: torch.Tensor,
    cond: Conditioning | None,
    generator: torch.Generator | None = None,
    accelerator: Accelerator | None = None,
) -> torch.Tensor:
    """Run the whole trajectory from `x` (noise at the first timestep) and return the final sample.

    `denoiser(x_t, t, **cond)` takes a batch of timesteps (shape (B,), the
    solver's `timestep_dtype`) and the conditioning's named tensors (a policy's
    `obs`; a text embedding; a reference image and audio features), and returns
    the prediction the solver names (epsilon, sample, v or flow).
    An accelerator (one per trajectory: it holds this trajectory's caches) may
    skip whole steps (its estimate replaces the model's) or let cached blocks
    stand in within a call.
    """
    for step in trajectory(denoiser, solver, x, cond, generator, accelerator):
        x = step.x
    return x


@dataclass
class Step:
    i: int  # the solver step just taken
    x: torch.Tensor  # the sample after it
    x0: torch.Tensor  # the clean-sample estimate it was taken with
    model_called: bool


@torch.no_grad()
def trajectory(
    denoiser: Denoiser,
    solver: Solver,
    x: torch.Tensor,
    cond: Conditioning | None,
    generator: torch.Generator | None = None,
    accelerator: Accelerator | None = None,
    constrain: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[Step]:
    """`sample`, one solver step at a time: for progress streams and anytime answers.

    `constrain(i, x)`, if given, takes the sample after step i and returns the one the trajectory goes on from:
    how a sliding window holds its overlap to the window before (runtime/windows.py). The solver's history keeps
    the model's own estimates."""
    from rtdiff.runtime.accel.base import SKIP, Accelerator

    # every trajectory has an accelerator (`none` by default): it is also what says, at each call, that no
    # other request's block cache is active on this model
    accelerator = accelerator if accelerator is not None else Accelerator()
    accelerator.bind(denoiser)
    cond = dict(cond or {})
    history = History()
    accelerator.begin(solver)
    for i, t in enumerate(solver.timesteps):
        called = accelerator.plan_step(i, x, history) != SKIP
        if called:
            accelerator.before_model_call(i)
            timestep = torch.full((x.shape[0],), t, dtype=solver.timestep_dtype, device=x.device)
            with accelerator.calling_model():
                output = denoiser(x, timestep, **cond)
            x0, eps = solver.predict(i, x, output)
        else:
            x0, eps = accelerator.estimate(i, x, history)
        history.append(t, x, x0, eps, model_called=called)
        x = solver.step(i, x, history, generator)
        if constrain is not None:
            x = constrain(i, x)
        accelerator.after_step()
        yield Step(i, x, x0, called)
