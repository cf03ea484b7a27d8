"""Fidelity of accelerated music against the unaccelerated output from the same seed.

Every function takes (reference, candidate) and returns one float per batch row.

- `mel_psnr`: 10 log10(peak^2 / MSE) on the log-mel, the peak being the
  reference log-mel's range (max - min, per clip), so the figure does not
  depend on the log floor or the units of the spectrogram. (SADA's image PSNR
  uses peak 2 on [-1, 1], which is that same convention for images.)
- `mel_ssim`: SSIM on the log-mel with an 11 x 11 Gaussian window (sigma 1.5), the
  reference's range as the data range (Wang et al. 2004's constants).
- `log_spectral_distance`: between the waveforms' power spectra (1024-point
  STFT, hop 256), in dB: per frame the RMS over frequency of the dB difference,
  averaged over frames.
- `stft_distance`: multi-resolution STFT distance of the waveforms: spectral
  convergence plus log-magnitude L1 at FFT sizes 512, 1024 and 2048 (the loss
  of Parallel WaveGAN, also the vocoder's training loss).

Seams of a streamed clip (`seam_flux`): spectral flux, the mean over mel bins
of each frame's rise over the frame before (log-mel, negative changes
counted as 0), near the frames where chunks join against everywhere else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

STFT_RESOLUTIONS = ((512, 128), (1024, 256), (2048, 512))  # (n_fft, hop)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(B, frames, bins) from (B, 1, frames, bins) or (frames, bins)."""
    x = x.float()
    if x.dim() == 4:
        x = x[:, 0]
    return x[None] if x.dim() == 2 else x


def mel_psnr(reference: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    reference, candidate = _rows(reference), _rows(candidate)
    peak = reference.flatten(1).amax(1) - reference.flatten(1).amin(1)
    mse = (reference - candidate).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(peak.pow(2) / mse.clamp(min=1e-20))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-coords.pow(2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def mel_ssim(reference: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    reference, candidate = _rows(reference)[:, None], _rows(candidate)[:, None]
    data_range = (reference.flatten(1).amax(1) - reference.flatten(1).amin(1)).view(-1, 1, 1, 1)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    size = min(11, reference.shape[-2], reference.shape[-1])  # smaller grids (tiny test models): a smaller window
    window = _gaussian_window(size - (size % 2 == 0))
    mu_x, mu_y = F.conv2d(reference, window), F.conv2d(candidate, window)
    var_x = F.conv2d(reference * reference, window) - mu_x**2
    var_y = F.conv2d(candidate * candidate, window) - mu_y**2
    cov = F.conv2d(reference * candidate, window) - mu_x * mu_y
    ssim = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim.flatten(1).mean(1)


def _magnitude(wave: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    wave = wave.float()
    wave = wave[None] if wave.dim() == 1 else wave
    return torch.stft(wave, n_fft, hop, window=torch.hann_window(n_fft), return_complex=True).abs()


def log_spectral_distance(reference: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    ref_db = 10 * torch.log10(_magnitude(reference, 1024, 256).pow(2).clamp(min=1e-10))
    cand_db = 10 * torch.log10(_magnitude(candidate, 1024, 256).pow(2).clamp(min=1e-10))
    return (ref_db - cand_db).pow(2).mean(1).sqrt().mean(1)


def stft_distance(reference: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    total = 0.0
    for n_fft, hop in STFT_RESOLUTIONS:
        a = _magnitude(reference, n_fft, hop).clamp(min=1e-7)
        b = _magnitude(candidate, n_fft, hop).clamp(min=1e-7)
        convergence = torch.linalg.norm((a - b).flatten(1), dim=1) / torch.linalg.norm(a.flatten(1), dim=1)
        total = total + convergence + (a.log() - b.log()).abs().flatten(1).mean(1)
    return total


def fidelity(reference, candidate) -> dict[str, float]:
    """Every metric, averaged over the batch: `reference` and `candidate` are Generations (audio/pipeline.py)."""
    return {"mel_psnr_db": float(mel_psnr(reference.mel, candidate.mel).mean()),
            "mel_ssim": float(mel_ssim(reference.mel, candidate.mel).mean()),
            "lsd_db": float(log_spectral_distance(reference.wave, candidate.wave).mean()),
            "mr_stft": float(stft_distance(reference.wave, candidate.wave).mean())}


def spectral_flux(mel: torch.Tensor) -> torch.Tensor:
    """(frames, bins) log-mel -> (frames - 1,): flux of the transition into each frame from the one before."""
    return torch.relu(mel[1:] - mel[:-1]).mean(dim=1)


def seam_flux(mel: torch.Tensor, boundaries: list[int], radius: int = 2) -> dict[str, float]:
    """Spectral flux at the transitions within `radius` frames of a chunk boundary (the frame index where a
    chunk begins) against at all other transitions; `ratio` is boundary over within (1: seams flux as much as
    the music does anywhere)."""
    if not boundaries:
        raise ValueError("no chunk boundaries to measure")
    flux = spectral_flux(mel)
    near = torch.zeros(flux.shape[0], dtype=torch.bool)
    for b in boundaries:  # transition t goes from frame t to frame t + 1; the one into frame b is t = b - 1
        near[max(0, b - 1 - radius):min(flux.shape[0], b + radius)] = True
    if near.all():
        raise ValueError("boundaries closer than the radius everywhere: nothing within chunks to compare with")
    boundary, within = float(flux[near].mean()), float(flux[~near].mean())
    return {"boundary": boundary, "within": within, "ratio": boundary / within, "boundaries": len(boundaries),
            "radius_frames": radius}

