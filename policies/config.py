"""Policy configuration: shapes, horizons, architecture and noise schedule, stored as config.json."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from rtdiff.runtime.solvers import SchedulerConfig

FORMAT = "rtdiff-policy/1"
ARCHITECTURES = ("unet", "transformer")


@dataclass
class PolicyConfig:
    arch: str = "unet"
    task: str = "pusht"  # the simulated task it was trained for (sims/tasks.py)
    obs_dim: int = 5
    action_dim: int = 2
    # Horizons as in Diffusion Policy: the chunk covers `horizon` steps starting `n_obs_steps - 1`
    # steps in the past; `n_action_steps` of it, from the current step on, are executed.
    n_obs_steps: int = 2
    horizon: int = 16
    n_action_steps: int = 8
    # UNet
    down_dims: tuple[int, ...] = (32, 64, 128)  # Diffusion Policy's is (256, 512, 1024); PushT state needs far less
    kernel_size: int = 5
    n_groups: int = 8
    diffusion_step_embed_dim: int = 128
    use_film_scale_modulation: bool = True
    # Transformer
    n_layer: int = 4
    n_head: int = 4
    n_emb: int = 128
    p_drop: float = 0.0
    causal_attn: bool = True
    adaln: bool = False  # adaLN-Zero modulation from (step, observations) on every sub-block; False: Diffusion Policy's
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    # the solver a run uses when the user names none: the checkpoint's own (LeRobot's noise_scheduler_type and
    # num_inference_steps); rtdiff's bundled policies are documented and measured at DDIM 10
    default_solver: str = "ddim"
    default_steps: int = 10

    def __post_init__(self):
        if isinstance(self.scheduler, dict):
            self.scheduler = SchedulerConfig.from_dict(self.scheduler)
        self.down_dims = tuple(self.down_dims)
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown policy arch {self.arch!r}; expected one of {ARCHITECTURES}")
        if self.n_obs_steps - 1 + self.n_action_steps > self.horizon:
            raise ValueError("n_obs_steps - 1 + n_action_steps must not exceed horizon")
        if self.arch == "unet" and self.horizon % 2 ** (len(self.down_dims) - 1):
            raise ValueError(f"horizon {self.horizon} must be divisible by 2^(len(down_dims) - 1)")

    def to_dict(self) -> dict:
        payload = asdict(self)
        payload["scheduler"] = self.scheduler.to_dict()
        return {"format": FORMAT, **payload}

    @classmethod
    def from_dict(cls, payload: dict) -> PolicyConfig:
        if payload.get("format") != FORMAT:
            raise ValueError(f"not an rtdiff policy config (format {payload.get('format')!r}, expected {FORMAT!r})")
        known = {f.name for f in fields(cls)}
        unknown = set(payload) - known - {"format"}
        if unknown:
            raise ValueError(f"unknown policy config keys: {sorted(unknown)}")
        return cls(**{k: v for k, v in payload.items() if k in known})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")
