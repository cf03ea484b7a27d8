"""Policies: shapes, cache blocks, checkpoints (and how bad ones fail), training windows and learning."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from rtdiff.policies.checkpoint import load_policy, save_policy
from rtdiff.policies.normalizer import MinMaxNormalizer
from rtdiff.policies.train import TrainConfig, train, windows
from rtdiff.sims.demos import Demos

def test_denoiser_shapes(policy):
    c = policy.config
    x = torch.randn(3, c.horizon, c.action_dim)
    out = policy.denoiser(x, torch.tensor([0, 5, 99]), torch.randn(3, c.n_obs_steps, c.obs_dim))
    assert out.shape == x.shape and torch.isfinite(out).all()
    actions = policy.predict_actions(torch.randn(2, c.n_obs_steps, c.obs_dim), policy.make_solver("dpmpp", 4))
    assert actions.shape == (2, c.n_action_steps, c.action_dim)


def test_cache_blocks_are_listed_in_execution_order(policy):
    blocks = policy.denoiser.cache_blocks()
    assert len(blocks) >= 4
    called = []
    handles = [module.register_forward_hook(lambda m, a, o, name=name: called.append(name)) for name, module, _ in blocks]
    c = policy.config
    policy.denoiser(torch.randn(1, c.horizon, c.action_dim), torch.tensor([3]), torch.randn(1, c.n_obs_steps, c.obs_dim))
    for handle in handles:
        handle.remove()
    assert called == [name for name, _, _ in blocks]


def test_checkpoint_round_trip(policy, tmp_path):
    policy.obs_normalizer.fit(torch.rand(10, policy.config.obs_dim) * 500)
    save_policy(policy, tmp_path / "ck")
    loaded = load_policy(tmp_path / "ck")
    obs = torch.rand(2, policy.config.n_obs_steps, policy.config.obs_dim) * 500
    solver = policy.make_solver("ddim", 5)
    a = policy.predict_actions(obs, solver, torch.Generator().manual_seed(3))
    b = loaded.predict_actions(obs, solver, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_checkpoints_fail_whole_with_a_named_problem(policy, tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-checkpoint"):
        load_policy("no-such-checkpoint")
    folder = save_policy(policy, tmp_path / "ck")
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        load_policy(folder)

    folder = save_policy(policy, tmp_path / "ck2")
    (folder / "model.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_policy(folder)

    folder = save_policy(policy, tmp_path / "ck3")
    (folder / "config.json").write_text("{ not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_policy(folder)

    folder = save_policy(policy, tmp_path / "ck4")
    config = json.loads((folder / "config.json").read_text())
    config["n_emb" if policy.config.arch == "transformer" else "diffusion_step_embed_dim"] *= 2
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="has shape"):
        load_policy(folder)

    folder = save_policy(policy, tmp_path / "ck5")
    tensors = {k: v.clone() for k, v in policy.state_dict().items()}
    tensors.pop(next(iter(tensors)))
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="missing"):
        load_policy(folder)

    folder = save_policy(policy, tmp_path / "ck6")
    (folder / "config.json").write_text(json.dumps({**config, "format": "something-else/9"}))
    with pytest.raises(ValueError, match="in no format rtdiff knows"):
        load_policy(folder)


def test_wrong_observation_shape_is_refused(policy):
    with pytest.raises(ValueError, match=r"observation history must have shape \(batch, 2, 5\), got \(1, 2, 4\)"):
        policy.predict_actions(torch.zeros(1, 2, 4), policy.make_solver("ddim", 3))


def test_normalizer_maps_data_range_to_unit_interval():
    data = torch.tensor([[0.0, 10.0], [512.0, 30.0], [256.0, 20.0]])
    norm = MinMaxNormalizer(2).fit(data)
    torch.testing.assert_close(norm.normalize(data)[:2], torch.tensor([[-1.0, -1.0], [1.0, 1.0]]))
    torch.testing.assert_close(norm.unnormalize(norm.normalize(data)), data)


def toy_demos(lengths=(5, 9)) -> Demos:
    obs = np.concatenate([np.arange(n, dtype=np.float32)[:, None].repeat(5, 1) + 100 * k for k, n in enumerate(lengths)])
    actions = obs[:, :2].copy()
    return Demos(obs, actions, np.cumsum(lengths), {})


def test_training_windows_pad_like_diffusion_policy(make_tiny):
    config = make_tiny("unet").config  # n_obs 2, horizon 8, n_action 4
    obs, actions = windows(toy_demos(), config)
    # Each episode of length n yields n - horizon + (n_obs - 1) + (n_action - 1) + 1 windows.
    assert len(obs) == (5 - 8 + 1 + 3 + 1) + (9 - 8 + 1 + 3 + 1)
    np.testing.assert_array_equal(obs[0, :, 0], [0, 0])  # the first step repeated before the start
    np.testing.assert_array_equal(actions[0, :, 0], [0, 0, 1, 2, 3, 4, 4, 4])  # the last action repeated after
    assert not np.any((actions[:2] >= 100))  # windows never cross an episode boundary


def wave_demos() -> Demos:
    rng = np.random.default_rng(0)
    t = np.linspace(0, 1, 40, dtype=np.float32)
    episodes = [(np.stack([np.cos(t * 3 + p)] * 5, 1), np.stack([np.sin(t * 3 + p)] * 2, 1)) for p in rng.uniform(0, 6, 6)]
    return Demos(np.concatenate([o for o, _ in episodes]), np.concatenate([a for _, a in episodes]),
                 np.cumsum([40] * 6), {})


def test_training_reduces_the_denoising_loss(make_tiny):
    demos, config = wave_demos(), make_tiny("unet").config
    _, short = train(demos, config, TrainConfig(steps=5, batch_size=64, warmup_steps=1, threads=1), progress=False)
    _, longer = train(demos, config, TrainConfig(steps=200, batch_size=64, warmup_steps=10, threads=1), progress=False)
    assert longer["final_loss"] < 0.75 * short["final_loss"]  # an untrained epsilon model sits near 1.0


def test_training_goes_on_from_a_checkpoint_and_leaves_it_untouched(make_tiny):
    demos, config = wave_demos(), make_tiny("unet").config
    short = TrainConfig(steps=5, batch_size=64, warmup_steps=1, threads=1)
    trained, _ = train(demos, config, TrainConfig(steps=200, batch_size=64, warmup_steps=10, threads=1), progress=False)
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    _, afresh = train(demos, config, short, progress=False)
    _, resumed = train(demos, config, short, progress=False, init=trained)
    assert resumed["final_loss"] < 0.75 * afresh["final_loss"]
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in before.items())
    other = make_tiny("transformer").config
    with pytest.raises(ValueError, match="another config"):
        train(demos, other, short, progress=False, init=trained)


def test_adaln_transformer_starts_as_zero_and_plain_one_keeps_diffusion_policy_layout():
    from rtdiff.policies.config import PolicyConfig
    from rtdiff.policies.modeling import DiffusionPolicy

    config = dict(arch="transformer", n_layer=2, n_head=2, n_emb=16, horizon=6, n_action_steps=4)
    torch.manual_seed(0)
    adaln = DiffusionPolicy(PolicyConfig(**config, adaln=True)).denoiser
    x, t, cond = torch.randn(3, 6, 2), torch.tensor([0, 50, 99]), torch.randn(3, 2, 5)
    assert torch.equal(adaln(x, t, cond), torch.zeros(3, 6, 2))  # adaLN-Zero: gates and head at zero
    plain = DiffusionPolicy(PolicyConfig(**config, adaln=False)).denoiser
    names = set(plain.state_dict())
    assert not any("modulation" in n or n.startswith("cond_emb") for n in names)
    assert {"layers.0.self_attn.norm.weight", "ln_f.weight"} <= names  # affine pre-norms, as Diffusion Policy's
    assert plain(x, t, cond).abs().sum() > 0


def test_blocks_declare_their_kinds(make_tiny):
    kinds = {arch: {kind for _, _, kind in make_tiny(arch).denoiser.cache_blocks()} for arch in ("unet", "transformer")}
    assert kinds == {"unet": {"resolution_stage"}, "transformer": {"attention", "cross_attention", "feed_forward"}}
