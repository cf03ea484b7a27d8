"""The 1-D conditional UNet of Diffusion Policy.

Temporal convolutions over the action sequence, FiLM-conditioned in every
residual block on the diffusion-step embedding and the flattened observation
history. Parameter names follow LeRobot's `DiffusionConditionalUnet1d`, so a
LeRobot checkpoint loads after stripping its `diffusion.unet.` prefix.
"""

from __future__ import annotations

import torch
from torch import nn

from rtdiff.policies.config import PolicyConfig
from rtdiff.policies.embeddings import SinusoidalPosEmb
from rtdiff.runtime.accel.hooks import CacheBlock


class Conv1dBlock(nn.Module):
    """Conv1d -> GroupNorm -> Mish."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, n_groups: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv1d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
            nn.GroupNorm(n_groups, out_channels),
            nn.Mish(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class ConditionalResidualBlock1d(nn.Module):
    """Two conv blocks with FiLM (per-channel scale and bias from the condition) between them."""

    def __init__(self, in_channels, out_channels, cond_dim, kernel_size, n_groups, film_scale: bool):
        super().__init__()
        self.out_channels = out_channels
        self.film_scale = film_scale
        self.conv1 = Conv1dBlock(in_channels, out_channels, kernel_size, n_groups)
        self.cond_encoder = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, out_channels * (2 if film_scale else 1)))
        self.conv2 = Conv1dBlock(out_channels, out_channels, kernel_size, n_groups)
        self.residual_conv = nn.Conv1d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        film = self.cond_encoder(cond).unsqueeze(-1)
        if self.film_scale:
            out = film[:, : self.out_channels] * out + film[:, self.out_channels :]
        else:
            out = out + film
        return self.conv2(out) + self.residual_conv(x)


class ConditionalUnet1d(nn.Module):
    prediction_type = "epsilon"

    def __init__(self, config: PolicyConfig):
        super().__init__()
        self.prediction_type = config.scheduler.prediction_type
        step_dim = config.diffusion_step_embed_dim
        cond_dim = step_dim + config.obs_dim * config.n_obs_steps

        def block(cin, cout):
            return ConditionalResidualBlock1d(
                cin, cout, cond_dim, config.kernel_size, config.n_groups, config.use_film_scale_modulation
            )

        self.diffusion_step_encoder = nn.Sequential(
            SinusoidalPosEmb(step_dim), nn.Linear(step_dim, step_dim * 4), nn.Mish(), nn.Linear(step_dim * 4, step_dim)
        )
        dims = config.down_dims
        in_out = [(config.action_dim, dims[0]), *zip(dims[:-1], dims[1:])]
        self.down_modules = nn.ModuleList()
        for k, (cin, cout) in enumerate(in_out):
            last = k == len(in_out) - 1
            downsample = nn.Identity() if last else nn.Conv1d(cout, cout, 3, 2, 1)
            self.down_modules.append(nn.ModuleList([block(cin, cout), block(cout, cout), downsample]))
        self.mid_modules = nn.ModuleList([block(dims[-1], dims[-1]), block(dims[-1], dims[-1])])
        self.up_modules = nn.ModuleList()
        for k, (cout, cin) in enumerate(reversed(in_out[1:])):
            last = k == len(in_out) - 1  # LeRobot's test; never true here, so every up stage upsamples
            upsample = nn.Identity() if last else nn.ConvTranspose1d(cout, cout, 4, 2, 1)
            self.up_modules.append(nn.ModuleList([block(cin * 2, cout), block(cout, cout), upsample]))
        self.final_conv = nn.Sequential(
            # 8 groups whatever n_groups says: Diffusion Policy and LeRobot build the final block with the default.
            Conv1dBlock(dims[0], dims[0], config.kernel_size, n_groups=8), nn.Conv1d(dims[0], config.action_dim, 1)
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        """x (B, horizon, action_dim), t (B,), obs (B, n_obs_steps, obs_dim), normalised -> (B, horizon, action_dim)."""
        features = torch.cat([self.diffusion_step_encoder(t), obs.flatten(1)], dim=-1)
        x = x.transpose(1, 2)
        skips = []
        for block1, block2, downsample in self.down_modules:
            x = block2(block1(x, features), features)
            skips.append(x)
            x = downsample(x)
        for block in self.mid_modules:
            x = block(x, features)
        for block1, block2, upsample in self.up_modules:
            x = torch.cat([x, skips.pop()], dim=1)
            x = upsample(block2(block1(x, features), features))
        return self.final_conv(x).transpose(1, 2)

    def cache_blocks(self) -> list[CacheBlock]:
        """The residual blocks in execution order: each one's output can stand in for a later step's."""
        return [
            CacheBlock(name, module, "resolution_stage")
            for name, module in self.named_modules()
            if isinstance(module, ConditionalResidualBlock1d)
        ]
