"""Diffusion solvers: DDPM (ancestral), DDIM (eta 0) and DPM-Solver++ (2M).

Each solver turns a model prediction into a data estimate `x0` and a noise
estimate `eps` (`predict`), and integrates from one timestep to the next given
the history of those estimates (`step`). The split is what accelerators need:
a skipped step supplies its `x0`/`eps` from the history instead of the model,
and the solver integrates it like any other.

Numerics follow diffusers' DDPMScheduler, DDIMScheduler and
DPMSolverMultistepScheduler (the tests hold each to 1e-5 over whole
trajectories), and a diffusers `scheduler_config.json` configures them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@dataclass(frozen=True)
class SchedulerConfig:
    """The training noise schedule and sampling options, named as diffusers names them."""

    num_train_timesteps: int = 100
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "epsilon"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    timestep_spacing: str | None = None  # None: each solver's diffusers default
    steps_offset: int = 0
    set_alpha_to_one: bool = True

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {self.prediction_type!r}; expected one of {PREDICTION_TYPES}")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"unknown beta_schedule {self.beta_schedule!r}; expected one of {BETA_SCHEDULES}")
        if self.timestep_spacing not in (None, *TIMESTEP_SPACINGS):
            raise ValueError(f"unknown timestep_spacing {self.timestep_spacing!r}; expected one of {TIMESTEP_SPACINGS}")
        if self.num_train_timesteps < 1:
            raise ValueError("num_train_timesteps must be positive")

    @classmethod
    def from_dict(cls, config: dict) -> SchedulerConfig:
        """Accepts a diffusers scheduler config; options rtdiff does not implement are refused, not ignored."""
        unsupported = {
            "thresholding": False,
            "trained_betas": None,
            "variance_type": "fixed_small",
            "use_karras_sigmas": False,
            "use_exponential_sigmas": False,
            "use_beta_sigmas": False,
            "use_lu_lambdas": False,
            "rescale_betas_zero_snr": False,
        }
        for key, default in unsupported.items():
            if config.get(key, default) != default:
                raise ValueError(f"scheduler option {key}={config[key]!r} is not supported by rtdiff")
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in config.items() if key in known})

    @classmethod
    def from_file(cls, path: str | Path) -> SchedulerConfig:
        return cls.from_dict(read_scheduler_config(path))

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def read_scheduler_config(path: str | Path) -> dict:
    """A diffusers `scheduler_config.json` (or the folder holding one) as a dict."""
    path = Path(path)
    if path.is_dir():
        path = path / "scheduler_config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"scheduler config not found: {path}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"scheduler config {path} is not valid JSON: {error}") from None


def alphas_cumprod(config: SchedulerConfig) -> torch.Tensor:
    """Cumulative products of (1 - beta), computed in float32 as diffusers does, returned as float64."""
    n = config.num_train_timesteps
    if config.beta_schedule == "linear":
        betas = torch.linspace(config.beta_start, config.beta_end, n, dtype=torch.float32)
    elif config.beta_schedule == "scaled_linear":
        betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=torch.float32) ** 2
    else:  # squaredcos_cap_v2: the cosine schedule of Nichol & Dhariwal, betas capped at 0.999

        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = torch.tensor([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)],
                             dtype=torch.float32)
    return torch.cumprod(1.0 - betas, dim=0).double()


@dataclass
class History:
    """What the solver has seen so far along one trajectory: one entry per completed step."""

    timesteps: list[int] = field(default_factory=list)
    samples: list[torch.Tensor] = field(default_factory=list)  # x_t at each step, before the step
    x0: list[torch.Tensor] = field(default_factory=list)
    eps: list[torch.Tensor] = field(default_factory=list)
    model_called: list[bool] = field(default_factory=list)

    def append(self, t: int, x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, model_called: bool = True) -> None:
        self.timesteps.append(t)
        self.samples.append(x)
        self.x0.append(x0)
        self.eps.append(eps)
        self.model_called.append(model_called)

    def __len__(self) -> int:
        return len(self.timesteps)


class Solver:
    """A discrete-time solver over a fixed timestep sequence; subclasses define spacing and update."""

    name = ""
    default_spacing = "leading"
    timestep_dtype = torch.long  # what the model is called with (flow matching: float sigmas * T)

    def __init__(self, config: SchedulerConfig, steps: int):
        if not 1 <= steps <= config.num_train_timesteps:
            raise ValueError(f"steps must be in [1, {config.num_train_timesteps}], got {steps}")
        self.config = config
        self.steps = steps
        self.alphas_cumprod = alphas_cumprod(config)
        self.timesteps = [int(t) for t in self._timesteps(config.timestep_spacing or self.default_spacing)]

    def _timesteps(self, spacing: str) -> np.ndarray:
        T, n = self.config.num_train_timesteps, self.steps
        if spacing == "linspace":
            return np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
        if spacing == "leading":
            return (np.arange(0, n) * (T // n)).round()[::-1].astype(np.int64) + self.config.steps_offset
        return np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1

    def alpha_bar(self, t: int) -> torch.Tensor:
        return self.alphas_cumprod[t] if t >= 0 else torch.tensor(1.0, dtype=torch.float64)

    def predict(self, i: int, x: torch.Tensor, model_output: torch.Tensor,
                kind: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) implied by the model's output at step i; x0 clipped if configured, eps from the raw output.

        `kind` overrides the config's prediction type: an accelerator that estimates eps passes "epsilon".
        """
        a = self.alpha_bar(self.timesteps[i])
        sqrt_a, sqrt_b = a.sqrt().to(x.dtype), (1 - a).sqrt().to(x.dtype)
        kind = kind or self.config.prediction_type
        if kind == "epsilon":
            eps = model_output
            x0 = (x - sqrt_b * eps) / sqrt_a
        elif kind == "sample":
            x0 = model_output
            eps = (x - sqrt_a * x0) / sqrt_b
        else:  # v_prediction
            x0 = sqrt_a * x - sqrt_b * model_output
            eps = sqrt_a * model_output + sqrt_b * x
        if self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        return x0, eps

    def step(self, i: int, x: torch.Tensor, history: History, generator: torch.Generator | None = None) -> torch.Tensor:
        """x at timesteps[i+1] (or the final sample) from x at timesteps[i] and the history up to step i."""
        raise NotImplementedError

    def level(self, i: int) -> tuple[float, float]:
        """(alpha, sigma) of the sample this solver holds after step i (i = -1: the initial sample), so that
        alpha * x0 + sigma * noise is a clean `x0` noised to where the trajectory is: what inpainting writes
        into the part of a sample it holds fixed. After the last step, (1, 0)."""
        t = self.timesteps[i + 1] if i + 1 < len(self.timesteps) else -1
        a = self.alpha_bar(t)
        return float(a.sqrt()), float((1 - a).sqrt())


class DDPM(Solver):
    """Ancestral sampling with the posterior variance ("fixed_small")."""

    name = "ddpm"

    def step(self, i, x, history, generator=None):
        t = self.timesteps[i]
        t_prev = self.timesteps[i + 1] if i + 1 < len(self.timesteps) else -1
        a_t, a_prev = self.alpha_bar(t), self.alpha_bar(t_prev)
        alpha_step = a_t / a_prev
        beta_step = 1 - alpha_step
        # Posterior mean of q(x_prev | x_t, x0), DDPM eq. 7.
        x0_coef = (a_prev.sqrt() * beta_step / (1 - a_t)).to(x.dtype)
        x_coef = (alpha_step.sqrt() * (1 - a_prev) / (1 - a_t)).to(x.dtype)
        mean = x0_coef * history.x0[-1] + x_coef * x
        if t <= 0:
            return mean
        variance = ((1 - a_prev) / (1 - a_t) * beta_step).clamp(min=1e-20).to(x.dtype)
        noise = standard_normal(x, generator)
        return mean + variance.sqrt() * noise


def standard_normal(x: torch.Tensor, generator) -> torch.Tensor:
    """Noise shaped like x from one generator, or row by row from a list of them (one per request in a batch,
    so a request's noise does not depend on what it was batched with)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]}")
        return torch.cat([torch.randn((1, *x.shape[1:]), generator=g, dtype=x.dtype, device=x.device)
                          for g in generator])
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


class DDIM(Solver):
    """Deterministic DDIM (eta = 0)."""

    name = "ddim"

    def alpha_bar(self, t):
        if t < 0 and not self.config.set_alpha_to_one:
            return self.alphas_cumprod[0]
        return super().alpha_bar(t)

    def step(self, i, x, history, generator=None):
        # diffusers steps DDIM by T // steps, not to the next listed timestep; the two differ under "linspace".
        t_prev = self.timesteps[i] - self.config.num_train_timesteps // self.steps
        a_prev = self.alpha_bar(t_prev)
        return a_prev.sqrt().to(x.dtype) * history.x0[-1] + (1 - a_prev).sqrt().to(x.dtype) * history.eps[-1]

    def level(self, i):
        if i < 0:
            return super().level(i)
        a = self.alpha_bar(self.timesteps[i] - self.config.num_train_timesteps // self.steps)  # where `step` lands
        return float(a.sqrt()), float((1 - a).sqrt())


class DPMSolverPP(Solver):
    """DPM-Solver++ 2M (midpoint), data prediction, first order at the last step and while history is short."""

    name = "dpmpp"
    default_spacing = "linspace"

    def _timesteps(self, spacing: str) -> np.ndarray:
        # DPM-Solver spaces steps+1 points and drops the last, so its grid differs from DDPM/DDIM's.
        T, n = self.config.num_train_timesteps, self.steps
        if spacing == "linspace":
            return np.linspace(0, T - 1, n + 1).round()[::-1][:-1].astype(np.int64)
        if spacing == "leading":
            return (np.arange(0, n + 1) * (T // (n + 1))).round()[::-1][:-1].astype(np.int64) + self.config.steps_offset
        return np.arange(T, 0, -T / n).round().astype(np.int64) - 1

    def _alpha_sigma(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha_t, sigma_t at grid point i; the point after the last step is clean data (sigma 0)."""
        if i >= len(self.timesteps):
            return torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
        a = self.alpha_bar(self.timesteps[i])
        return a.sqrt(), (1 - a).sqrt()

    def level(self, i):
        alpha, sigma = self._alpha_sigma(i + 1)
        return float(alpha), float(sigma)

    def _lambda(self, i: int) -> torch.Tensor:
        alpha, sigma = self._alpha_sigma(i)
        return alpha.log() - sigma.log()  # +inf at sigma 0, which makes exp(-h) exactly 0

    def step(self, i, x, history, generator=None):
        alpha_t, sigma_t = self._alpha_sigma(i + 1)
        _, sigma_s = self._alpha_sigma(i)
        h = self._lambda(i + 1) - self._lambda(i)
        decay = torch.expm1(-h)  # exp(-h) - 1
        d0 = history.x0[-1]
        last_step = i == len(self.timesteps) - 1
        if len(history) < 2 or last_step:
            return (sigma_t / sigma_s).to(x.dtype) * x - (alpha_t * decay).to(x.dtype) * d0
        r0 = (self._lambda(i) - self._lambda(i - 1)) / h
        d1 = (d0 - history.x0[-2]) / r0.to(x.dtype)
        return (sigma_t / sigma_s).to(x.dtype) * x - (alpha_t * decay).to(x.dtype) * (d0 + 0.5 * d1)


SOLVERS: dict[str, type[Solver]] = {cls.name: cls for cls in (DDPM, DDIM, DPMSolverPP)}
SOLVERS["flow"] = None  # runtime/flow_matching.py: FlowMatchEuler, on a FlowMatchConfig (imported when asked for)


def make_solver(name: str, config, steps: int) -> Solver:
    """The named solver on a noise schedule: a SchedulerConfig for ddpm / ddim / dpmpp, a FlowMatchConfig for flow."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; expected one of {sorted(SOLVERS)}")
    if name == "flow":
        from rtdiff.runtime.flow_matching import FlowMatchEuler

        return FlowMatchEuler(config, steps)
    if not isinstance(config, SchedulerConfig):
        raise ValueError(f"solver {name!r} needs a DDPM-style scheduler config, got {type(config).__name__}")
    return SOLVERS[name](config, steps)
