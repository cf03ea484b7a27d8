"""BAC inside the steps SADA keeps: SADA plans each step, BAC decides the blocks within a kept step.

A block whose scheduled update fell on a skipped step has not been refreshed
as its schedule assumed, so it computes at the next kept step instead. When
SADA makes a kept step PARTIAL, the token-wise blocks BAC computes at that step
run on SADA's unstable tokens only.
"""

from __future__ import annotations

import torch

from runtime.accel.bac import BACache
from runtime.accel.base import SKIP, Accelerator
from runtime.accel.sada import StabilitySkip
from runtime.solvers import History, Solver


class BACWithSADA(Accelerator):
    name = "bac+sada"
    uses_block_cache = True

    def __init__(self, schedule: dict, solver: str, steps: int, checkpoint_hash: str | None = None, **sada_options):
        super().__init__()
        self.cache = BACache(schedule, solver, steps, checkpoint_hash)
        self.skipper = StabilitySkip(**sada_options)
        self._pending: set[str] = set()

    def bind(self, denoiser):
        self.cache.bind(denoiser)
        self.hooks = self.skipper.hooks = self.cache.hooks
        return self

    def unbind(self) -> None:
        self.cache.unbind()
        self.hooks = self.skipper.hooks = None

    def begin(self, solver: Solver) -> None:
        super().begin(solver)
        self.skipper.begin(solver)
        self._pending.clear()

    def plan_step(self, i: int, x: torch.Tensor, history: History) -> str:
        plan = self.skipper.plan_step(i, x, history)
        self.tokens = self.skipper.tokens
        if plan == SKIP:
            self._pending |= {name for name, steps in self.cache.updates.items() if i in steps}
        return plan

    def should_compute(self, block: str, i: int) -> bool:
        return self.cache.should_compute(block, i) or block in self._pending

    def before_model_call(self, i: int) -> None:
        super().before_model_call(i)
        self._pending.clear()

    def estimate(self, i, x, history):
        return self.skipper.estimate(i, x, history)

    def stats(self) -> dict:
        per_trajectory = max(self.trajectories, 1)
        return {**super().stats(), "skipped_steps": self.skipper.skipped / per_trajectory,
                "partial_steps": self.skipper.partial / per_trajectory}
