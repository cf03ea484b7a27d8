"""Training `music-tiny`, one component at a time, on the synthetic music of audio/data.py (two CPU cores).

    rtdiff audio train clap    --out audio/checkpoints/music-tiny   # tokenizer, CLAP text + audio towers
    rtdiff audio train vae     --out audio/checkpoints/music-tiny   # AutoencoderKL on log-mels
    rtdiff audio train vocoder --out audio/checkpoints/music-tiny   # SpeechT5HifiGan, mel -> 16 kHz
    rtdiff audio train unet    --out audio/checkpoints/music-tiny   # UNet on VAE latents, text-conditioned

`--init` goes on from the component already in a folder. Each component's
weights carry the command that made them and a short report in their
safetensors metadata (`rtdiff_command`, `rtdiff_report`).
"""

from __future__ import annotations

import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from rtdiff.audio import data, features, tiny
from rtdiff.audio.metrics import stft_distance

CLIP_SECONDS = 2.56  # training clips: 256 mel frames, a (8, 64, 16) latent


# -- shared -------------------------------------------------------------------------------------------------

def clips_and_waves(count: int, seconds: float, seed: int):
    clips, waves = [], []
    for clip, _, wave in tqdm(data.dataset(count, seconds, seed=seed), total=count, desc="synthesising", unit="clip"):
        clips.append(clip)
        waves.append(wave)
    return clips, torch.from_numpy(np.stack(waves))


def log_mels(waves: torch.Tensor) -> torch.Tensor:
    """(clips, samples) -> (clips, frames, mel bins), 64 clips at a time."""
    with torch.no_grad():
        return torch.cat([features.log_mel(waves[i:i + 64]) for i in range(0, len(waves), 64)])


def all_training_captions() -> list[str]:
    """Every caption a training clip can have: the tokenizer's corpus."""
    captions = []
    for timbre in data.TIMBRES:
        for tempo in data.TEMPI:
            for register in data.REGISTERS:
                for mode in data.SCALES:
                    for drums in (False, True):
                        clip = data.Clip(timbre, tempo, register, mode, drums, 100.0, 0, 0)
                        if not clip.held_out:
                            captions += [clip.caption(template) for template in data.TEMPLATES]
    return captions


def stamp(component_folder: Path, command: str, report: dict, init_commands: list[str] | None = None) -> None:
    """Write the reproducing command and report into the component's safetensors metadata; a run that went on
    from earlier weights lists the commands that made those first (`rtdiff_init_commands`, oldest first)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    for path in component_folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as weights:
            metadata = dict(weights.metadata() or {})
            tensors = {name: weights.get_tensor(name) for name in weights.keys()}
        metadata.update({"format": "pt", "rtdiff_command": command, "rtdiff_report": json.dumps(report)})
        if init_commands:
            metadata["rtdiff_init_commands"] = json.dumps(init_commands)
        save_file(tensors, str(path), metadata=metadata)


def command_line() -> str:
    return "rtdiff " + " ".join(shlex.quote(arg) for arg in sys.argv[1:])


def cosine_lr(optimizer, step: int, steps: int, peak: float, warmup: int = 100) -> None:
    lr = peak * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step / steps, 1.0)))
    for group in optimizer.param_groups:
        group["lr"] = lr


def write_static_parts(folder: Path) -> None:
    """model_index.json, the noise schedule and the feature extractor: what no training step makes."""
    import diffusers

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(tiny.SCHEDULER, indent=2) + "\n")
    tiny.clap_feature_extractor().save_pretrained(str(folder / "feature_extractor"))
    index = {"_class_name": "MusicLDMPipeline", "_diffusers_version": diffusers.__version__,
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "ClapModel"], "tokenizer": ["transformers", "RobertaTokenizer"],
             "vocoder": ["transformers", "SpeechT5HifiGan"], "scheduler": ["diffusers", "DDIMScheduler"],
             "feature_extractor": ["transformers", "ClapFeatureExtractor"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


# -- CLAP: text and audio towers, contrastive -----------------------------------------------------------------

def attribute_targets(clips: list[data.Clip]) -> torch.Tensor:
    """Soft contrastive targets: clips with the same attributes (timbre, tempo, register, mode, drums) are all
    positives of each other, so a batch's duplicates are not pushed apart."""
    keys = [(c.timbre, c.tempo, c.register, c.mode, c.drums) for c in clips]
    same = torch.tensor([[a == b for b in keys] for a in keys], dtype=torch.float32)
    return same / same.sum(dim=1, keepdim=True)


def train_clap(out: Path, steps: int, clips_count: int, batch: int, seed: int, init: bool) -> dict:
    from transformers import ClapModel

    from rtdiff.audio.tokenizer import train_tokenizer

    torch.manual_seed(seed)
    write_static_parts(out)
    captions = all_training_captions()
    tokenizer = train_tokenizer(captions, out / "tokenizer", vocab_size=400, model_max_length=32)
    model = ClapModel.from_pretrained(out / "text_encoder") if init else tiny.clap_model(len(tokenizer))
    extractor = tiny.clap_feature_extractor()
    clips, waves = clips_and_waves(clips_count, tiny.CLAP_SECONDS, seed)
    audio = torch.from_numpy(np.stack(
        [extractor(w.numpy(), sampling_rate=features.SAMPLE_RATE, return_tensors="np")["input_features"][0]
         for w in waves]))
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    model.train()
    losses = []
    for step in tqdm(range(steps), desc="clap", unit="step"):
        cosine_lr(optimizer, step, steps, 1e-3)
        index = rng.choice(len(clips), batch, replace=False)
        chosen = [clips[i] for i in index]
        tokens = tokenizer([data.training_caption(c, rng) for c in chosen], padding="max_length", max_length=32,
                           truncation=True, return_tensors="pt")
        text = F.normalize(model.text_projection(model.text_model(
            input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).pooler_output), dim=-1)
        sound = F.normalize(model.audio_projection(model.audio_model(
            input_features=audio[index]).pooler_output), dim=-1)
        logits = text @ sound.T * model.logit_scale_t.exp().clamp(max=100)
        targets = attribute_targets(chosen)
        loss = 0.5 * (torch.sum(-targets * F.log_softmax(logits, 1), 1).mean()
                      + torch.sum(-targets * F.log_softmax(logits.T, 1), 1).mean())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    model.save_pretrained(out / "text_encoder", safe_serialization=True)
    report = {"steps": steps, "clips": clips_count, "batch": batch, "loss_last_100": float(np.mean(losses[-100:]))}
    return report


# -- VAE: log-mel <-> latent ----------------------------------------------------------------------------------

VAE_CROP = 64  # mel frames per training crop (the VAE is all convolution: it decodes any length the same way)
KL_WEIGHT = 1e-6


def mel_crops(mels: torch.Tensor, index: np.ndarray, frames: int, rng: np.random.Generator) -> torch.Tensor:
    starts = rng.integers(0, mels.shape[1] - frames + 1, len(index))
    return torch.stack([mels[i, s:s + frames] for i, s in zip(index, starts)])[:, None]


def train_vae(out: Path, steps: int, clips_count: int, batch: int, seed: int, init: bool) -> dict:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    model = AutoencoderKL.from_pretrained(out / "vae") if init else tiny.vae_model()
    _, waves = clips_and_waves(clips_count, CLIP_SECONDS, seed + 1)
    mels = log_mels(waves)
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    model.train()
    losses = []
    for step in tqdm(range(steps), desc="vae", unit="step"):
        cosine_lr(optimizer, step, steps, 1e-3)
        mel = mel_crops(mels, rng.choice(len(mels), batch), VAE_CROP, rng)
        posterior = model.encode(mel).latent_dist
        reconstruction = model.decode(posterior.sample()).sample
        l1 = (reconstruction - mel).abs().mean()
        loss = l1 + KL_WEIGHT * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(l1.item())
    model.eval()
    with torch.no_grad():  # LDM's rule: scale latents to unit variance for the diffusion model
        latents = torch.cat([model.encode(mels[i:i + 32, None]).latent_dist.mode() for i in range(0, 256, 32)])
        reconstruction = model.decode(latents).sample
    scaling = float(1.0 / latents.std())
    model.register_to_config(scaling_factor=scaling)
    model.save_pretrained(out / "vae", safe_serialization=True)
    report = {"steps": steps, "clips": clips_count, "batch": batch, "crop_frames": VAE_CROP,
              "l1_last_100": float(np.mean(losses[-100:])), "scaling_factor": scaling,
              "full_clip_l1": float((reconstruction - mels[:256, None]).abs().mean())}
    return report


# -- vocoder: log-mel -> waveform ---------------------------------------------------------------------------

VOCODER_FRAMES = 32  # mel frames per training segment: 5120 samples


ADVERSARIAL_WEIGHT = 0.1  # HiFi-GAN's balance of adversarial 1 : feature matching 2 : mel L1 45, against 4.5 here


def train_vocoder(out: Path, steps: int, clips_count: int, batch: int, seed: int, init: bool,
                  adversarial: bool = False) -> dict:
    """Spectral losses (mel L1 and multi-resolution STFT distance); `adversarial` adds HiFi-GAN's period and
    scale discriminators (audio/discriminators.py) and their least-squares and feature-matching losses."""
    from transformers import SpeechT5HifiGan

    from rtdiff.audio.discriminators import WaveDiscriminators, discriminator_loss, generator_loss

    torch.manual_seed(seed)
    model = SpeechT5HifiGan.from_pretrained(out / "vocoder") if init else tiny.vocoder_model()
    _, waves = clips_and_waves(clips_count, CLIP_SECONDS, seed + 2)
    mels = log_mels(waves)
    rng = np.random.default_rng(seed)
    lr = 2e-4 if adversarial else 2e-3  # HiFi-GAN's rate once discriminators take part
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.8, 0.99))
    if adversarial:
        critics = WaveDiscriminators()
        critic_optimizer = torch.optim.AdamW(critics.parameters(), lr=lr, betas=(0.8, 0.99))
    model.train()
    segment = VOCODER_FRAMES * features.HOP
    losses, critic_losses = [], []
    for step in tqdm(range(steps), desc="vocoder", unit="step"):
        cosine_lr(optimizer, step, steps, lr)
        index = rng.choice(len(waves), batch)
        starts = rng.integers(0, mels.shape[1] - VOCODER_FRAMES + 1, batch)
        mel = torch.stack([mels[i, s:s + VOCODER_FRAMES] for i, s in zip(index, starts)])
        wave = torch.stack([waves[i, s * features.HOP:s * features.HOP + segment] for i, s in zip(index, starts)])
        prediction = model(mel)
        if adversarial:
            cosine_lr(critic_optimizer, step, steps, lr)
            critic_loss = discriminator_loss(critics(wave), critics(prediction.detach()))
            critic_optimizer.zero_grad()
            critic_loss.backward()
            critic_optimizer.step()
            critic_losses.append(critic_loss.item())
        mel_l1 = (features.log_mel(prediction) - features.log_mel(wave)).abs().mean()
        loss = 4.5 * mel_l1 + stft_distance(wave, prediction).mean()
        if adversarial:
            fooled, matching = generator_loss(critics(wave), critics(prediction))
            loss = loss + ADVERSARIAL_WEIGHT * (fooled + 2 * matching)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        losses.append(mel_l1.item())
    model.eval()
    model.save_pretrained(out / "vocoder", safe_serialization=True)
    report = {"steps": steps, "clips": clips_count, "batch": batch, "segment_frames": VOCODER_FRAMES,
              "adversarial": adversarial, "mel_l1_last_100": float(np.mean(losses[-100:]))}
    if adversarial:
        report["discriminator_loss_last_100"] = float(np.mean(critic_losses[-100:]))
    return report


# -- UNet: text-conditioned denoising of VAE latents --------------------------------------------------------

CFG_DROPOUT = 0.1  # the share of clips trained with the unconditional embedding, for classifier-free guidance
EMA_DECAY = 0.999


def train_unet(out: Path, steps: int, clips_count: int, batch: int, seed: int, init: bool,
               clip_seconds: float = CLIP_SECONDS) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoTokenizer, ClapModel

    from rtdiff.audio.text import embed_prompts
    from rtdiff.runtime.solvers import SchedulerConfig, alphas_cumprod

    torch.manual_seed(seed)
    model = UNet2DConditionModel.from_pretrained(out / "unet") if init else tiny.unet_model()
    vae = AutoencoderKL.from_pretrained(out / "vae").eval()
    text_encoder = ClapModel.from_pretrained(out / "text_encoder").eval()
    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    clips, waves = clips_and_waves(clips_count, clip_seconds, seed + 3)
    with torch.no_grad():
        mels = log_mels(waves)
        latents = torch.cat([vae.encode(mels[i:i + 64, None]).latent_dist.mode()
                             for i in range(0, len(mels), 64)]) * vae.config.scaling_factor
        captions = sorted({c.caption(t) for c in clips for t in data.TEMPLATES})
        embedded, unconditional = embed_prompts(text_encoder, tokenizer, captions, None)
    embedding = dict(zip(captions, embedded))
    alpha_bar = alphas_cumprod(SchedulerConfig.from_dict({k: v for k, v in tiny.SCHEDULER.items()
                                                          if not k.startswith("_")})).float()
    ema = {name: p.detach().clone() for name, p in model.named_parameters()}
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    model.train()
    losses = []
    for step in tqdm(range(steps), desc="unet", unit="step"):
        cosine_lr(optimizer, step, steps, 1e-3)
        index = rng.choice(len(clips), batch)
        text = torch.stack([embedding[data.training_caption(clips[i], rng)] for i in index])
        dropped = torch.from_numpy(rng.random(batch) < CFG_DROPOUT)
        text[dropped] = unconditional[0]
        x0 = latents[index]
        t = torch.from_numpy(rng.integers(0, len(alpha_bar), batch))
        noise = torch.randn_like(x0)
        a = alpha_bar[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        prediction = model(noisy, t, encoder_hidden_states=None, class_labels=text).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            for name, p in model.named_parameters():
                ema[name].lerp_(p, 1 - EMA_DECAY)
        losses.append(loss.item())
    with torch.no_grad():  # the averaged weights are the ones shipped
        for name, p in model.named_parameters():
            p.copy_(ema[name])
    model.eval()
    model.save_pretrained(out / "unet", safe_serialization=True)
    report = {"steps": steps, "clips": clips_count, "clip_seconds": clip_seconds, "batch": batch,
              "cfg_dropout": CFG_DROPOUT,
              "ema_decay": EMA_DECAY, "loss_last_100": float(np.mean(losses[-100:]))}
    return report


# -- entry ----------------------------------------------------------------------------------------------------

TRAINERS = {"clap": train_clap, "vae": train_vae, "vocoder": train_vocoder, "unet": train_unet}


COMPONENT_FOLDERS = {"clap": "text_encoder", "vae": "vae", "vocoder": "vocoder", "unet": "unet"}


def earlier_commands(component_folder: Path) -> list[str]:
    """The commands that made the weights a run goes on from (`--init`): theirs, then the ones before them."""
    from safetensors import safe_open

    for path in component_folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as weights:
            metadata = weights.metadata() or {}
        return json.loads(metadata.get("rtdiff_init_commands", "[]")) + [metadata.get("rtdiff_command", "unknown")]
    return []


def cmd_train(args) -> None:
    torch.set_num_threads(args.threads)
    started = time.time()
    component_folder = Path(args.out) / COMPONENT_FOLDERS[args.component]
    before = earlier_commands(component_folder) if args.init else []
    options = ({"clip_seconds": args.clip_seconds} if args.component == "unet" else
               {"adversarial": args.adversarial} if args.component == "vocoder" else {})
    report = TRAINERS[args.component](Path(args.out), args.steps, args.clips, args.batch_size, args.seed, args.init,
                                      **options)
    report["wall_s"] = time.time() - started
    stamp(component_folder, command_line(), report, init_commands=before)
    drop_source_path(component_folder / "config.json")
    print(json.dumps({"component": args.component, **report}))


def drop_source_path(config: Path) -> None:
    """save_pretrained records the folder an --init run loaded from (`_name_or_path`): a path on the training
    machine, meaningless in a shipped checkpoint."""
    if config.exists():
        values = json.loads(config.read_text())
        if values.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
