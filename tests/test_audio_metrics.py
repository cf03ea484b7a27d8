"""The fidelity metrics: identical inputs score perfectly, and worse copies score worse."""

import math

import pytest
import torch

from rtdiff.audio.metrics import log_spectral_distance, mel_psnr, mel_ssim, stft_distance


def test_metrics_rank_copies_by_how_much_they_differ():
    torch.manual_seed(0)
    mel = torch.randn(2, 1, 120, 16).cumsum(1) / 5  # smooth along time, as a spectrogram is
    wave = torch.randn(2, 8000)
    small, large = mel + 0.01 * torch.randn_like(mel), mel + 0.3 * torch.randn_like(mel)
    assert torch.isinf(mel_psnr(mel, mel)).all() or (mel_psnr(mel, mel) > 150).all()
    assert (mel_psnr(mel, small) > mel_psnr(mel, large)).all()
    torch.testing.assert_close(mel_ssim(mel, mel), torch.ones(2))
    assert (mel_ssim(mel, small) > mel_ssim(mel, large)).all()
    assert torch.allclose(log_spectral_distance(wave, wave), torch.zeros(2))
    assert torch.allclose(stft_distance(wave, wave), torch.zeros(2), atol=1e-6)
    quiet, noisy = wave + 0.01 * torch.randn_like(wave), wave + 0.5 * torch.randn_like(wave)
    assert (log_spectral_distance(wave, quiet) < log_spectral_distance(wave, noisy)).all()
    assert (stft_distance(wave, quiet) < stft_distance(wave, noisy)).all()


def test_psnr_uses_the_reference_range_as_peak():
    reference = torch.zeros(1, 10, 4)
    reference[0, 0, 0] = 4.0  # range 4
    candidate = reference + 0.1  # MSE 0.01
    assert math.isclose(float(mel_psnr(reference, candidate)), 10 * math.log10(16 / 0.01), rel_tol=1e-5)


def test_seam_flux_finds_a_step_where_chunks_join():
    from rtdiff.audio.metrics import seam_flux

    generator = torch.Generator().manual_seed(0)
    smooth = torch.cumsum(torch.randn(400, 8, generator=generator) * 0.05, dim=0)
    assert 0.6 < seam_flux(smooth, [100, 200, 300])["ratio"] < 1.6
    stepped = smooth.clone()
    for b in (100, 200, 300):
        stepped[b:] += 1.0  # a seam: everything jumps where a chunk begins
    assert seam_flux(stepped, [100, 200, 300])["ratio"] > 3
    with pytest.raises(ValueError, match="no chunk boundaries"):
        seam_flux(smooth, [])
