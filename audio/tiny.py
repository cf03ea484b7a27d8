"""The architecture of the bundled `music-tiny`: MusicLDM's component classes, sized to train on two CPU cores.

Real MusicLDM for comparison: UNet channels 128/256/384/640 with a 512-d CLAP
embedding, latent (8, 256, 16) for 10.24 s. music-tiny keeps every interface
(8 latent channels, /4 VAE, 64 mel bins, hop 160 at 16 kHz, the CLAP
embedding as the UNet's class label) and shrinks the widths.
"""

from __future__ import annotations

from rtdiff.audio import features

EMBED_DIM = 128  # CLAP projection: what the UNet is conditioned on
LATENT_CHANNELS = 8
CLAP_SECONDS = 2.52  # 63 hops of 640 samples: 64 frames, the tiny audio tower's input size
CLAP_HOP = 640

# MusicLDM's own training noise schedule
SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.0015, "beta_end": 0.0195,
             "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
             "prediction_type": "epsilon", "trained_betas": None}


def clap_model(vocab_size: int):
    from transformers import ClapAudioConfig, ClapConfig, ClapModel, ClapTextConfig

    # positions for EMBED_DIM tokens: MusicLDM's pipeline pads the negative prompt to as many tokens as the
    # embedding has dimensions (audio/text.py); RoBERTa's positions start after the padding index, hence + 2

    text = ClapTextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                          num_hidden_layers=2, max_position_embeddings=EMBED_DIM + 2, bos_token_id=0,
                          pad_token_id=1, eos_token_id=2, projection_dim=EMBED_DIM)
    audio = ClapAudioConfig(spec_size=64, num_mel_bins=features.MEL_BINS, window_size=4, depths=[2, 2],
                            num_attention_heads=[2, 4], patch_embeds_hidden_size=32, hidden_size=64, patch_size=4,
                            patch_stride=4, intermediate_size=64, enable_fusion=False, projection_dim=EMBED_DIM)
    return ClapModel(ClapConfig(text_config=text.to_dict(), audio_config=audio.to_dict(), projection_dim=EMBED_DIM))


def clap_feature_extractor():
    from transformers import ClapFeatureExtractor

    return ClapFeatureExtractor(feature_size=features.MEL_BINS, sampling_rate=features.SAMPLE_RATE,
                                hop_length=CLAP_HOP, fft_window_size=1024, frequency_min=0, frequency_max=8000,
                                max_length_s=CLAP_SECONDS, truncation="rand_trunc", padding="repeatpad")


def vae_model():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=1, out_channels=1, latent_channels=LATENT_CHANNELS,
                         block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16,
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         mid_block_add_attention=False, sample_size=64)  # all convolution: any length decodes alike


def vocoder_model():
    # each upsampling's kernel is its stride plus an even number, so N mel frames give exactly N x 160 samples
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    return SpeechT5HifiGan(SpeechT5HifiGanConfig(
        model_in_dim=features.MEL_BINS, sampling_rate=features.SAMPLE_RATE, upsample_initial_channel=128,
        upsample_rates=[5, 4, 4, 2], upsample_kernel_sizes=[11, 8, 8, 4], resblock_kernel_sizes=[3, 7],
        resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5]], normalize_before=False))


def unet_model():
    from diffusers import UNet2DConditionModel

    channels = (32, 64, 96)  # 2.9 M parameters: 11 MB, and 0.85 s per training step of 32 on two cores
    return UNet2DConditionModel(
        sample_size=(64, 16), in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, block_out_channels=channels,
        layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=channels, attention_head_dim=(4, 4, 4), norm_num_groups=16,
        class_embed_type="simple_projection", projection_class_embeddings_input_dim=EMBED_DIM,
        class_embeddings_concat=True)
