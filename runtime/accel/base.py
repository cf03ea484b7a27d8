"""The accelerator contract: a step-level plan before each model call, a block-level compute set within it.

`plan_step(i, x, history)` answers FULL (call the model), PARTIAL (call the
model, but token-wise blocks compute only the positions in `self.tokens`) or
SKIP (no model call: `estimate` supplies x0 and eps from the solver's history).
Within a model call, `should_compute(block, i)` decides per cacheable block
whether it runs or its cached output stands in. The base class is the `none` accelerator: every
step, every block.

An accelerator object is one request's context: its block cache, step
counters and SADA's history belong to the one trajectory it is used for (a
service makes one per request or stream, `AcceleratorSpec`), while the hooks
on the model are shared and stateless (runtime/accel/hooks.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from rtdiff.runtime.accel.hooks import BlockCache, block_hooks, model_call
from rtdiff.runtime.solvers import History, Solver

FULL, PARTIAL, SKIP = "full", "partial", "skip"


@dataclass(frozen=True)
class NoOptions:
    pass


REUSE = ("last", "linear")


def check_reuse(reuse) -> str:
    if reuse not in REUSE:
        raise ValueError(f"reuse must be one of {REUSE} (what stands in for a cached block), got {reuse!r}")
    return reuse


@dataclass(frozen=True)
class UniformOptions:
    interval: int = 2  # refresh every block every `interval` steps
    reuse: str = "last"  # or "linear": a cached block's output extrapolated through its last two (hooks.BlockCache)

    def __post_init__(self):
        if isinstance(self.interval, bool) or not isinstance(self.interval, int) or self.interval < 1:
            raise ValueError(f"uniform cache interval must be an integer >= 1, got {self.interval!r}")
        check_reuse(self.reuse)


_NO_HOOKS = contextlib.nullcontext()


class Accelerator:
    name = "none"
    uses_block_cache = False
    reuse = "last"  # what stands in for a cached block (BlockCache.reuse)
    Options = NoOptions  # what a user may set (`--accel-option`); schedules and solvers come from elsewhere

    def __init__(self):
        self.hooks = None  # the model's shared hooks (or an exported backend's), while bound
        self.cache: BlockCache | None = None  # this request's block outputs
        self.tokens: torch.Tensor | None = None  # set by plan_step when it answers PARTIAL: flat grid indices
        self.token_grid: tuple[int, ...] | None = None  # the shape of the token grid they index
        self.solver: Solver | None = None
        self.model_calls = 0
        self.steps = 0
        self.trajectories = 0

    def bind(self, denoiser: nn.Module) -> Accelerator:
        """Reach a denoiser's blocks (through hooks installed once per model); only accelerators that cache
        blocks need them, and each gets a cache of its own."""
        if self.uses_block_cache and self.cache is None:
            self.hooks = block_hooks(denoiser)
            self.cache = self.hooks.new_cache()
            self.cache.reuse = self.reuse
        return self

    def unbind(self) -> None:
        """Let go of the model (its hooks stay installed, inactive; `hooks.remove_hooks` removes them)."""
        self.hooks = self.cache = None

    def begin(self, solver: Solver) -> None:
        """A new trajectory: nothing cached may cross from the previous one."""
        self.solver = solver
        self.trajectories += 1
        if self.cache is not None:
            self.cache.clear()

    def plan_step(self, i: int, x: torch.Tensor, history: History) -> str:
        return FULL

    def should_compute(self, block: str, i: int) -> bool:
        return True

    def before_model_call(self, i: int) -> None:
        self.model_calls += 1
        if self.cache is not None:
            compute = {name for name in self.cache.names if self.should_compute(name, i)}
            self.cache.set_step(compute, self.tokens, self.token_grid)
            self.cache.step = i

    def calling_model(self):
        """Context for one model call: this request's cache is the one the model's blocks see."""
        return model_call(self.hooks, self.cache) if self.hooks is not None else _NO_HOOKS

    def estimate(self, i: int, x: torch.Tensor, history: History) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError(f"accelerator {self.name} never skips a step")

    def after_step(self) -> None:
        self.steps += 1

    def static_key(self) -> tuple:
        """What this accelerator decides, as a hashable value, for accelerators whose decisions do not depend on
        the data (a captured CUDA graph is reused by every request that would decide the same)."""
        return (self.name,)

    def stats(self) -> dict:
        """Model calls per trajectory and the fraction of block forwards that ran (1.0 without caching)."""
        per_trajectory = self.model_calls / max(self.trajectories, 1)
        if self.cache is None:
            fraction = self.model_calls / max(self.steps, 1)
        else:
            fraction = self.cache.evaluated / max(self.steps * len(self.cache.names), 1)
        return {"accel": self.name, "model_calls": per_trajectory, "block_evals_fraction": fraction}


class UniformCache(Accelerator):
    """Refresh every block every `interval` steps and reuse in between (the DeepCache / FORA baseline)."""

    name = "uniform"
    uses_block_cache = True
    Options = UniformOptions

    def __init__(self, interval: int = 2, reuse: str = "last"):
        super().__init__()
        options = UniformOptions(interval, reuse)
        self.interval, self.reuse = options.interval, options.reuse

    def should_compute(self, block: str, i: int) -> bool:
        return i % self.interval == 0

    def static_key(self) -> tuple:
        return (self.name, self.interval, self.reuse)
