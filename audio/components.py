"""A MusicLDM checkpoint as diffusers lays it out, loaded from local disk and checked whole.

    folder/model_index.json              {"_class_name": "MusicLDMPipeline", ...}
    folder/unet/                         UNet2DConditionModel (diffusers)
    folder/vae/                          AutoencoderKL (diffusers)
    folder/text_encoder/                 ClapModel or ClapTextModelWithProjection (transformers)
    folder/tokenizer/                    the text tower's tokenizer (RoBERTa)
    folder/vocoder/                      SpeechT5HifiGan (transformers)
    folder/scheduler/scheduler_config.json
    folder/feature_extractor/            ClapFeatureExtractor (optional: rtdiff does not score waveforms)

Only safetensors weights are read (a component holding only a pickled `.bin`
is refused by name), nothing is fetched from a hub, and a component with a
missing, unexpected or wrongly shaped tensor, or a non-finite one, fails the
whole load: no model is returned half-initialised.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from rtdiff.runtime.solvers import SchedulerConfig, read_scheduler_config

PIPELINE_CLASS = "MusicLDMPipeline"
MODEL_INDEX = "model_index.json"
TEXT_ENCODER_CLASSES = ("ClapModel", "ClapTextModelWithProjection")


def is_musicldm_folder(folder: Path) -> bool:
    index = folder / MODEL_INDEX
    if not index.is_file():
        return False
    try:
        return json.loads(index.read_text()).get("_class_name") == PIPELINE_CLASS
    except (json.JSONDecodeError, AttributeError):
        return False


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of every model component: what a checkpoint's hash covers."""
    return sorted(path for name in ("unet", "vae", "text_encoder", "vocoder")
                  for path in (folder / name).glob("*.safetensors"))


class MusicLDM(nn.Module):
    """The components of one MusicLDM checkpoint: the models as submodules, the tokenizer and the training noise
    schedule beside them."""

    def __init__(self, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module, vocoder: nn.Module, tokenizer,
                 scheduler: SchedulerConfig, scheduler_dict: dict | None = None, folder: Path | None = None):
        super().__init__()
        self.unet, self.vae, self.text_encoder, self.vocoder = unet, vae, text_encoder, vocoder
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.scheduler_dict = scheduler_dict or scheduler.to_dict()  # as the folder gave it, for diffusers
        self.folder = folder

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def sample_rate(self) -> int:
        return int(self.vocoder.config.sampling_rate)

    @property
    def hop_length(self) -> int:
        """Waveform samples per mel frame: the vocoder's total upsampling."""
        hop = 1
        for rate in self.vocoder.config.upsample_rates:
            hop *= int(rate)
        return hop

    @property
    def mel_bins(self) -> int:
        return int(self.vocoder.config.model_in_dim)


def _check_component(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_dir():
        raise FileNotFoundError(f"MusicLDM checkpoint {folder} has no {name}/ folder")
    if not list(path.glob("*.safetensors")) and not (path / "model.safetensors.index.json").is_file():
        pickled = sorted(p.name for p in path.glob("*.bin"))
        hint = f" (it holds {pickled}: pickles are not read; convert them to safetensors)" if pickled else ""
        raise FileNotFoundError(f"{path} has no safetensors weights{hint}")
    return path


def _checked(model: nn.Module, info: dict, path: Path) -> nn.Module:
    problems = {key: info.get(key) for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")}
    problems = {key: list(value) for key, value in problems.items() if value}
    if problems:
        raise ValueError(f"{path} does not match its config: {problems}")
    for tensor_name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{path}: {tensor_name} contains NaN or infinite values")
    return model.eval()


def _load_diffusers(cls, path: Path) -> nn.Module:
    model, info = cls.from_pretrained(path, use_safetensors=True, local_files_only=True, output_loading_info=True,
                                      low_cpu_mem_usage=False)
    return _checked(model, info, path)


def _load_transformers(cls, path: Path) -> nn.Module:
    model, info = cls.from_pretrained(path, use_safetensors=True, local_files_only=True, output_loading_info=True)
    return _checked(model, info, path)


def _text_encoder_class(path: Path):
    import transformers

    try:
        config = json.loads((path / "config.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}/config.json is missing or not JSON: {error}") from None
    architectures = config.get("architectures") or ["ClapModel"]
    if architectures[0] not in TEXT_ENCODER_CLASSES:
        raise ValueError(f"{path}: text encoder class {architectures[0]!r} is not one of {TEXT_ENCODER_CLASSES}")
    return getattr(transformers, architectures[0])


def load_musicldm(folder: str | Path) -> MusicLDM:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoTokenizer, SpeechT5HifiGan

    folder = Path(folder)
    if not is_musicldm_folder(folder):
        raise ValueError(f"{folder} is not a MusicLDM folder: its {MODEL_INDEX} must name {PIPELINE_CLASS}")
    paths = {name: _check_component(folder, name) for name in ("unet", "vae", "text_encoder", "vocoder")}
    if not (folder / "tokenizer").is_dir():
        raise FileNotFoundError(f"MusicLDM checkpoint {folder} has no tokenizer/ folder")
    scheduler_dict = read_scheduler_config(folder / "scheduler")
    scheduler = SchedulerConfig.from_dict(scheduler_dict)
    return MusicLDM(
        unet=_load_diffusers(UNet2DConditionModel, paths["unet"]),
        vae=_load_diffusers(AutoencoderKL, paths["vae"]),
        text_encoder=_load_transformers(_text_encoder_class(paths["text_encoder"]), paths["text_encoder"]),
        vocoder=_load_transformers(SpeechT5HifiGan, paths["vocoder"]),
        tokenizer=AutoTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True),
        scheduler=scheduler, scheduler_dict=scheduler_dict, folder=folder)


def save_musicldm(model: MusicLDM, folder: str | Path, feature_extractor=None) -> Path:
    """Write `model` in the diffusers folder layout (what `load_musicldm` and diffusers' pipeline read)."""
    import diffusers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("unet", "vae", "text_encoder", "vocoder"):
        getattr(model, name).save_pretrained(folder / name, safe_serialization=True)
    model.tokenizer.save_pretrained(str(folder / "tokenizer"))
    (folder / "scheduler").mkdir(exist_ok=True)
    scheduler = {"_class_name": "DDIMScheduler", **model.scheduler_dict}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")
    index = {"_class_name": PIPELINE_CLASS, "_diffusers_version": diffusers.__version__,
             "unet": ["diffusers", type(model.unet).__name__], "vae": ["diffusers", type(model.vae).__name__],
             "text_encoder": ["transformers", type(model.text_encoder).__name__],
             "tokenizer": ["transformers", type(model.tokenizer).__name__],
             "vocoder": ["transformers", type(model.vocoder).__name__],
             "scheduler": ["diffusers", scheduler["_class_name"]],
             "feature_extractor": [None, None]}
    if feature_extractor is not None:
        feature_extractor.save_pretrained(str(folder / "feature_extractor"))
        index["feature_extractor"] = ["transformers", type(feature_extractor).__name__]
    (folder / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return folder
