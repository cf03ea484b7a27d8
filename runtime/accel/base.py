"""The accelerator contract: a step-level plan before each model call, a block-level compute set within it.

`plan_step(i, x, history)` answers FULL (call the model), PARTIAL (call the
model, but token-wise blocks compute only the positions in `self.tokens`) or
SKIP (no model call: `estimate` supplies x0 and eps from the solver's history).
Within a model call, `should_compute(block, i)` decides per cacheable block
whether it runs or its cached output stands in. The base class is the `none` accelerator: every
step, every block.
"""

from __future__ import annotations

import torch
from torch import nn

from rtdiff.runtime.accel.hooks import CacheHooks
from rtdiff.runtime.solvers import History, Solver

FULL, PARTIAL, SKIP = "full", "partial", "skip"


class Accelerator:
    name = "none"
    uses_block_cache = False
    options: tuple[str, ...] = ()  # what a user may set (`--accel-option`); schedules and solvers come from elsewhere

    def __init__(self):
        self.hooks: CacheHooks | None = None
        self.tokens: torch.Tensor | None = None  # set by plan_step when it answers PARTIAL
        self.solver: Solver | None = None
        self.model_calls = 0
        self.steps = 0
        self.trajectories = 0

    def bind(self, denoiser: nn.Module) -> Accelerator:
        """Attach to a denoiser (once); block hooks only for accelerators that cache blocks.

        A backend that runs the blocks itself (export/) has no torch blocks to hook and offers its own cache."""
        if self.uses_block_cache and self.hooks is None:
            own = getattr(denoiser, "block_cache_hooks", None)
            self.hooks = own() if own is not None else CacheHooks(denoiser).attach()
        return self

    def unbind(self) -> None:
        if self.hooks is not None:
            self.hooks.detach()
            self.hooks = None

    def begin(self, solver: Solver) -> None:
        """A new trajectory: nothing cached may cross from the previous one."""
        self.solver = solver
        self.trajectories += 1
        if self.hooks is not None:
            self.hooks.cache.outputs.clear()

    def plan_step(self, i: int, x: torch.Tensor, history: History) -> str:
        return FULL

    def should_compute(self, block: str, i: int) -> bool:
        return True

    def before_model_call(self, i: int) -> None:
        self.model_calls += 1
        if self.hooks is not None:
            compute = {name for name in self.hooks.cache.names if self.should_compute(name, i)}
            self.hooks.cache.set_step(compute, self.tokens)

    def estimate(self, i: int, x: torch.Tensor, history: History) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError(f"accelerator {self.name} never skips a step")

    def after_step(self) -> None:
        self.steps += 1

    def stats(self) -> dict:
        """Model calls per trajectory and the fraction of block forwards that ran (1.0 without caching)."""
        per_trajectory = self.model_calls / max(self.trajectories, 1)
        if self.hooks is None:
            fraction = self.model_calls / max(self.steps, 1)
        else:
            fraction = self.hooks.cache.evaluated / max(self.steps * len(self.hooks.cache.names), 1)
        return {"accel": self.name, "model_calls": per_trajectory, "block_evals_fraction": fraction}


class UniformCache(Accelerator):
    """Refresh every block every `interval` steps and reuse in between (the DeepCache / FORA baseline)."""

    name = "uniform"
    uses_block_cache = True
    options = ("interval",)

    def __init__(self, interval: int = 2):
        super().__init__()
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"uniform cache interval must be an integer >= 1, got {interval!r}")
        self.interval = interval

    def should_compute(self, block: str, i: int) -> bool:
        return i % self.interval == 0
