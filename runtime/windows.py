"""Causal sliding windows: an output of any length as overlapping latent windows, each tied to the one before.

The latent timeline (one axis of the latent, `time_dim`) is cut into windows of
`window` frames that overlap by `overlap`; window k starts at frame
k * (window - overlap) and is denoised as a trajectory of its own (its own
accelerator context, its own conditioning), with its first `overlap` frames
tied to window k - 1's last ones by one of two ties:

- `fusion` (StableAvatar's): after every solver step the overlap becomes
  w * current + (1 - w) * previous, where `previous` is window k - 1's sample
  after the same step, kept from when it ran, so nothing waits on a later window.
  w rises across the overlap from 0 (the oldest frame: all previous) to 1, as
  w_j = j / (L - 1) (`linear`) or w_j = log(1 + j) / log(L) (`log`, our pinning
  of the paper's log ramp: it hands over to the new window sooner);
- `inpaint`: after every step the overlap is window k - 1's final latent
  noised to the level the trajectory has reached (`Solver.level`), with the
  frames' own initial noise, and exactly that latent after the last step.

The initial noise is one timeline drawn frame by frame from one generator
(`NoiseTimeline`), so both windows over an overlap start from the same noise and
a stream's noise does not depend on its window sizes. Frames settle (will not
change again) when their window finishes, except under fusion the last
`overlap`, which the next window rewrites. `Emitter` turns finished windows
into segments to decode: the newly settled frames with latent context on both
sides (so a decoder's edges fall outside what is kept), and `CrossFade` blends
the head of each decoded segment into the tail decoded after the previous one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from rtdiff.runtime.sampling import Conditioning, Denoiser, trajectory
from rtdiff.runtime.solvers import Solver

TIES = ("fusion", "inpaint")
RAMPS = ("linear", "log")


@dataclass(frozen=True)
class WindowPlan:
    window: int  # latent frames per window
    overlap: int  # frames each window shares with the one before
    tie: str = "inpaint"
    ramp: str = "linear"  # fusion's weights across the overlap
    time_dim: int = 2  # the latent's time axis: (B, C, T, F) for audio, (B, C, T, H, W) for video

    def __post_init__(self):
        if self.tie not in TIES:
            raise ValueError(f"unknown window tie {self.tie!r}; expected one of {TIES}")
        if self.ramp not in RAMPS:
            raise ValueError(f"unknown fusion ramp {self.ramp!r}; expected one of {RAMPS}")
        if not 0 < self.overlap < self.window:
            raise ValueError(f"overlap must be in [1, window - 1] = [1, {self.window - 1}], got {self.overlap}")
        if self.tie == "fusion" and self.overlap < 2:
            raise ValueError("fusion needs an overlap of at least 2 frames (its weights run from 0 to 1)")

    @property
    def stride(self) -> int:
        return self.window - self.overlap

    def start(self, k: int) -> int:
        return k * self.stride

    def windows_for(self, frames: int) -> int:
        """How many windows cover `frames` latent frames."""
        return max(1, math.ceil((frames - self.overlap) / self.stride))


def fusion_weights(overlap: int, ramp: str = "linear") -> torch.Tensor:
    """The current window's weight at each overlap frame, oldest first: 0 at the first, 1 at the last."""
    j = torch.arange(overlap, dtype=torch.float64)
    if ramp == "linear":
        return j / (overlap - 1)
    return torch.log1p(j) / math.log(overlap)


class NoiseTimeline:
    """The initial noise of every latent frame of a stream, drawn in order, one frame at a time, from one
    generator; frames before the oldest still needed are dropped."""

    def __init__(self, frame_shape: tuple[int, ...], generator: torch.Generator, time_dim: int = 2):
        self.frame_shape = tuple(frame_shape)  # the latent's shape with its time axis of size 1
        self.time_dim, self.generator = time_dim, generator
        self._frames: list[torch.Tensor] = []
        self._first = 0  # the timeline index of self._frames[0]

    def frames(self, start: int, end: int) -> torch.Tensor:
        if start < self._first:
            raise ValueError(f"noise for frame {start} was already dropped (kept from {self._first})")
        while self._first + len(self._frames) < end:
            self._frames.append(torch.randn(self.frame_shape, generator=self.generator))
        del self._frames[:start - self._first]
        self._first = start
        return torch.cat(self._frames[:end - start], dim=self.time_dim)


@dataclass
class Window:
    index: int
    start: int  # its first frame on the timeline
    latent: torch.Tensor  # its final latent
    settled: int  # frames before this one (timeline index) will not change again
    last: bool


def sliding_windows(denoiser: Denoiser, solver: Solver, plan: WindowPlan, noise: NoiseTimeline,
                    cond: Callable[[int], Conditioning], frames: int | None = None,
                    new_accelerator: Callable[[], object] | None = None) -> Iterator[Window | None]:
    """Windows in order, until they cover `frames` latent frames (None: without end, until the caller stops).
    Yields None after each solver step that does not finish a window (so a server can interleave other work
    between steps), then the finished Window. `cond(k)` is window k's conditioning: it may change between
    windows (a new prompt). `new_accelerator()` makes each window's accelerator (one per trajectory)."""
    count = plan.windows_for(frames) if frames is not None else None
    previous: _Tie | None = None
    k = 0
    while count is None or k < count:
        last = count is not None and k == count - 1
        start = plan.start(k)
        x = noise.frames(start, start + plan.window)
        tie = _Tie(plan, solver, x, previous, keep_steps=not last and plan.tie == "fusion")
        accelerator = new_accelerator() if new_accelerator is not None else None
        steps = trajectory(denoiser, solver, tie.initial(x), cond(k), accelerator=accelerator, constrain=tie)
        for i, step in enumerate(steps):
            x = step.x
            if i < len(solver.timesteps) - 1:
                yield None
        settled = start + plan.window if last or plan.tie == "inpaint" else start + plan.stride
        yield Window(k, start, x, settled, last)
        previous = tie.finish(x)
        k += 1


class _Tie:
    """One window's hold on its overlap: `constrain` for its trajectory, and what the next window ties to."""

    def __init__(self, plan: WindowPlan, solver: Solver, noise: torch.Tensor, previous: _Tie | None,
                 keep_steps: bool):
        self.plan, self.solver, self.previous = plan, solver, previous
        overlap, dim = plan.overlap, plan.time_dim
        self.overlap_noise = noise.narrow(dim, 0, overlap)
        self.kept_steps: list[torch.Tensor] = []  # fusion: this window's tail after each step, for the next
        self.keep_steps = keep_steps
        self.final_tail: torch.Tensor | None = None  # inpaint: this window's final tail, for the next
        if plan.tie == "fusion":
            shape = [1] * noise.dim()
            shape[dim] = overlap
            self.weights = fusion_weights(overlap, plan.ramp).to(noise.dtype).view(shape)

    def initial(self, x: torch.Tensor) -> torch.Tensor:
        if self.previous is None or self.plan.tie == "fusion":  # fusion: the shared noise already ties them
            return x
        return self._hold(x, self._noised(-1))

    def __call__(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if self.previous is not None:
            if self.plan.tie == "fusion":
                held = self.previous.kept_steps[i]
                current = x.narrow(self.plan.time_dim, 0, self.plan.overlap)
                x = self._hold(x, self.weights * current + (1 - self.weights) * held)
            else:
                last = i == len(self.solver.timesteps) - 1
                x = self._hold(x, self.previous.final_tail if last else self._noised(i))
        if self.keep_steps:
            self.kept_steps.append(self._tail(x))
        return x

    def finish(self, x: torch.Tensor) -> _Tie:
        self.final_tail = self._tail(x)
        self.previous = None  # the window before is no longer needed
        return self

    def _noised(self, i: int) -> torch.Tensor:
        alpha, sigma = self.solver.level(i)
        return alpha * self.previous.final_tail + sigma * self.overlap_noise

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        dim, overlap = self.plan.time_dim, self.plan.overlap
        return x.narrow(dim, x.shape[dim] - overlap, overlap).clone()

    def _hold(self, x: torch.Tensor, overlap_part: torch.Tensor) -> torch.Tensor:
        dim, overlap = self.plan.time_dim, self.plan.overlap
        return torch.cat([overlap_part.to(x.dtype), x.narrow(dim, overlap, x.shape[dim] - overlap)], dim=dim)


@dataclass
class Segment:
    """Latent frames to decode: the timeline's [start, end) to emit, with `left` and `right` frames of context
    on either side (decoded, then cut away)."""

    latent: torch.Tensor
    start: int
    end: int
    left: int
    right: int
    last: bool


class Emitter:
    """Finished windows -> segments of newly settled frames, each with up to `context` frames of latent context
    on both sides. A segment ends `context` frames before the latest known frame (unless the stream ends there),
    so its right edge is decoded with what follows it; `length` (frames) cuts the stream's end."""

    def __init__(self, plan: WindowPlan, context: int, length: int | None = None):
        if context < 0:
            raise ValueError(f"decoder context must be non-negative, got {context}")
        self.plan, self.context, self.length = plan, context, length
        self.emitted = 0
        self._frames: torch.Tensor | None = None  # the timeline from `_first` to the latest window's end
        self._first = 0

    def push(self, window: Window) -> Segment | None:
        self._store(window)
        known = window.start + window.latent.shape[self.plan.time_dim]
        end = window.settled if window.last else min(window.settled, known - self.context)
        if self.length is not None:
            end = min(end, self.length)
        if end <= self.emitted:
            return None
        left = min(self.context, self.emitted - self._first)
        right = 0 if window.last else min(self.context, known - end)
        latent = self._frames.narrow(self.plan.time_dim, self.emitted - left - self._first, left + end - self.emitted
                                     + right)
        segment = Segment(latent, self.emitted, end, left, right, window.last)
        self.emitted = end
        self._drop_before(min(end - self.context, window.start + self.plan.stride))  # keep the next window's start
        return segment

    def _store(self, window: Window) -> None:
        dim = self.plan.time_dim
        if self._frames is None:
            self._frames, self._first = window.latent, window.start
            return
        kept = self._frames.narrow(dim, 0, window.start - self._first)  # frames before the new window's
        self._frames = torch.cat([kept, window.latent], dim=dim)

    def _drop_before(self, frame: int) -> None:
        if frame > self._first:
            dim = self.plan.time_dim
            self._frames = self._frames.narrow(dim, frame - self._first, self._frames.shape[dim] - frame + self._first)
            self._first = frame


class CrossFade:
    """Cuts each decoded segment to what it emits and blends its first `fade` frames (in the signal's own units,
    e.g. samples) into the tail the previous segment's decode gave there, with a raised-cosine ramp. `rate` is
    the signal's units per latent frame, `axis` its time axis."""

    def __init__(self, rate: int, fade: int, axis: int = -1):
        if fade < 0:
            raise ValueError(f"cross-fade length must be non-negative, got {fade}")
        self.rate, self.fade, self.axis = rate, fade, axis
        self._tail: torch.Tensor | None = None

    def __call__(self, decoded: torch.Tensor, segment: Segment) -> torch.Tensor:
        axis = self.axis % decoded.dim()
        begin, size = segment.left * self.rate, (segment.end - segment.start) * self.rate
        part = decoded.narrow(axis, begin, size)
        if self._tail is not None:
            n = min(self.fade, self._tail.shape[axis], size)
            ramp = 0.5 - 0.5 * torch.cos(torch.linspace(0, math.pi, n + 2, dtype=decoded.dtype)[1:-1])
            shape = [1] * decoded.dim()
            shape[axis] = n
            ramp = ramp.view(shape)
            head = ramp * part.narrow(axis, 0, n) + (1 - ramp) * self._tail.narrow(axis, 0, n)
            part = torch.cat([head, part.narrow(axis, n, size - n)], dim=axis)
        available = decoded.shape[axis] - begin - size
        self._tail = decoded.narrow(axis, begin + size, min(self.fade, available)).clone() if available > 0 else None
        return part
