"""Loading LeRobot diffusion-policy checkpoints (state observations, UNet).

A LeRobot `pretrained_model/` folder holds `config.json` and
`model.safetensors` with the UNet under `diffusion.unet.*`. Min-max
statistics live either in the weights file (LeRobot 0.1-0.3:
`normalize_inputs.buffer_observation_state.min`, `unnormalize_outputs.buffer_action.max`, ...)
or in the processor files newer releases write beside it
(`policy_preprocessor_step_*_normalizer_processor.safetensors`, keys like
`observation.state.min`). Both are read; images are refused, since rtdiff's
policies take state only.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rtdiff.runtime.checkpoints import WEIGHTS_FILE, load_state_dict_checked, read_safetensors
from rtdiff.policies.config import PolicyConfig
from rtdiff.policies.modeling import DiffusionPolicy
from rtdiff.runtime.solvers import SchedulerConfig

STATE_KEYS = ("observation.state", "observation.environment_state")  # LeRobot's order in the condition
UNET_PREFIX = "diffusion.unet."


def load_lerobot_policy(folder: Path, payload: dict) -> DiffusionPolicy:
    inputs, outputs = _feature_shapes(payload)
    images = [key for key in inputs if key.startswith("observation.image")]
    if images:
        raise ValueError(f"LeRobot checkpoint {folder} takes images {images}; rtdiff loads state-only policies")
    states = [key for key in STATE_KEYS if key in inputs]
    if not states or "action" not in outputs:
        raise ValueError(f"LeRobot checkpoint {folder} needs observation.state and action features")
    _require_min_max(payload, folder)
    config = PolicyConfig(
        arch="unet",
        obs_dim=sum(inputs[key][0] for key in states),
        action_dim=outputs["action"][0],
        n_obs_steps=payload["n_obs_steps"],
        horizon=payload["horizon"],
        n_action_steps=payload["n_action_steps"],
        down_dims=tuple(payload["down_dims"]),
        kernel_size=payload["kernel_size"],
        n_groups=payload["n_groups"],
        diffusion_step_embed_dim=payload["diffusion_step_embed_dim"],
        use_film_scale_modulation=payload.get("use_film_scale_modulation", True),
        default_solver=_solver_name(payload),
        default_steps=payload.get("num_inference_steps") or payload["num_train_timesteps"],
        scheduler=SchedulerConfig(
            num_train_timesteps=payload["num_train_timesteps"],
            beta_schedule=payload["beta_schedule"],
            beta_start=payload["beta_start"],
            beta_end=payload["beta_end"],
            prediction_type=payload["prediction_type"],
            clip_sample=payload["clip_sample"],
            clip_sample_range=payload["clip_sample_range"],
        ),
    )
    tensors = read_safetensors(folder / WEIGHTS_FILE)
    stats = _statistics(folder, tensors)
    state = {f"denoiser.{key[len(UNET_PREFIX):]}": value for key, value in tensors.items() if key.startswith(UNET_PREFIX)}
    try:
        state["obs_normalizer.min"] = torch.cat([stats[f"{key}.min"] for key in states])
        state["obs_normalizer.max"] = torch.cat([stats[f"{key}.max"] for key in states])
        state["action_normalizer.min"], state["action_normalizer.max"] = stats["action.min"], stats["action.max"]
    except KeyError as missing:
        raise ValueError(f"LeRobot checkpoint {folder} has no min-max statistic {missing}") from None
    policy = DiffusionPolicy(config)
    load_state_dict_checked(policy, state, source=str(folder))
    return policy.eval()


def _solver_name(payload: dict) -> str:
    kind = str(payload.get("noise_scheduler_type", "DDPM")).lower()
    if kind not in ("ddpm", "ddim"):
        raise ValueError(f"LeRobot noise_scheduler_type {payload.get('noise_scheduler_type')!r}: expected DDPM or DDIM")
    return kind


def _feature_shapes(payload: dict) -> tuple[dict, dict]:
    """{feature: shape} for inputs and outputs, from either config generation."""
    try:
        if "input_features" in payload:
            return ({k: v["shape"] for k, v in payload["input_features"].items()},
                    {k: v["shape"] for k, v in payload["output_features"].items()})
        return payload["input_shapes"], payload["output_shapes"]
    except (KeyError, TypeError) as error:
        raise ValueError(f"LeRobot config has malformed features: {error}") from None


def _require_min_max(payload: dict, folder: Path) -> None:
    if "normalization_mapping" in payload:
        modes = {k: payload["normalization_mapping"].get(k) for k in ("STATE", "ENV", "ACTION")}
    else:
        modes = {**payload.get("input_normalization_modes", {}), **payload.get("output_normalization_modes", {})}
    wrong = {k: v for k, v in modes.items() if v is not None and str(v).upper() != "MIN_MAX"}
    if wrong:
        raise ValueError(f"LeRobot checkpoint {folder} normalises with {wrong}; rtdiff supports MIN_MAX only")


def _statistics(folder: Path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{'observation.state.min': ..., 'action.max': ...} from in-model buffers or processor files."""
    stats = {}
    for prefix in ("normalize_inputs.buffer_", "unnormalize_outputs.buffer_"):
        for key, value in tensors.items():
            if key.startswith(prefix):
                feature, stat = key[len(prefix):].rsplit(".", 1)
                stats[f"{feature.replace('_', '.', 1)}.{stat}"] = value
    for path in sorted(folder.glob("policy_*processor_step_*normalizer_processor.safetensors")):
        stats.update(read_safetensors(path))
    return stats
