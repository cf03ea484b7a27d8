"""The log-mel spectrogram every audio part agrees on: the VAE's input and output, the vocoder's input, the metrics.

MusicLDM's (AudioLDM's) convention: 16 kHz, 1024-point STFT magnitude with a
1024 Hann window and hop 160 (10 ms), padded so that a clip of N x 160 samples
has exactly N frames, 64 Slaney mel bands from 0 to 8 kHz, natural log with
the magnitude clamped at 1e-5 (so silence is log(1e-5) = -11.5).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

SAMPLE_RATE = 16_000
N_FFT = 1024
HOP = 160
MEL_BINS = 64
F_MAX = 8000.0
LOG_FLOOR = 1e-5


@functools.cache
def mel_filters(sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT, bins: int = MEL_BINS,
                f_max: float = F_MAX) -> torch.Tensor:
    import librosa

    return torch.from_numpy(librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=bins, fmin=0.0, fmax=f_max)).float()


def log_mel(wave: torch.Tensor) -> torch.Tensor:
    """(B, samples) -> (B, frames, MEL_BINS) with frames = samples // HOP; differentiable."""
    pad = (N_FFT - HOP) // 2
    padded = F.pad(wave[:, None], (pad, pad + (N_FFT - HOP) % 2), mode="reflect")[:, 0]
    spectrum = torch.stft(padded, N_FFT, HOP, N_FFT, torch.hann_window(N_FFT, device=wave.device), center=False,
                          return_complex=True).abs()
    mel = mel_filters().to(wave.device) @ spectrum
    return torch.log(torch.clamp(mel, min=LOG_FLOOR)).transpose(1, 2)
