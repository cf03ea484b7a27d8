"""Text to music with a MusicLDM checkpoint, on rtdiff's solvers, guidance and accelerators.

    model = load_musicldm("path/to/musicldm")          # or load_checkpoint("music-tiny")
    music = TextToMusic(model).generate(["a fast high melody with drums"], seconds=10, steps=50, solver="dpmpp")
    music.wave  # (1, 160000) float32 at 16 kHz

The stages are diffusers' MusicLDM pipeline's, computed the same way on the
same model classes (tests/test_musicldm_parity.py holds them to it): prompts to
CLAP text embeddings, the latent (B, 8, frames / 4, mel bins / 4) denoised
with classifier-free guidance (the UNet sees the conditional and unconditional
embedding as one doubled batch), the VAE decodes the latent to the log-mel
spectrogram, the vocoder turns that into a waveform, cut to the seconds asked.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from rtdiff.audio.components import MusicLDM
from rtdiff.audio.denoiser import MusicUNetDenoiser
from rtdiff.audio.text import embed_prompts
from rtdiff.runtime.accel.base import Accelerator
from rtdiff.runtime.guidance import ClassifierFreeGuidance
from rtdiff.runtime.sampling import trajectory
from rtdiff.runtime.solvers import make_solver

SOLVERS = ("ddim", "dpmpp")


@dataclass
class Generation:
    latent: torch.Tensor  # (B, C, T, F): the denoised latent
    mel: torch.Tensor  # (B, 1, frames, mel bins): the VAE's log-mel spectrogram
    wave: torch.Tensor  # (B, samples) at `sample_rate`
    sample_rate: int
    stage_ms: dict[str, float] = field(default_factory=dict)  # wall time: text, denoise, vae, vocoder
    accel_stats: dict = field(default_factory=dict)  # model calls and the fraction of block forwards that ran


class TextToMusic:
    def __init__(self, model: MusicLDM):
        self.model = model
        self.denoiser = MusicUNetDenoiser(model.unet)

    def mel_frames(self, seconds: float) -> int:
        """Mel frames computed for `seconds`: rounded up to whole latent frames (the waveform is cut back)."""
        model = self.model
        if seconds <= 0:
            raise ValueError(f"seconds must be positive, got {seconds}")
        # as diffusers computes it, division for division, so both agree on where a length rounds
        frames = int(seconds / (model.hop_length / model.sample_rate))
        scale = model.vae_scale_factor
        frames = -(-frames // scale) * scale
        if frames < scale:
            raise ValueError(f"{seconds} s is shorter than one latent frame "
                             f"({scale * model.hop_length / model.sample_rate} s)")
        return frames

    def latent_shape(self, batch: int, seconds: float) -> tuple[int, int, int, int]:
        model = self.model
        if model.mel_bins % model.vae_scale_factor:
            raise ValueError(f"the vocoder's {model.mel_bins} mel bins are not divisible by the VAE's scale "
                             f"factor {model.vae_scale_factor}")
        return (batch, int(model.unet.config.in_channels), self.mel_frames(seconds) // model.vae_scale_factor,
                model.mel_bins // model.vae_scale_factor)

    def initial_latents(self, batch: int, seconds: float, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(self.latent_shape(batch, seconds), generator=generator)

    @torch.no_grad()
    def generate(self, prompts: list[str], seconds: float, steps: int = 200, solver: str = "ddim",
                 guidance: float = 2.0, negative_prompts: list[str] | None = None,
                 generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
                 accelerator=None, progress: bool = False) -> Generation:
        """`latents` is the initial noise (as diffusers' `latents=`); without it, drawn from `generator`."""
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r} for MusicLDM; expected one of {SOLVERS}")
        if not prompts:
            raise ValueError("no prompt given")
        model, stage_ms = self.model, {}
        shape = self.latent_shape(len(prompts), seconds)
        if latents is None:
            latents = self.initial_latents(len(prompts), seconds, generator)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"initial latents have shape {tuple(latents.shape)}; {seconds} s of "
                             f"{len(prompts)} prompt(s) needs {shape}")

        started = time.perf_counter()
        text, uncond = embed_prompts(model.text_encoder, model.tokenizer, prompts, negative_prompts)
        stage_ms["text"] = (time.perf_counter() - started) * 1e3

        started = time.perf_counter()
        denoiser = self.denoiser
        if guidance > 1.0:  # diffusers' rule: guidance 1 or below means the conditional pass alone
            denoiser = ClassifierFreeGuidance(denoiser, guidance, {"text": uncond})
        sampler = make_solver(solver, model.scheduler, steps)
        x = latents.to(torch.float32)
        accelerator = accelerator if accelerator is not None else Accelerator()
        steps_taken = trajectory(denoiser, sampler, x, {"text": text}, accelerator=accelerator)
        if progress:
            from tqdm import tqdm

            steps_taken = tqdm(steps_taken, total=steps, desc="denoising", unit="step")
        for step in steps_taken:
            x = step.x
        stage_ms["denoise"] = (time.perf_counter() - started) * 1e3

        mel, stage_ms["vae"] = _timed(lambda: model.vae.decode(x / model.vae.config.scaling_factor).sample)
        wave, stage_ms["vocoder"] = _timed(lambda: model.vocoder(mel.squeeze(1)))
        wave = wave[:, :int(seconds * model.sample_rate)]
        return Generation(x, mel, wave, model.sample_rate, stage_ms, accelerator.stats())


def _timed(compute):
    started = time.perf_counter()
    result = compute()
    return result, (time.perf_counter() - started) * 1e3
