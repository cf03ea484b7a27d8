"""CUDA-graph backend for the torch path: a whole trajectory captured once, or one graph per model call.

NOT RUN YET: written on machines without a GPU; its test skips unless CUDA is
available.

Why a whole trajectory and not one graph per step: with a static cache
schedule (none, uniform, BAC) every decision the accelerator makes depends on
the step index alone, so the Python that makes them runs once, at capture,
and the cached block outputs it hands from step to step live inside the same
graph's memory pool. Each replay then runs every kernel of every step with
no Python and no launch overhead in between.

Where the steps are decided at run time (SADA skipping steps from the
solver's history), the loop stays in Python and each model call replays a
graph captured per input shape instead. What cannot be captured is refused by
name: token-wise SADA (cached blocks served by data-dependent decisions) and
DDPM (it draws noise from the caller's CPU generator).
"""

from __future__ import annotations

import torch

from rtdiff.runtime.sampling import sample

STATIC_ACCELERATORS = ("none", "uniform", "bac")


class GraphedSampler:
    """Drop-in for `runtime.sampling.sample` on CUDA: one captured graph per (batch, solver, accelerator)."""

    def __init__(self, warmup: int = 2):
        self.warmup = warmup
        self.graphs: dict[tuple, tuple] = {}
        self.per_step: dict[int, GraphedCall] = {}

    def __call__(self, denoiser, solver, noise, cond, generator=None, accelerator=None) -> torch.Tensor:
        if noise.device.type != "cuda":
            raise ValueError("the cudagraph backend runs on CUDA tensors; move the policy to the GPU")
        if solver.name == "ddpm":
            raise ValueError("DDPM draws fresh noise from a CPU generator at every step; capture ddim or dpmpp")
        if getattr(accelerator, "name", "none") not in STATIC_ACCELERATORS:
            return self._per_step(denoiser, solver, noise, cond, accelerator)
        # keyed by what the accelerator decides, not by the instance: each request brings its own
        cond = dict(cond or {})
        key = (noise.shape, tuple((k, v.shape) for k, v in sorted(cond.items())), id(solver), accelerator.static_key())
        if key not in self.graphs:
            self.graphs[key] = self._capture(denoiser, solver, noise, cond, accelerator)
        graph, static_noise, static_cond, static_out, counts = self.graphs[key]
        static_noise.copy_(noise)
        for name, value in cond.items():
            static_cond[name].copy_(value)
        graph.replay()
        _add_counts(accelerator, counts)  # the replay did what the captured trajectory did; count it so
        return static_out.clone()

    def _per_step(self, denoiser, solver, noise, cond, accelerator) -> torch.Tensor:
        """Steps decided at run time (SADA): the loop runs in Python, each model call replays a graph."""
        if accelerator.cache is not None:
            raise ValueError(f"accelerator {accelerator.name!r} serves cached blocks from data-dependent decisions "
                             "(token-wise SADA); that cannot be captured")
        if id(denoiser) not in self.per_step:
            self.per_step[id(denoiser)] = GraphedCall(denoiser, self.warmup)
        return sample(self.per_step[id(denoiser)], solver, noise, cond, None, accelerator)

    def _capture(self, denoiser, solver, noise, cond, accelerator):
        static_noise, static_cond = noise.clone(), {name: value.clone() for name, value in cond.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture: allocator and kernel caches settle first
            for _ in range(self.warmup):
                sample(denoiser, solver, static_noise, static_cond, None, accelerator)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        before = _counts(accelerator)
        with torch.cuda.graph(graph):
            static_out = sample(denoiser, solver, static_noise, static_cond, None, accelerator)
        counts = {key: value - before[key] for key, value in _counts(accelerator).items()}
        _add_counts(accelerator, {key: -value for key, value in counts.items()})  # capture ran nothing
        return graph, static_noise, static_cond, static_out, counts


class GraphedCall:
    """One denoiser call captured per input shape, replayed with the inputs copied into its static buffers."""

    def __init__(self, denoiser, warmup: int):
        self.denoiser, self.warmup = denoiser, warmup
        self.graphs: dict[tuple, tuple] = {}

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        key = (x.shape, t.shape, tuple((name, cond[name].shape) for name in sorted(cond)))
        inputs = {"x": x, "t": t, **cond}
        if key not in self.graphs:
            static = {name: value.clone() for name, value in inputs.items()}
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self.denoiser(**static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.denoiser(**static)
            self.graphs[key] = (graph, static, out)
        graph, static, out = self.graphs[key]
        for name, value in inputs.items():
            static[name].copy_(value)
        graph.replay()
        return out.clone()


def _counts(accelerator) -> dict:
    """What an accelerator counts per trajectory (its stats come from these)."""
    if accelerator is None:
        return {}
    counts = {name: getattr(accelerator, name) for name in ("model_calls", "steps", "trajectories")}
    if accelerator.cache is not None:
        counts.update(evaluated=accelerator.cache.evaluated, requested=accelerator.cache.requested)
    return counts


def _add_counts(accelerator, counts: dict) -> None:
    for name, value in counts.items():
        owner = accelerator.cache if name in ("evaluated", "requested") else accelerator
        setattr(owner, name, getattr(owner, name) + value)


def use_cudagraph(policy):
    """The policy on the GPU, sampling through captured trajectories (in place; returns the policy)."""
    if not torch.cuda.is_available():
        raise ValueError("the cudagraph backend needs CUDA; torch sees no GPU")
    policy.to("cuda")
    policy.sampler = GraphedSampler()
    return policy
