"""Stability-guided step skipping after SADA (Jiang et al., ICML 2025, arXiv 2507.17135).

The criterion reads the trajectory the solver has already produced. With the
probability-flow drift of the VP ODE at each past step,

    f_n = -1/2 beta(tau_n) x_n + 1/2 beta(tau_n) / sigma_n * eps_n     (tau = t / N)

a multistep extrapolation x^_{n+1} = x_n + dtau_n (0.625 f_n + 0.75 f_{n-1} - 0.375 f_{n-2})
is compared with the sample the solver actually reached, and the residual
r = x_{n+1} - x^_{n+1} with the drift's second difference d2f = f_n - 2 f_{n-1} + f_{n-2}.
Where mean(r * d2f) <= threshold the trajectory is stable: the next step runs no
model and the solver integrates it from the last noise estimate at the current
sample (SADA's epsilon reuse), or with `estimate="lagrange"` from x0 extrapolated in
time through the last three model calls (SADA's late-sampling estimate). On a flow-matching solver the drift is the
velocity, time is sigma, the score takes the velocity's negative second
difference, and a skipped step's velocity is extrapolated, 2 v_{n-1} - v_{n-2}. Skips happen only inside a window of the
trajectory and never more than `max_consecutive` in a row.

Token-wise: when the step as a whole is not stable (or may not be skipped) and
the model lists token-wise blocks, the same score averaged over channels marks
each token: for a policy each action position of the chunk, for a model that
says otherwise in `token_layout(x) -> (B, *grid, channels)` each cell of its
grid (a spectrogram latent's time x frequency cells, whatever its aspect). The call is
PARTIAL: token-wise blocks (feed-forward, cross-attention) recompute only the
unstable tokens (score > token_threshold) and take the rest from the cache;
blocks that mix tokens (self-attention) always run. After `max_partial`
partial calls in a row the next call is full, which refreshes every token.

The criterion is computed only where its answer can change the plan (a step
that may be skipped, or a partial call that may be made), from drift
coefficients taken once per trajectory, each step's drift computed once: on a
10-token policy it cost as much as the work a skip saves when it ran on every
step. `skippable` restricts the steps that may be skipped at all (bac+sada
passes the steps on which its block schedule refreshes nothing).

Decisions are made for the whole batch: a step is skipped only when every
trajectory in it is stable, and a token is reused only when it is stable in
every trajectory, so batching requests never changes the answer for the worse.
(SADA's code asserts batch size 1.)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from rtdiff.runtime.accel.base import FULL, PARTIAL, SKIP, Accelerator
from rtdiff.runtime.solvers import History, Solver


@dataclass(frozen=True)
class SadaOptions:
    """SADA's options (`--accel-option`, and a bac+sada schedule's `sada` entry); wrong types fail by name."""

    # Defaults from benchmarks/accel.py on both PushT policies (RESULTS.md): against SADA's own (threshold 0, window
    # (0.2, 0.94), one skip in a row, token-wise calls) they took DDIM 10 from 1.23x to 2.0x on the transformer and
    # 1.01x to 1.83x on the UNet at the same closed-loop score within noise; token-wise partial calls on a 10-token
    # chunk cost about what they save and added action error.
    threshold: float = 0.01
    window: tuple[float, float] = (0.1, 0.97)
    max_consecutive: int = 2
    tokenwise: bool = False
    token_threshold: float | None = None
    max_partial: int = 2
    # a skipped step's estimate: "eps" reuses the last noise estimate at the current sample; "lagrange" extrapolates
    # x0 along the trajectory through the last three model calls (SADA's late-sampling estimate)
    estimate: str = "eps"

    def __post_init__(self):
        _check_options(self.threshold, self.window, self.max_consecutive, self.tokenwise, self.token_threshold,
                       self.max_partial, self.estimate)


class StabilitySkip(Accelerator):
    name = "sada"
    Options = SadaOptions

    def __init__(self, skippable: Iterable[int] | None = None, **options):
        super().__init__()
        options = SadaOptions(**options)
        self.threshold = options.threshold
        self.window = tuple(options.window)
        self.max_consecutive = options.max_consecutive
        self.tokenwise = options.tokenwise
        self.token_threshold = options.threshold if options.token_threshold is None else options.token_threshold
        self.max_partial = options.max_partial
        self.estimator = options.estimate
        self.skippable = None if skippable is None else set(skippable)
        self.skipped = self.partial = 0
        self._partial_run = 0
        self._drifts: dict[int, torch.Tensor] = {}
        self._coefficients: list[tuple[float, float]] = []  # per step n: f_n = a_n x_n + b_n eps_n
        self._token_layout = None

    def bind(self, denoiser) -> StabilitySkip:
        # The block cache is needed only to serve the tokens a partial call leaves out.
        self.uses_block_cache = self.tokenwise and self.max_partial > 0 and hasattr(denoiser, "tokenwise_blocks")
        self._token_layout = getattr(denoiser, "token_layout", None)
        return super().bind(denoiser)

    def begin(self, solver: Solver) -> None:
        super().begin(solver)
        self._drifts.clear()
        self._coefficients = [] if self._flow else [self._drift_coefficients(t) for t in solver.timesteps]

    @property
    def tokenwise_ready(self) -> bool:
        # `tokenwise` is checked here too: inside bac+sada the hooks are BAC's, present whatever SADA was told
        return self.tokenwise and self.cache is not None and bool(self.cache.token_inputs) and self.max_partial > 0

    def plan_step(self, i: int, x: torch.Tensor, history: History) -> str:
        plan = self._plan(i, x, history)
        self._partial_run = self._partial_run + 1 if plan == PARTIAL else 0 if plan == FULL else self._partial_run
        self.skipped += plan == SKIP
        self.partial += plan == PARTIAL
        return plan

    def _plan(self, i: int, x: torch.Tensor, history: History) -> str:
        self.tokens = self.token_grid = None
        steps = len(self.solver.timesteps)
        if not (self.window[0] * steps <= i < self.window[1] * steps) or i < 3:
            return FULL
        may_skip = (self.skippable is None or i in self.skippable) and not (
            len(history.model_called) >= self.max_consecutive and not any(history.model_called[-self.max_consecutive:]))
        may_be_partial = self.tokenwise_ready and self._partial_run < self.max_partial
        if not (may_skip or may_be_partial):
            return FULL
        scores = self.token_scores(i, x, history)
        if may_skip and scores.flatten(1).mean(1).max() <= self.threshold:
            return SKIP
        if not may_be_partial:
            return FULL
        self.token_grid = tuple(scores.shape[1:])
        worst = scores.flatten(1).max(0).values
        unstable = torch.nonzero(worst > self.token_threshold).flatten()
        if len(unstable) == len(worst):
            return FULL
        self.tokens = unstable if len(unstable) else worst.argmax()[None]  # one token keeps the call meaningful
        return PARTIAL

    def stability_score(self, i: int, x: torch.Tensor, history: History) -> torch.Tensor:
        """mean(r * d2f) per trajectory in the batch, for the step from i-1 to i."""
        return self.token_scores(i, x, history).flatten(1).mean(1)

    def token_scores(self, i: int, x: torch.Tensor, history: History) -> torch.Tensor:
        """r * d2f averaged over channels: (batch, *grid), the grid being dim 1 of the sample unless the model's
        `token_layout` arranges it otherwise.

        On a flow model the drift is the velocity itself, time is sigma, and the score takes the velocity's
        negative second difference (SADA's flow-matching criterion)."""
        f = [self._drift(n, history) for n in (i - 1, i - 2, i - 3)]
        predicted = history.samples[i - 1] + self._dtau(i) * (0.625 * f[0] + 0.75 * f[1] - 0.375 * f[2])
        residual = x - predicted
        curvature = f[0] - 2 * f[1] + f[2]
        if self._flow:
            curvature = -curvature
        score = residual * curvature
        if self._token_layout is not None:
            return self._token_layout(score).mean(-1)
        return score.flatten(2).mean(2)

    @property
    def _flow(self) -> bool:
        return self.solver.name == "flow"

    def _dtau(self, i: int) -> float:
        if self._flow:
            return float(self.solver.sigmas[i] - self.solver.sigmas[i - 1])
        return (self.solver.timesteps[i] - self.solver.timesteps[i - 1]) / self.solver.config.num_train_timesteps

    def _drift(self, n: int, history: History) -> torch.Tensor:
        if n not in self._drifts:  # a trajectory's history only grows, so step n's drift never changes
            if self._flow:
                self._drifts[n] = history.eps[n] - history.x0[n]  # the velocity
            else:
                a, b = self._coefficients[n]
                self._drifts[n] = history.samples[n] * a + history.eps[n] * b
        return self._drifts[n]

    def _drift_coefficients(self, t: int) -> tuple[float, float]:
        a_t, a_prev = float(self.solver.alpha_bar(t)), float(self.solver.alpha_bar(t - 1))
        beta = self.solver.config.num_train_timesteps * (1 - a_t / a_prev)  # continuous-time beta(tau)
        return -0.5 * beta, 0.5 * beta / (1 - a_t) ** 0.5

    def estimate(self, i: int, x: torch.Tensor, history: History) -> tuple[torch.Tensor, torch.Tensor]:
        """A skipped step's (x0, eps): the last noise estimate at the current sample (SADA's epsilon reuse), or x0
        extrapolated in time through the last three model calls ("lagrange"); on a flow model the velocity
        extrapolated linearly, 2 v_{n-1} - v_{n-2}."""
        if self._flow:
            velocity = 2 * self._drift(i - 1, history) - self._drift(i - 2, history)
            return self.solver.predict(i, x, velocity, kind="flow")
        if self.estimator == "lagrange":
            called = [n for n in range(len(history)) if history.model_called[n]][-3:]
            if len(called) == 3:
                return self.solver.predict(i, x, _lagrange(self.solver.timesteps, called, history.x0, i),
                                           kind="sample")
        return self.solver.predict(i, x, history.eps[-1], kind="epsilon")

    def stats(self) -> dict:
        per_trajectory = max(self.trajectories, 1)
        return {**super().stats(), "skipped_steps": self.skipped / per_trajectory,
                "partial_steps": self.partial / per_trajectory}




def _lagrange(timesteps, nodes: list[int], values: list[torch.Tensor], i: int) -> torch.Tensor:
    """The polynomial through (timesteps[n], values[n]) for n in nodes, evaluated at timesteps[i]."""
    t = [float(timesteps[n]) for n in nodes]
    at = float(timesteps[i])
    total = torch.zeros_like(values[nodes[0]])
    for j, n in enumerate(nodes):
        weight = 1.0
        for k in range(len(nodes)):
            if k != j:
                weight *= (at - t[k]) / (t[j] - t[k])
        total = total + weight * values[n]
    return total


def _check_options(threshold, window, max_consecutive, tokenwise, token_threshold, max_partial, estimate) -> None:
    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    def count(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    problems = []
    if not number(threshold):
        problems.append(f"threshold must be a number, got {threshold!r}")
    if token_threshold is not None and not number(token_threshold):
        problems.append(f"token_threshold must be a number, got {token_threshold!r}")
    if (not isinstance(window, (tuple, list)) or len(window) != 2 or not all(map(number, window))
            or not 0 <= window[0] < window[1] <= 1):
        problems.append(f"window must be two fractions of the trajectory, 0 <= lo < hi <= 1, got {window!r}")
    if not count(max_consecutive) or max_consecutive < 1:
        problems.append(f"max_consecutive must be an integer >= 1, got {max_consecutive!r}")
    if not count(max_partial) or max_partial < 0:
        problems.append(f"max_partial must be an integer >= 0, got {max_partial!r}")
    if not isinstance(tokenwise, bool):
        problems.append(f"tokenwise must be true or false, got {tokenwise!r}")
    if estimate not in ("eps", "lagrange"):
        problems.append(f"estimate must be 'eps' or 'lagrange', got {estimate!r}")
    if problems:
        raise ValueError("SADA: " + "; ".join(problems))
