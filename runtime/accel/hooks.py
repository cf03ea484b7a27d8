"""Block caching hooks, attached from outside the model the way diffusers attaches its cache hooks.

Each block a denoiser lists in `cache_blocks()` gets its `forward` wrapped on
the instance (the class and its code are untouched; `detach()` restores it).
Before every model call the accelerator tells the cache which blocks to
compute at this step; a block told to skip returns its output from the last
step that computed it. What a block's output means (a residual branch, a whole
residual unit) is the model's business: the cache stores whatever it returned.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class BlockCache:
    """Outputs of the named blocks from the last step that computed each, plus counts of what ran."""

    names: list[str]
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    compute: set[str] = field(default_factory=set)  # the blocks to run at the current model call
    evaluated: int = 0  # block forwards run
    requested: int = 0  # block forwards asked for (run or served from the cache)
    recorder: dict[str, list[torch.Tensor]] | None = None  # calibration: every computed output, in order

    def set_step(self, compute: set[str]) -> None:
        missing = [name for name in self.names if name not in compute and name not in self.outputs]
        if missing:
            raise RuntimeError(f"blocks {missing} must be computed before their cache can serve them")
        self.compute = compute

    def reset(self) -> None:
        self.outputs.clear()
        self.evaluated = self.requested = 0


class CacheHooks:
    """Wraps each cacheable block's forward so that a BlockCache decides whether it runs."""

    def __init__(self, denoiser: nn.Module):
        if not hasattr(denoiser, "cache_blocks"):
            raise TypeError(f"{type(denoiser).__name__} does not list cache_blocks()")
        self.blocks: list[tuple[str, nn.Module]] = list(denoiser.cache_blocks())
        self.cache = BlockCache([name for name, _ in self.blocks])
        self._attached = False

    def attach(self) -> CacheHooks:
        if self._attached:
            return self
        for name, module in self.blocks:
            if "forward" in module.__dict__:
                raise RuntimeError(f"block {name} already has a wrapped forward; detach the other hook first")
            module.forward = self._wrap(name, module.forward)
        self._attached = True
        return self

    def detach(self) -> None:
        for _, module in self.blocks:
            module.__dict__.pop("forward", None)  # back to the class's forward
        self._attached = False

    def __enter__(self) -> CacheHooks:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def _wrap(self, name: str, forward):
        cache = self.cache

        def cached_forward(*args, **kwargs):
            cache.requested += 1
            if name not in cache.compute:
                return cache.outputs[name]
            output = forward(*args, **kwargs)
            cache.evaluated += 1
            cache.outputs[name] = output
            if cache.recorder is not None:
                cache.recorder.setdefault(name, []).append(output.detach().clone())
            return output

        return cached_forward
