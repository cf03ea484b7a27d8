"""CPU training of a diffusion policy on demonstrations, with EMA weights.

Samples are windows of `horizon` steps cut from each episode with Diffusion
Policy's padding (the first observation repeated `n_obs_steps - 1` times before
the start, the last action repeated `n_action_steps - 1` times after the end),
so every step of every demonstration is a possible "now". The loss is the
usual denoising MSE on the prediction type the scheduler names.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rtdiff.policies.config import PolicyConfig
from rtdiff.policies.modeling import DiffusionPolicy
from rtdiff.runtime.solvers import alphas_cumprod
from rtdiff.sims.demos import Demos


@dataclass
class TrainConfig:
    steps: int = 4000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-6
    warmup_steps: int = 200
    ema_power: float = 0.75  # Diffusion Policy's EMA warm-up: decay = 1 - (1 + step) ** -power
    ema_max_decay: float = 0.9999
    seed: int = 0
    threads: int = 2


def windows(demos: Demos, config: PolicyConfig) -> tuple[np.ndarray, np.ndarray]:
    """(obs (N, n_obs_steps, obs_dim), actions (N, horizon, action_dim)) for every padded window."""
    pad_before, pad_after = config.n_obs_steps - 1, config.n_action_steps - 1
    obs_windows, action_windows = [], []
    for k in range(demos.episodes):
        obs, actions = demos.episode(k)
        length = len(actions)
        for start in range(-pad_before, length - config.horizon + pad_after + 1):
            index = np.clip(np.arange(start, start + config.horizon), 0, length - 1)
            obs_windows.append(obs[index[: config.n_obs_steps]])
            action_windows.append(actions[index])
    return np.stack(obs_windows).astype(np.float32), np.stack(action_windows).astype(np.float32)


def training_target(prediction_type: str, x0, noise, a_t):
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    return a_t.sqrt() * noise - (1 - a_t).sqrt() * x0  # v


def train(demos: Demos, config: PolicyConfig, train_config: TrainConfig, progress: bool = True,
          init: DiffusionPolicy | None = None) -> tuple[DiffusionPolicy, dict]:
    """Train from scratch, or go on from `init` (its weights and normalisers; its config must be `config`)."""
    from tqdm import tqdm

    torch.manual_seed(train_config.seed)
    torch.set_num_threads(train_config.threads)
    generator = torch.Generator().manual_seed(train_config.seed)
    obs, actions = (torch.from_numpy(a) for a in windows(demos, config))
    if init is None:
        policy = DiffusionPolicy(config)
        policy.obs_normalizer.fit(obs)
        policy.action_normalizer.fit(actions)
    elif init.config != config:
        raise ValueError(f"cannot go on from a checkpoint with another config: {init.config} is not {config}")
    else:
        policy = copy.deepcopy(init).requires_grad_(True)  # a trained policy may come frozen (an EMA copy)
    obs, actions = policy.obs_normalizer.normalize(obs), policy.action_normalizer.normalize(actions)
    ema = copy.deepcopy(policy).eval().requires_grad_(False)

    a_bar = alphas_cumprod(config.scheduler).float()
    model = policy.denoiser.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_config.lr, weight_decay=train_config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _cosine_with_warmup(step, train_config))
    losses, start = [], time.perf_counter()
    bar = tqdm(range(train_config.steps), desc=f"train {config.arch}", unit="step", disable=not progress)
    for step in bar:
        index = torch.randint(len(actions), (train_config.batch_size,), generator=generator)
        x0, cond = actions[index], obs[index]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(config.scheduler.num_train_timesteps, (len(index),), generator=generator)
        a_t = a_bar[t][:, None, None]
        x_t = a_t.sqrt() * x0 + (1 - a_t).sqrt() * noise
        loss = nn.functional.mse_loss(model(x_t, t, cond), training_target(config.scheduler.prediction_type, x0, noise, a_t))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        _ema_update(ema, policy, _ema_decay(step, train_config))
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    report = {
        "windows": len(actions),
        "steps": train_config.steps,
        "final_loss": float(np.mean(losses[-max(len(losses) // 10, 1):])),  # the last tenth of training
        "train_seconds": round(time.perf_counter() - start, 1),
        "parameters": sum(p.numel() for p in policy.denoiser.parameters()),
    }
    return ema, report


def _cosine_with_warmup(step: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(config.steps - config.warmup_steps, 1)
    return 0.5 * (1 + math.cos(math.pi * progress))


def _ema_decay(step: int, config: TrainConfig) -> float:
    return min(1 - (1 + step) ** -config.ema_power, config.ema_max_decay)


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for ema_param, param in zip(ema.parameters(), model.parameters()):
        ema_param.lerp_(param, 1 - decay)
    for ema_buffer, buffer in zip(ema.buffers(), model.buffers()):
        ema_buffer.copy_(buffer)
