"""Flow matching: the Euler solver over a shifted sigma schedule, as diffusers' FlowMatchEulerDiscreteScheduler.

The model predicts a velocity v = dx/dsigma along x_sigma = (1 - sigma) x0 + sigma * noise, so
v = noise - x0, and a step is x <- x + (sigma_next - sigma) v. The split of every rtdiff solver holds:
`predict` turns a velocity into the (x0, eps) pair accelerators and the history work with (x0 = x - sigma v,
eps = x + (1 - sigma) v; v = eps - x0 again), and `step` integrates from the history, so a step SADA skips is
integrated like any other. The model is called with t = sigma * num_train_timesteps, a float.

The timestep shift (sigma' = shift sigma / (1 + (shift - 1) sigma)) and a terminal stretch
(`shift_terminal`) follow diffusers; resolution-dependent dynamic shifting, Karras / exponential / beta
sigmas, inverted sigmas and stochastic sampling are refused by name. The tests hold whole trajectories to
diffusers' scheduler within 1e-5.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from rtdiff.runtime.solvers import History, Solver, read_scheduler_config


@dataclass(frozen=True)
class FlowMatchConfig:
    num_train_timesteps: int = 1000
    shift: float = 1.0
    shift_terminal: float | None = None
    prediction_type: str = "flow"

    def __post_init__(self):
        if self.num_train_timesteps < 1:
            raise ValueError("num_train_timesteps must be positive")
        if not self.shift > 0:
            raise ValueError(f"shift must be positive, got {self.shift}")
        if self.shift_terminal is not None and not 0 < self.shift_terminal < 1:
            raise ValueError(f"shift_terminal must be in (0, 1), got {self.shift_terminal}")

    @classmethod
    def from_dict(cls, config: dict) -> FlowMatchConfig:
        """A diffusers FlowMatchEulerDiscreteScheduler config; options rtdiff does not implement are refused."""
        unsupported = {"use_dynamic_shifting": False, "invert_sigmas": False, "use_karras_sigmas": False,
                       "use_exponential_sigmas": False, "use_beta_sigmas": False, "stochastic_sampling": False}
        for key, default in unsupported.items():
            if config.get(key, default) != default:
                raise ValueError(f"flow-matching option {key}={config[key]!r} is not supported by rtdiff")
        known = {f.name for f in fields(cls)} - {"prediction_type"}
        return cls(**{key: value for key, value in config.items() if key in known})

    @classmethod
    def from_file(cls, path: str | Path) -> FlowMatchConfig:
        return cls.from_dict(read_scheduler_config(path))


class FlowMatchEuler(Solver):
    name = "flow"
    timestep_dtype = torch.float32

    def __init__(self, config: FlowMatchConfig, steps: int):  # noqa: super().__init__ is the VP schedule's
        if not isinstance(config, FlowMatchConfig):
            raise ValueError("the flow solver needs a flow-matching scheduler config (FlowMatchConfig)")
        if steps < 1:
            raise ValueError(f"steps must be positive, got {steps}")
        self.config, self.steps = config, steps
        self.sigmas = self._sigmas()  # steps + 1 values, the last 0
        self.timesteps = [float(s) * config.num_train_timesteps for s in self.sigmas[:-1]]

    def _shift(self, sigmas: np.ndarray) -> np.ndarray:
        shift = self.config.shift
        return shift * sigmas / (1 + (shift - 1) * sigmas)

    def _sigmas(self) -> torch.Tensor:
        # diffusers: the training grid's sigmas are shifted once, the inference grid spans them and is shifted again
        n = self.config.num_train_timesteps
        train = self._shift(np.linspace(1, n, n, dtype=np.float32)[::-1].copy() / n)
        sigma_max, sigma_min = float(train[0]), float(train[-1])
        sigmas = np.linspace(sigma_max * n, sigma_min * n, self.steps) / n
        sigmas = self._shift(sigmas)
        if self.config.shift_terminal is not None:
            one_minus = 1 - sigmas
            sigmas = 1 - one_minus / (one_minus[-1] / (1 - self.config.shift_terminal))
        sigmas = torch.from_numpy(np.asarray(sigmas)).to(torch.float32)
        return torch.cat([sigmas, torch.zeros(1)])

    def predict(self, i: int, x: torch.Tensor, model_output: torch.Tensor,
                kind: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) from a velocity (kind "flow", the default) or from an eps estimate (kind "epsilon")."""
        sigma = self.sigmas[i].to(x.dtype)
        kind = kind or "flow"
        if kind == "flow":
            velocity = model_output
        elif kind == "epsilon":  # eps = x + (1 - sigma) v
            velocity = (model_output - x) / (1 - sigma)
        else:
            raise ValueError(f"the flow solver takes a velocity or an eps estimate, not {kind!r}")
        return x - sigma * velocity, x + (1 - sigma) * velocity

    def level(self, i):
        sigma = float(self.sigmas[i + 1])
        return 1.0 - sigma, sigma

    def velocity(self, history: History, n: int = -1) -> torch.Tensor:
        return history.eps[n] - history.x0[n]

    def step(self, i, x, history, generator=None):
        dt = self.sigmas[i + 1] - self.sigmas[i]
        # as diffusers: the update in float32, then back to the model's dtype
        return (x.to(torch.float32) + dt * self.velocity(history).to(torch.float32)).to(x.dtype)
