"""BAC and SADA together: SADA may skip only the steps on which BAC's schedule refreshes no block.

A first composition let SADA skip any step and moved the refreshes scheduled
there to the next kept call. It was fast and wrong (transformer, DDIM 10: 3.5x,
action MSE 2e-2 against 3e-4 for BAC and 2e-4 for SADA alone): a skip
extrapolates the noise estimate of the last call, and with the refreshes
displaced that call itself ran on caches older than the schedule allows, so
the two errors compounded.

Here the two never touch the same step. Steps where some block refreshes are
always model calls, so every cache is exactly as old as calibration assumed;
on the steps in between (where a call would only run the glue around cached
blocks) SADA's stability criterion decides whether to call at all. A schedule
calibrated for this (`calibrate_to_fraction(..., allowed=...)`,
`rtdiff calibrate bac+sada`) keeps its refreshes off a lattice of steps
SADA may skip and lists them as `skippable`; with a plain BAC schedule SADA
may skip whichever steps happen to refresh nothing. When SADA makes a kept
step PARTIAL, the token-wise blocks BAC computes at that step run on SADA's
unstable tokens only.
"""

from __future__ import annotations

import math

import torch

from rtdiff.runtime.accel.bac import BACache
from rtdiff.runtime.accel.base import Accelerator
from rtdiff.runtime.accel.sada import StabilitySkip
from rtdiff.runtime.solvers import History, Solver


def skip_lattice(steps: int, window: tuple[float, float] = (0.1, 0.97), max_consecutive: int = 2) -> set[int]:
    """The steps a bac+sada schedule leaves to SADA: inside SADA's window, from step 3 (its criterion needs three
    past steps), all but every (max_consecutive + 1)-th, which stays a call where BAC may refresh."""
    first, end = max(3, math.ceil(window[0] * steps)), math.ceil(window[1] * steps)
    return {i for i in range(first, end) if (i - first) % (max_consecutive + 1) != max_consecutive}


class BACWithSADA(Accelerator):
    name = "bac+sada"
    uses_block_cache = True
    Options = StabilitySkip.Options  # SADA's; the block schedule comes from `rtdiff calibrate bac+sada`

    def __init__(self, schedule: dict, solver: str, steps: int, checkpoint_hash: str | None = None, **sada_options):
        super().__init__()
        self.bac = BACache(schedule, solver, steps, checkpoint_hash)
        refreshing = set().union(*self.bac.updates.values())
        skippable = set(schedule.get("skippable", range(steps))) - refreshing
        # SADA's window and run length default to those the schedule's lattice was built for
        self.skipper = StabilitySkip(**{**schedule.get("sada", {}), **sada_options}, skippable=skippable)

    def bind(self, denoiser):
        if self.cache is None:  # one cache, BAC's, that SADA's partial calls also read
            self.bac.bind(denoiser)
            self.hooks = self.skipper.hooks = self.bac.hooks
            self.cache = self.skipper.cache = self.bac.cache
            self.skipper.bind(denoiser)  # reads the model's token layout; the shared cache stays its cache
        return self

    def unbind(self) -> None:
        self.bac.unbind()
        self.hooks = self.skipper.hooks = self.cache = self.skipper.cache = None

    def begin(self, solver: Solver) -> None:
        super().begin(solver)
        self.skipper.begin(solver)

    def plan_step(self, i: int, x: torch.Tensor, history: History) -> str:
        plan = self.skipper.plan_step(i, x, history)
        self.tokens, self.token_grid = self.skipper.tokens, self.skipper.token_grid
        return plan

    def should_compute(self, block: str, i: int) -> bool:
        return self.bac.should_compute(block, i)

    def estimate(self, i, x, history):
        return self.skipper.estimate(i, x, history)

    def stats(self) -> dict:
        per_trajectory = max(self.trajectories, 1)
        return {**super().stats(), "skipped_steps": self.skipper.skipped / per_trajectory,
                "partial_steps": self.skipper.partial / per_trajectory}
