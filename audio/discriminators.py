"""Waveform discriminators for training the vocoder adversarially, in the manner of HiFi-GAN.

Trained on spectral losses alone, the vocoder lets a held tone flutter at 15-20 Hz
(benchmarks/RESULTS.md): an error that moves little spectral energy but is plain
to anything that looks at the waveform's periodic structure. Two families look:
one folds the wave by a prime period and convolves along the folds (it sees
whether the wave repeats as it should), one convolves the wave at three time
scales. Only training uses them; nothing ships but the generator.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

PERIODS = (2, 3, 5, 7, 11)
SLOPE = 0.1


class PeriodDiscriminator(nn.Module):
    def __init__(self, period: int, channels: tuple[int, ...] = (16, 32, 64, 64)):
        super().__init__()
        self.period = period
        widths = (1, *channels)
        self.convs = nn.ModuleList(
            nn.utils.parametrizations.weight_norm(nn.Conv2d(a, b, (5, 1), (3 if i < len(channels) - 1 else 1, 1),
                                                            padding=(2, 0)))
            for i, (a, b) in enumerate(zip(widths, widths[1:])))
        self.out = nn.utils.parametrizations.weight_norm(nn.Conv2d(widths[-1], 1, (3, 1), padding=(1, 0)))

    def forward(self, wave: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = wave[:, None]
        remainder = x.shape[-1] % self.period
        if remainder:
            x = F.pad(x, (0, self.period - remainder), mode="reflect")
        return _layers(self.convs, self.out, x.unflatten(-1, (-1, self.period)))  # (B, 1, T / period, period)


class ScaleDiscriminator(nn.Module):
    def __init__(self, channels: tuple[int, ...] = (16, 32, 64, 64)):
        super().__init__()
        widths = (1, *channels)
        shapes = [(15, 1, 1)] + [(41, 4, 4)] * (len(channels) - 2) + [(5, 1, 1)]  # kernel, stride, groups
        self.convs = nn.ModuleList(
            nn.utils.parametrizations.weight_norm(nn.Conv1d(a, b, k, s, padding=k // 2, groups=g if a % g == 0 else 1))
            for (a, b), (k, s, g) in zip(zip(widths, widths[1:]), shapes))
        self.out = nn.utils.parametrizations.weight_norm(nn.Conv1d(widths[-1], 1, 3, padding=1))

    def forward(self, wave: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return _layers(self.convs, self.out, wave[:, None])


def _layers(convs: nn.ModuleList, out: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(logits, every layer's activations): the activations are what feature matching compares."""
    features = []
    for conv in convs:
        x = F.leaky_relu(conv(x), SLOPE)
        features.append(x)
    x = out(x)
    features.append(x)
    return x.flatten(1), features


class WaveDiscriminators(nn.Module):
    """Every period and scale discriminator; `forward` gives each one's (logits, features)."""

    def __init__(self, periods: tuple[int, ...] = PERIODS, scales: int = 3):
        super().__init__()
        self.periods = nn.ModuleList(PeriodDiscriminator(p) for p in periods)
        self.scales = nn.ModuleList(ScaleDiscriminator() for _ in range(scales))

    def forward(self, wave: torch.Tensor) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
        outputs = [d(wave) for d in self.periods]
        for index, d in enumerate(self.scales):
            outputs.append(d(F.avg_pool1d(wave[:, None], 2 ** index, 2 ** index)[:, 0] if index else wave))
        return outputs


def discriminator_loss(real, fake) -> torch.Tensor:
    """Least squares, as HiFi-GAN: real toward 1, generated toward 0."""
    return sum(((1 - r) ** 2).mean() + (f ** 2).mean() for (r, _), (f, _) in zip(real, fake))


def generator_loss(real, fake) -> tuple[torch.Tensor, torch.Tensor]:
    """(adversarial, feature matching): generated toward 1, and each layer's features toward the real wave's."""
    adversarial = sum(((1 - f) ** 2).mean() for f, _ in fake)
    matching = sum(F.l1_loss(g, r.detach()) for (_, rs), (_, gs) in zip(real, fake) for r, g in zip(rs, gs))
    return adversarial, matching
