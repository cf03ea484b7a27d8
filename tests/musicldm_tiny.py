"""Tiny random MusicLDM components in the diffusers folder layout, built offline (the tokenizer too), for the
parity and loader tests. Sizes follow diffusers' own MusicLDM tests."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

PROMPTS = ["a fast high melody with drums", "a slow low piano in minor without drums", "a calm organ in major",
           "bright strings", "a dark bass line with a drum loop"]

# MusicLDM's own noise schedule (its scheduler_config.json), as diffusers writes it
SCHEDULER = {"_class_name": "DDIMScheduler", "beta_start": 0.0015, "beta_end": 0.0195,
             "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "clip_sample": False,
             "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon", "trained_betas": None}


def build_tiny_musicldm(folder: Path, seed: int = 0) -> Path:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import (ClapAudioConfig, ClapConfig, ClapFeatureExtractor, ClapModel, ClapTextConfig,
                              SpeechT5HifiGan, SpeechT5HifiGanConfig)

    from rtdiff.audio.components import MusicLDM, save_musicldm
    from rtdiff.audio.tokenizer import train_tokenizer
    from rtdiff.runtime.solvers import SchedulerConfig

    folder = Path(folder)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = train_tokenizer(PROMPTS, scratch, vocab_size=300, model_max_length=77)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=(32, 64), class_embed_type="simple_projection", projection_class_embeddings_input_dim=32,
        class_embeddings_concat=True)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=1, out_channels=1,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4)
    text = ClapTextConfig(bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05,
                          num_attention_heads=4, num_hidden_layers=2, pad_token_id=1, vocab_size=len(tokenizer))
    audio = ClapAudioConfig(spec_size=64, window_size=4, num_mel_bins=64, intermediate_size=37, layer_norm_eps=1e-05,
                            depths=[2, 2], num_attention_heads=[2, 2], num_hidden_layers=2, hidden_size=192,
                            patch_size=2, patch_stride=2, patch_embed_input_channels=4)
    text_encoder = ClapModel(ClapConfig(text_config=text.to_dict(), audio_config=audio.to_dict(), projection_dim=32))
    vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(
        model_in_dim=8, sampling_rate=16000, upsample_initial_channel=16, upsample_rates=[2, 2],
        upsample_kernel_sizes=[4, 4], resblock_kernel_sizes=[3, 7], resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5]],
        normalize_before=False))
    schedule = {k: v for k, v in SCHEDULER.items() if not k.startswith("_")}
    model = MusicLDM(unet.eval(), vae.eval(), text_encoder.eval(), vocoder.eval(), tokenizer,
                     SchedulerConfig.from_dict(schedule), SCHEDULER)
    return save_musicldm(model, folder, feature_extractor=ClapFeatureExtractor())
