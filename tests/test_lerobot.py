"""The LeRobot loader on tiny diffusion policies written in LeRobot's layout (both normaliser generations).

The checkpoint is written here from LeRobot's naming alone, and the loaded
policy is checked against a functional UNet computed straight from those
tensors, so a renamed or misplaced weight fails the test.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from rtdiff.policies.checkpoint import load_policy

STATE, ACTION, N_OBS, HORIZON = 5, 2, 2, 8
DIMS, KERNEL, GROUPS, STEP_DIM = (8, 16), 3, 4, 8
COND = STEP_DIM + STATE * N_OBS


def lerobot_tensors(generator) -> dict[str, torch.Tensor]:
    """diffusion.unet.* weights named as LeRobot's DiffusionConditionalUnet1d names them."""
    shapes = {"diffusion_step_encoder.1": (4 * STEP_DIM, STEP_DIM), "diffusion_step_encoder.3": (STEP_DIM, 4 * STEP_DIM)}

    def conv_block(prefix, cin, cout):
        shapes[f"{prefix}.block.0"] = (cout, cin, KERNEL)
        shapes[f"{prefix}.block.1"] = (cout,)

    def res_block(prefix, cin, cout):
        conv_block(f"{prefix}.conv1", cin, cout)
        shapes[f"{prefix}.cond_encoder.1"] = (2 * cout, COND)
        conv_block(f"{prefix}.conv2", cout, cout)
        if cin != cout:
            shapes[f"{prefix}.residual_conv"] = (cout, cin, 1)

    in_out = [(ACTION, DIMS[0]), (DIMS[0], DIMS[1])]
    for k, (cin, cout) in enumerate(in_out):
        res_block(f"down_modules.{k}.0", cin, cout)
        res_block(f"down_modules.{k}.1", cout, cout)
        if k < len(in_out) - 1:
            shapes[f"down_modules.{k}.2"] = (cout, cout, 3)
    res_block("mid_modules.0", DIMS[-1], DIMS[-1])
    res_block("mid_modules.1", DIMS[-1], DIMS[-1])
    res_block("up_modules.0.0", DIMS[1] * 2, DIMS[0])
    res_block("up_modules.0.1", DIMS[0], DIMS[0])
    shapes["up_modules.0.2"] = (DIMS[0], DIMS[0], 4)  # ConvTranspose1d: (in, out, k)
    conv_block("final_conv.0", DIMS[0], DIMS[0])
    shapes["final_conv.1"] = (ACTION, DIMS[0], 1)
    tensors = {}
    for name, shape in shapes.items():
        bias_dim = shape[1] if name.startswith("up_modules.0.2") else shape[0]
        tensors[f"diffusion.unet.{name}.weight"] = 0.3 * torch.randn(shape, generator=generator)
        tensors[f"diffusion.unet.{name}.bias"] = 0.1 * torch.randn(bias_dim, generator=generator)
    return tensors


def reference_unet(p: dict, x, t, cond):
    """LeRobot's UNet forward written functionally over the raw checkpoint tensors."""
    p = {k.removeprefix("diffusion.unet."): v for k, v in p.items()}

    def lin(name, h):
        return F.linear(h, p[f"{name}.weight"], p[f"{name}.bias"])

    def conv_block(name, h):
        h = F.conv1d(h, p[f"{name}.block.0.weight"], p[f"{name}.block.0.bias"], padding=KERNEL // 2)
        return F.mish(F.group_norm(h, 8 if name.startswith("final") else GROUPS, p[f"{name}.block.1.weight"],
                                   p[f"{name}.block.1.bias"]))

    def res_block(name, h, feature):
        out = conv_block(f"{name}.conv1", h)
        film = lin(f"{name}.cond_encoder.1", F.mish(feature)).unsqueeze(-1)
        channels = out.shape[1]
        out = conv_block(f"{name}.conv2", film[:, :channels] * out + film[:, channels:])
        residual = F.conv1d(h, p[f"{name}.residual_conv.weight"], p[f"{name}.residual_conv.bias"]) \
            if f"{name}.residual_conv.weight" in p else h
        return out + residual

    half = STEP_DIM // 2
    angles = t.float()[:, None] * torch.exp(-math.log(10000) * torch.arange(half) / (half - 1))[None]
    step = lin("diffusion_step_encoder.3", F.mish(lin("diffusion_step_encoder.1", torch.cat([angles.sin(), angles.cos()], -1))))
    feature = torch.cat([step, cond.flatten(1)], -1)
    h = x.transpose(1, 2)
    h = res_block("down_modules.0.1", res_block("down_modules.0.0", h, feature), feature)
    skip0 = h
    h = F.conv1d(h, p["down_modules.0.2.weight"], p["down_modules.0.2.bias"], stride=2, padding=1)
    h = res_block("down_modules.1.1", res_block("down_modules.1.0", h, feature), feature)
    skip1 = h
    h = res_block("mid_modules.1", res_block("mid_modules.0", h, feature), feature)
    h = torch.cat([h, skip1], 1)
    h = res_block("up_modules.0.1", res_block("up_modules.0.0", h, feature), feature)
    h = F.conv_transpose1d(h, p["up_modules.0.2.weight"], p["up_modules.0.2.bias"], stride=2, padding=1)
    del skip0  # LeRobot never uses the first skip, as Diffusion Policy does not
    h = conv_block("final_conv.0", h)
    return F.conv1d(h, p["final_conv.1.weight"], p["final_conv.1.bias"]).transpose(1, 2)


def lerobot_config(new_style: bool) -> dict:
    common = {
        "type": "diffusion", "n_obs_steps": N_OBS, "horizon": HORIZON, "n_action_steps": 4,
        "down_dims": list(DIMS), "kernel_size": KERNEL, "n_groups": GROUPS, "diffusion_step_embed_dim": STEP_DIM,
        "use_film_scale_modulation": True, "noise_scheduler_type": "DDPM", "num_train_timesteps": 100,
        "beta_schedule": "squaredcos_cap_v2", "beta_start": 0.0001, "beta_end": 0.02, "prediction_type": "epsilon",
        "clip_sample": True, "clip_sample_range": 1.0,
    }
    if new_style:
        return {**common,
                "input_features": {"observation.state": {"type": "STATE", "shape": [STATE]}},
                "output_features": {"action": {"type": "ACTION", "shape": [ACTION]}},
                "normalization_mapping": {"VISUAL": "MEAN_STD", "STATE": "MIN_MAX", "ACTION": "MIN_MAX"}}
    return {**common, "input_shapes": {"observation.state": [STATE]}, "output_shapes": {"action": [ACTION]},
            "input_normalization_modes": {"observation.state": "min_max"},
            "output_normalization_modes": {"action": "min_max"}}


@pytest.fixture
def stats():
    g = torch.Generator().manual_seed(7)
    return {"observation.state.min": -torch.rand(STATE, generator=g) * 50, "observation.state.max": torch.rand(STATE, generator=g) * 500 + 1,
            "action.min": torch.tensor([10.0, 20.0]), "action.max": torch.tensor([500.0, 480.0])}


@pytest.mark.parametrize("new_style", [False, True], ids=["in-model-buffers", "processor-files"])
def test_lerobot_checkpoint_matches_reference(tmp_path, stats, new_style):
    folder = tmp_path / "outputs" / "pretrained_model"
    folder.mkdir(parents=True)
    tensors = lerobot_tensors(torch.Generator().manual_seed(0))
    (folder / "config.json").write_text(json.dumps(lerobot_config(new_style)))
    if new_style:
        save_file(tensors, str(folder / "model.safetensors"))
        save_file({k: v for k, v in stats.items()}, str(folder / "policy_preprocessor_step_3_normalizer_processor.safetensors"))
        save_file({k: v for k, v in stats.items() if k.startswith("action")},
                  str(folder / "policy_postprocessor_step_0_unnormalizer_processor.safetensors"))
    else:
        buffers = {f"normalize_inputs.buffer_observation_state.{s}": stats[f"observation.state.{s}"] for s in ("min", "max")}
        buffers |= {f"unnormalize_outputs.buffer_action.{s}": stats[f"action.{s}"] for s in ("min", "max")}
        buffers |= {f"normalize_targets.buffer_action.{s}": stats[f"action.{s}"].clone() for s in ("min", "max")}
        save_file({**tensors, **buffers}, str(folder / "model.safetensors"))

    policy = load_policy(tmp_path / "outputs")  # the training output folder resolves to pretrained_model/
    g = torch.Generator().manual_seed(1)
    x, t, cond = torch.randn(3, HORIZON, ACTION, generator=g), torch.tensor([0, 50, 99]), torch.randn(3, N_OBS, STATE, generator=g)
    torch.testing.assert_close(policy.denoiser(x, t, cond), reference_unet(tensors, x, t, cond), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(policy.action_normalizer.max, stats["action.max"])
    torch.testing.assert_close(policy.obs_normalizer.min, stats["observation.state.min"])
    actions = policy.predict_actions(torch.zeros(2, N_OBS, STATE), policy.make_solver("ddim", 5))
    assert actions.shape == (2, 4, ACTION)
    assert (actions >= 10.0 - 1e-3).all() and (actions[..., 0] <= 500.0 + 1e-3).all()  # clipped x0, unnormalised
    # without a solver named, a LeRobot checkpoint runs its own: DDPM with its step count
    assert policy.solver_settings() == ("ddpm", 100)
    own = policy.make_solver()
    assert own.name == "ddpm" and len(own.timesteps) == 100
    assert policy.solver_settings("ddim", 10) == ("ddim", 10)


def test_lerobot_image_policy_is_refused(tmp_path):
    config = lerobot_config(True)
    config["input_features"]["observation.image"] = {"type": "VISUAL", "shape": [3, 96, 96]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="images"):
        load_policy(tmp_path)


def test_lerobot_missing_statistics_is_an_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(lerobot_config(True)))
    save_file(lerobot_tensors(torch.Generator().manual_seed(0)), str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="min-max statistic"):
        load_policy(tmp_path)
