"""Stability-guided step skipping after SADA (Jiang et al., ICML 2025, arXiv 2507.17135).

The criterion reads the trajectory the solver has already produced. With the
probability-flow drift of the VP ODE at each past step,

    f_n = -1/2 beta(tau_n) x_n + 1/2 beta(tau_n) / sigma_n * eps_n     (tau = t / N)

a multistep extrapolation x^_{n+1} = x_n + dtau_n (0.625 f_n + 0.75 f_{n-1} - 0.375 f_{n-2})
is compared with the sample the solver actually reached, and the residual
r = x_{n+1} - x^_{n+1} with the drift's second difference d2f = f_n - 2 f_{n-1} + f_{n-2}.
Where mean(r * d2f) <= threshold the trajectory is stable: the next step runs no
model and the solver integrates it from the last noise estimate at the current
sample (SADA's epsilon reuse). Skips happen only inside a window of the
trajectory and never more than `max_consecutive` in a row.

The decision is made for the whole batch: a step is skipped only when every
trajectory in it is stable, so batching requests never changes the answer for
the worse. (SADA's code asserts batch size 1.)
"""

from __future__ import annotations

import torch

from runtime.accel.base import FULL, SKIP, Accelerator
from runtime.solvers import History


class StabilitySkip(Accelerator):
    name = "sada"

    def __init__(self, threshold: float = 0.0, window: tuple[float, float] = (0.2, 0.94), max_consecutive: int = 1):
        super().__init__()
        if max_consecutive < 1:
            raise ValueError("max_consecutive must be >= 1")
        self.threshold = threshold
        self.window = window
        self.max_consecutive = max_consecutive
        self.skipped = 0

    def plan_step(self, i: int, x: torch.Tensor, history: History) -> str:
        steps = len(self.solver.timesteps)
        if not (self.window[0] * steps <= i < self.window[1] * steps) or i < 3:
            return FULL
        if len(history.model_called) >= self.max_consecutive and not any(history.model_called[-self.max_consecutive:]):
            return FULL
        if self.stability_score(i, x, history).max() > self.threshold:
            return FULL
        self.skipped += 1
        return SKIP

    def stability_score(self, i: int, x: torch.Tensor, history: History) -> torch.Tensor:
        """mean(r * d2f) per trajectory in the batch, for the step from i-1 to i."""
        f = [self._drift(n, history.samples[n], history.eps[n]) for n in (i - 1, i - 2, i - 3)]
        dtau = (self.solver.timesteps[i] - self.solver.timesteps[i - 1]) / self.solver.config.num_train_timesteps
        predicted = history.samples[i - 1] + dtau * (0.625 * f[0] + 0.75 * f[1] - 0.375 * f[2])
        residual = x - predicted
        curvature = f[0] - 2 * f[1] + f[2]
        return (residual * curvature).flatten(1).mean(1)

    def _drift(self, n: int, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        t = self.solver.timesteps[n]
        a_t, a_prev = self.solver.alpha_bar(t), self.solver.alpha_bar(t - 1)
        beta = self.solver.config.num_train_timesteps * (1 - a_t / a_prev)  # continuous-time beta(tau)
        sigma = (1 - a_t).sqrt()
        return (-0.5 * beta * x + 0.5 * beta / sigma * eps).to(x.dtype)

    def estimate(self, i: int, x: torch.Tensor, history: History) -> tuple[torch.Tensor, torch.Tensor]:
        return self.solver.predict(i, x, history.eps[-1], kind="epsilon")

    def stats(self) -> dict:
        return {**super().stats(), "skipped_steps": self.skipped / max(self.trajectories, 1)}
