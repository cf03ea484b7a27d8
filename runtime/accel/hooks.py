"""Block caching hooks, attached from outside the model the way diffusers attaches its cache hooks.

Each block a denoiser lists in `cache_blocks()` gets its `forward` wrapped on
the instance (the class and its code are untouched; `detach()` restores it).
The wrappers hold no state of a trajectory: a `BlockCache` belongs to one
request's accelerator, and `model_call(hooks, cache)` makes it the active
one for exactly one model call. Outside such a call the wrappers pass
straight through, so requests interleaved on one model (streams, batches)
never see each other's caches. Within a call the accelerator has told its
cache which blocks to compute at this step; a block told to skip returns its
output from the last step that computed it. What a block's output means (a
residual branch, a whole residual unit) is the model's business: the cache
stores whatever it returned.

Token-wise compute: a model may also list, in `tokenwise_blocks()`, the blocks
whose output at a token depends only on that token's input (a feed-forward
branch, a cross-attention branch whose queries are the tokens), each with a
function `select(args, tokens, grid) -> (args, positions)`. The accelerator
names tokens as flat indices into the sample's token grid (`grid`, its shape:
a policy's action positions, a spectrogram latent's time x frequency cells, as
the model's `token_layout` arranges the sample); `select` cuts the block's
inputs down and says which of the block's own positions (dim 1 of its output)
they are, which at a coarser resolution of a UNet are the cells covering the
named ones. When the accelerator names tokens for a model call, those blocks run
on those positions only and the rest of their output comes from the cache.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

# What a cacheable block is, as the model declares it in `cache_blocks()`: BAC gives feed-forward-like blocks
# (which amplify stale inputs) extra refreshes; reports and heatmaps group by kind.
BLOCK_KINDS = ("attention", "cross_attention", "feed_forward", "resolution_stage")


class CacheBlock(NamedTuple):
    """One entry of a denoiser's `cache_blocks()`, in execution order."""

    name: str
    module: nn.Module
    kind: str


def feed_forward_blocks(denoiser) -> set[str]:
    """Blocks that mix no tokens (feed-forward branches, convolutional resolution stages): in BAC's terms the
    ones that amplify stale inputs."""
    return {name for name, _, kind in denoiser.cache_blocks() if kind in ("feed_forward", "resolution_stage")}


@dataclass
class BlockCache:
    """Outputs of the named blocks from the last step that computed each, plus counts of what ran."""

    names: list[str]
    # block outputs per branch: one model call may run the model more than once on different inputs (the
    # conditional and unconditional passes of classifier-free guidance), and each keeps its own cache
    branches: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    branch: str = "main"
    compute: set[str] = field(default_factory=set)  # the blocks to run at the current model call
    tokens: torch.Tensor | None = None  # token positions token-wise blocks compute at this call (None: all)
    token_grid: tuple[int, ...] | None = None  # the shape of the grid `tokens` index, flattened
    token_inputs: dict = field(default_factory=dict)  # block name -> select(args, tokens, grid) -> (args, positions)
    # what stands in for a block that does not run: "last", its output from the last step that computed it;
    # "linear", that output extrapolated along the steps through the two last computations (TaylorSeer's
    # first-order forecast, Liu et al. 2025), the step being `step`, the current call's
    reuse: str = "last"
    step: int = 0
    computed: dict[tuple[str, str], list] = field(default_factory=dict)  # (branch, block) -> its last two
    # (step, output) pairs, kept for "linear" only
    evaluated: float = 0.0  # block forwards run (a token-wise forward counts its fraction of the tokens)
    requested: int = 0  # block forwards asked for (run or served from the cache)
    recorder: dict[str, list[torch.Tensor]] | None = None  # calibration: every computed output, in order

    def set_step(self, compute: set[str], tokens: torch.Tensor | None = None,
                 grid: tuple[int, ...] | None = None) -> None:
        must_exist = [name for name in self.names if name not in compute]
        if tokens is not None:
            must_exist += [name for name in compute if name in self.token_inputs]
        missing = [name for name in must_exist if name not in self.outputs]
        if missing:
            raise RuntimeError(f"blocks {missing} must be computed in full before their cache can serve them")
        self.compute, self.tokens, self.token_grid = compute, tokens, grid

    @property
    def outputs(self) -> dict[str, torch.Tensor]:
        """The current branch's block outputs."""
        return self.branches.setdefault(self.branch, {})

    def store(self, name: str, output, whole: bool = True) -> None:
        """A block's output just computed; `whole` False for a token-wise call, which computed part of it (the
        forecast then starts over from this output)."""
        self.outputs[name] = output
        if self.reuse == "linear":
            past = self.computed.setdefault((self.branch, name), [])
            past[:] = (past[-1:] if whole else []) + [(self.step, output)]

    def stand_in(self, name: str):
        """The output a block that does not run at this call returns."""
        past = self.computed.get((self.branch, name), []) if self.reuse == "linear" else []
        if len(past) < 2:
            return self.outputs[name]
        (first, older), (last, newer) = past
        return _extrapolate(older, newer, (self.step - last) / (last - first))

    def clear(self) -> None:
        """A new trajectory: every branch's outputs go."""
        self.branches.clear()
        self.computed.clear()
        self.branch = "main"

    def reset(self) -> None:
        self.clear()
        self.evaluated = self.requested = 0


class CacheHooks:
    """Wraps each cacheable block's forward so that the active BlockCache (`self.cache`) decides whether it runs;
    with none active (`cache = None`) every block runs as if unhooked."""

    def __init__(self, denoiser: nn.Module):
        if not hasattr(denoiser, "cache_blocks"):
            raise TypeError(f"{type(denoiser).__name__} does not list cache_blocks()")
        self.blocks: list[tuple[str, nn.Module]] = []
        for block in denoiser.cache_blocks():
            if len(block) != 3 or block[2] not in BLOCK_KINDS:
                raise TypeError(f"{type(denoiser).__name__}.cache_blocks() must list (name, module, kind) with kind "
                                f"one of {BLOCK_KINDS}, got {block[0]!r}: {block[2:]!r}")
            self.blocks.append((block[0], block[1]))
        self.names = [name for name, _ in self.blocks]
        self.token_inputs = dict(denoiser.tokenwise_blocks()) if hasattr(denoiser, "tokenwise_blocks") else {}
        self.cache: BlockCache | None = self.new_cache()  # standalone use; installed hooks start inactive
        self._attached = False

    def new_cache(self) -> BlockCache:
        return BlockCache(list(self.names), token_inputs=self.token_inputs)

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
        def cached_forward(*args, **kwargs):
            cache = self.cache
            if cache is None:
                return forward(*args, **kwargs)
            cache.requested += 1
            if name not in cache.compute:
                return cache.stand_in(name)
            whole = cache.tokens is None or name not in cache.token_inputs
            if whole:
                output = forward(*args, **kwargs)
                cache.evaluated += 1
            else:
                output = cache.outputs[name].clone()
                selected, positions = cache.token_inputs[name](args, cache.tokens, cache.token_grid)
                output[:, positions] = forward(*selected)
                cache.evaluated += len(positions) / output.shape[1]
            cache.store(name, output, whole)
            if cache.recorder is not None:
                cache.recorder.setdefault(name, []).append(_as_one_tensor(output))
            return output

        return cached_forward


def _extrapolate(older, newer, ratio: float):
    """newer + ratio (newer - older), through a block's output whatever its nesting of tuples."""
    if isinstance(newer, torch.Tensor):
        return newer + ratio * (newer - older)
    return type(newer)(_extrapolate(a, b, ratio) for a, b in zip(older, newer))


def _as_one_tensor(output) -> torch.Tensor:
    """A block's output for calibration: a stage that returns several tensors (a UNet's down stage: its output
    and its skip connections) is recorded as all of them, flattened per batch row and joined."""
    if isinstance(output, torch.Tensor):
        return output.detach().clone()
    return torch.cat([t.detach().flatten(1) for t in _tensors(output)], dim=1)


def _tensors(output):
    if isinstance(output, torch.Tensor):
        yield output
    else:
        for item in output:
            yield from _tensors(item)


_INSTALLED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # denoiser -> its one set of CacheHooks


def block_hooks(denoiser: nn.Module):
    """The hooks through which accelerators reach this denoiser's blocks, installed once and shared by every
    request (they hold no trajectory state); a backend that runs the blocks itself (export/) offers its own."""
    own = getattr(denoiser, "block_cache_hooks", None)
    if own is not None:
        return own()
    hooks = _INSTALLED.get(denoiser)
    if hooks is None:
        hooks = CacheHooks(denoiser).attach()
        hooks.cache = None
        _INSTALLED[denoiser] = hooks
    return hooks


def remove_hooks(denoiser: nn.Module) -> None:
    """Restore the blocks' own forwards (the model is as if never accelerated)."""
    hooks = _INSTALLED.pop(denoiser, None)
    if hooks is not None:
        hooks.detach()


@contextlib.contextmanager
def branch(hooks, name: str):
    """Within a model call, the blocks run for the named branch (its own cached outputs); back to "main" after."""
    cache = hooks.cache if hooks is not None else None
    if cache is None:
        yield
        return
    cache.branch = name
    try:
        yield
    finally:
        cache.branch = "main"


@contextlib.contextmanager
def model_call(hooks, cache: BlockCache | None):
    """`cache` is the active one for the duration of one model call, and none is active after it."""
    hooks.cache = cache
    try:
        yield
    finally:
        hooks.cache = None
