"""rtdiff's MusicLDM pipeline against diffusers' MusicLDMPipeline on the same tiny random components, prompts and
initial latents: final latents, mel spectrogram and waveform within 1e-4, for DDIM and DPM-Solver++.

diffusers' pipeline is deprecated and works only with transformers 4 (it reads `get_text_features` as a tensor);
where it does not import or run, the test is skipped with the reason."""

from __future__ import annotations

import pytest
import torch

from tests.musicldm_tiny import build_tiny_musicldm
from rtdiff.audio.components import load_musicldm
from rtdiff.audio.pipeline import TextToMusic

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) >= 5:
    pytest.skip("diffusers' MusicLDMPipeline needs transformers 4", allow_module_level=True)

SECONDS = 0.03  # the tiny vocoder's hop is 4 samples: 120 mel frames, a (4, 60, 4) latent


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_musicldm(tmp_path_factory.mktemp("musicldm") / "tiny")


def diffusers_run(folder, solver, prompts, negative, latents, steps, guidance, generator=None, seconds=SECONDS):
    """What diffusers' pipeline computes: the final latent (from its step callback), the mel (the vocoder's
    input), and the waveform it returns."""
    from diffusers import DPMSolverMultistepScheduler, MusicLDMPipeline

    pipe = MusicLDMPipeline.from_pretrained(folder, local_files_only=True)
    if solver == "dpmpp":  # as a user switches solvers: from the folder's DDIM config
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    seen = {}
    pipe.vocoder.register_forward_hook(lambda module, args, output: seen.__setitem__("mel", args[0]))
    wave = pipe(prompts, audio_length_in_s=seconds, num_inference_steps=steps, guidance_scale=guidance,
                negative_prompt=negative, output_type="pt", generator=generator,
                latents=latents.clone() if latents is not None else None,
                callback=lambda i, t, x: seen.__setitem__("latent", x.clone())).audios
    return seen["latent"], seen["mel"], wave


def assert_close_to_scale(ours, reference, what, tolerance=1e-4):
    """Within `tolerance` of the reference's largest magnitude: random tiny components give latents in the
    hundreds and waveforms near 1e-5, so a fixed absolute tolerance would be loose for one and blind for the
    other. (Changing the guidance scale from 2.0 to 2.1 moves each of them by more than this.)"""
    error = (ours - reference).abs().max().item()
    scale = reference.abs().max().item()
    assert scale > 0, f"the reference {what} is all zeros"
    assert error <= tolerance * scale, f"{what}: max difference {error:.3g} is over {tolerance} x {scale:.3g}"


@pytest.mark.parametrize("solver,steps", [("ddim", 12), ("dpmpp", 10)])
@pytest.mark.parametrize("guidance,negative", [(2.0, None), (3.5, ["bright strings", "a calm organ in major"]),
                                               (1.0, None)])
def test_rtdiff_matches_diffusers_musicldm(folder, solver, steps, guidance, negative):
    prompts = ["a fast high melody with drums", "a slow low piano in minor without drums"]
    pipeline = TextToMusic(load_musicldm(folder))
    latents = pipeline.initial_latents(len(prompts), SECONDS, torch.Generator().manual_seed(7))
    ours = pipeline.generate(prompts, SECONDS, steps=steps, solver=solver, guidance=guidance,
                             negative_prompts=negative, latents=latents)
    latent, mel, wave = diffusers_run(folder, solver, prompts, negative, latents, steps, guidance)
    assert ours.latent.shape == latent.shape == (2, 4, 60, 4)
    assert ours.wave.shape == wave.shape == (2, int(SECONDS * 16000))
    assert_close_to_scale(ours.latent, latent, "latent")
    assert_close_to_scale(ours.mel.squeeze(1), mel, "mel")
    assert_close_to_scale(ours.wave, wave, "waveform")
    assert not torch.allclose(latents, ours.latent, atol=1e-2)  # it denoised something


def test_a_seed_draws_the_initial_noise_diffusers_draws(folder):
    prompts = ["a calm organ in major"]
    pipeline = TextToMusic(load_musicldm(folder))
    ours = pipeline.generate(prompts, SECONDS, steps=6, generator=torch.Generator().manual_seed(3))
    latent, _, wave = diffusers_run(folder, "ddim", prompts, None, None, 6, 2.0, torch.Generator().manual_seed(3))
    assert_close_to_scale(ours.latent, latent, "latent")
    assert_close_to_scale(ours.wave, wave, "waveform")


def test_the_bundled_model_is_a_musicldm_that_diffusers_runs_alike():
    from rtdiff.runtime.checkpoints import resolve

    folder = resolve("music-tiny")
    prompts = ["a fast high piano melody in major with drums"]
    pipeline = TextToMusic(load_musicldm(folder))
    latents = pipeline.initial_latents(1, 0.64, torch.Generator().manual_seed(0))
    ours = pipeline.generate(prompts, 0.64, steps=5, solver="dpmpp", latents=latents)
    latent, mel, wave = diffusers_run(folder, "dpmpp", prompts, None, latents, 5, 2.0, seconds=0.64)
    assert ours.wave.shape == wave.shape == (1, 10240)
    assert_close_to_scale(ours.latent, latent, "latent")
    assert_close_to_scale(ours.mel.squeeze(1), mel, "mel")
    assert_close_to_scale(ours.wave, wave, "waveform")
