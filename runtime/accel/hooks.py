"""Block caching hooks, attached from outside the model the way diffusers attaches its cache hooks.

Each block a denoiser lists in `cache_blocks()` gets its `forward` wrapped on
the instance (the class and its code are untouched; `detach()` restores it).
Before every model call the accelerator tells the cache which blocks to
compute at this step; a block told to skip returns its output from the last
step that computed it. What a block's output means (a residual branch, a whole
residual unit) is the model's business: the cache stores whatever it returned.

Token-wise compute: a model may also list, in `tokenwise_blocks()`, the blocks
whose output at a token depends only on that token's input (a feed-forward
branch, a cross-attention branch whose queries are the tokens), each with a
function that cuts its inputs down to a set of token positions (dim 1). When
the accelerator names tokens for a model call, those blocks run on the named
tokens only and the rest of their output comes from the cache.
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
    tokens: torch.Tensor | None = None  # token positions token-wise blocks compute at this call (None: all)
    token_inputs: dict = field(default_factory=dict)  # block name -> (args, token index) -> the token's args
    evaluated: float = 0.0  # block forwards run (a token-wise forward counts its fraction of the tokens)
    requested: int = 0  # block forwards asked for (run or served from the cache)
    recorder: dict[str, list[torch.Tensor]] | None = None  # calibration: every computed output, in order

    def set_step(self, compute: set[str], tokens: torch.Tensor | None = None) -> None:
        must_exist = [name for name in self.names if name not in compute]
        if tokens is not None:
            must_exist += [name for name in compute if name in self.token_inputs]
        missing = [name for name in must_exist if name not in self.outputs]
        if missing:
            raise RuntimeError(f"blocks {missing} must be computed in full before their cache can serve them")
        self.compute, self.tokens = compute, tokens

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
        if hasattr(denoiser, "tokenwise_blocks"):
            self.cache.token_inputs = dict(denoiser.tokenwise_blocks())
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
            if cache.tokens is not None and name in cache.token_inputs:
                output = cache.outputs[name].clone()
                output[:, cache.tokens] = forward(*cache.token_inputs[name](args, cache.tokens))
                cache.evaluated += len(cache.tokens) / output.shape[1]
            else:
                output = forward(*args, **kwargs)
                cache.evaluated += 1
            cache.outputs[name] = output
            if cache.recorder is not None:
                cache.recorder.setdefault(name, []).append(output.detach().clone())
            return output

        return cached_forward


def carries_hooks(denoiser: nn.Module) -> bool:
    """Whether an accelerator's hooks are attached to this model's blocks."""
    return hasattr(denoiser, "cache_blocks") and any("forward" in m.__dict__ for _, m in denoiser.cache_blocks())
