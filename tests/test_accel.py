"""Accelerator hooks: attached from outside, exact when they compute everything, honest in what they count."""

import re

import pytest
import torch

from rtdiff.runtime.accel import Accelerator, UniformCache, make_accelerator, parse_options
from rtdiff.runtime.accel.hooks import CacheHooks, remove_hooks


def carries_hooks(denoiser) -> bool:
    return any("forward" in module.__dict__ for _, module, _ in denoiser.cache_blocks())

def chunk(policy, accelerator=None, steps=10, seed=0):
    obs = torch.randn(2, policy.config.n_obs_steps, policy.config.obs_dim, generator=torch.Generator().manual_seed(1))
    solver = policy.make_solver("ddim", steps)
    return policy.predict_chunk(obs, solver, torch.Generator().manual_seed(seed), accelerator)


def test_computing_every_block_changes_nothing(policy):
    reference = chunk(policy)
    for accelerator in (Accelerator(), UniformCache(interval=1)):
        torch.testing.assert_close(chunk(policy, accelerator), reference, rtol=0, atol=0)
        assert accelerator.stats()["block_evals_fraction"] == 1.0
        assert accelerator.stats()["model_calls"] == 10


def test_uniform_cache_reuses_blocks_between_refreshes(policy):
    reference = chunk(policy)
    accelerator = UniformCache(interval=3)
    cached = chunk(policy, accelerator)
    stats = accelerator.stats()
    assert stats["model_calls"] == 10  # every step still calls the model; blocks inside are served
    assert stats["block_evals_fraction"] == pytest.approx(4 / 10)  # refreshed at steps 0, 3, 6, 9
    assert not torch.equal(cached, reference)
    assert torch.isfinite(cached).all()


def test_cache_does_not_leak_across_trajectories(policy):
    accelerator = UniformCache(interval=2)
    first = chunk(policy, accelerator, seed=0)
    chunk(policy, accelerator, seed=5)
    again = chunk(policy, accelerator, seed=0)
    torch.testing.assert_close(again, first, rtol=0, atol=0)


def test_hooks_leave_the_model_as_they_found_it(policy):
    reference = chunk(policy)
    classes_forward = {type(m).forward for _, m, _ in policy.denoiser.cache_blocks()}
    hooks = CacheHooks(policy.denoiser).attach()
    assert all("forward" in m.__dict__ for _, m, _ in policy.denoiser.cache_blocks())
    with pytest.raises(RuntimeError, match="already has a wrapped forward"):
        CacheHooks(policy.denoiser).attach()
    hooks.detach()
    assert all("forward" not in m.__dict__ for _, m, _ in policy.denoiser.cache_blocks())
    assert {type(m).forward for _, m, _ in policy.denoiser.cache_blocks()} == classes_forward
    torch.testing.assert_close(chunk(policy), reference, rtol=0, atol=0)


def test_a_block_cannot_be_served_before_it_was_computed(policy):
    hooks = CacheHooks(policy.denoiser).attach()
    try:
        with pytest.raises(RuntimeError, match="must be computed"):
            hooks.cache.set_step(set())
    finally:
        hooks.detach()


def test_unknown_accelerator_is_named():
    with pytest.raises(ValueError, match="unknown accelerator 'warp'"):
        make_accelerator("warp")


def test_hooks_outside_a_model_call_pass_through(policy):
    # the hooks stay on the model, but no request's cache is active between its calls: a request without an
    # accelerator computes exactly what the unhooked model does
    reference = chunk(policy)
    cached = chunk(policy, UniformCache(interval=2))
    assert carries_hooks(policy.denoiser) and not torch.equal(cached, reference)
    assert torch.equal(chunk(policy), reference)
    remove_hooks(policy.denoiser)
    assert not carries_hooks(policy.denoiser)


def test_accelerator_options_parse_as_json_and_reach_the_accelerator():
    options = parse_options("sada", ["threshold=0.05", "window=[0.2, 0.9]", "tokenwise=true", "max_consecutive=3"])
    assert options == {"threshold": 0.05, "window": [0.2, 0.9], "tokenwise": True, "max_consecutive": 3}
    sada = make_accelerator("sada", **options)
    assert (sada.threshold, sada.window, sada.tokenwise, sada.max_consecutive) == (0.05, (0.2, 0.9), True, 3)
    assert make_accelerator("uniform", **parse_options("uniform", ["interval=4"])).interval == 4
    assert make_accelerator("sada", **parse_options("sada", ["estimate=lagrange"])).estimator == "lagrange"


@pytest.mark.parametrize("name, pairs, message", [
    ("sada", ["speed=2"], "accelerator 'sada' has no option 'speed'; it takes: threshold, window"),
    ("none", ["interval=2"], "accelerator 'none' has no option 'interval'; it takes: none"),
    ("bac", ["schedule={}"], "accelerator 'bac' has no option 'schedule'"),
    ("sada", ["threshold"], "an accelerator option is KEY=VALUE, got 'threshold'"),
    ("sada", ["threshold=high"], "threshold must be a number, got 'high'"),
    ("sada", ["threshold=1e-2x"], "option threshold: '1e-2x' is not a JSON value"),
    ("sada", ["estimate=taylor"], "estimate must be 'eps' or 'lagrange', got 'taylor'"),
    ("warp", [], "unknown accelerator 'warp'"),
])
def test_bad_accelerator_options_are_named(name, pairs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_options(name, pairs)


@pytest.mark.parametrize("name, options, message", [
    ("sada", {"window": [0.9, 0.1]}, "window must be two fractions of the trajectory"),
    ("sada", {"window": [0.1]}, "window must be two fractions"),
    ("sada", {"threshold": "0.1"}, "threshold must be a number, got '0.1'"),
    ("sada", {"tokenwise": 1}, "tokenwise must be true or false, got 1"),
    ("sada", {"max_consecutive": 1.5}, "max_consecutive must be an integer >= 1, got 1.5"),
    ("sada", {"max_partial": -1}, "max_partial must be an integer >= 0"),
    ("uniform", {"interval": 2.5}, "uniform cache interval must be an integer >= 1, got 2.5"),
])
def test_accelerator_options_of_the_wrong_kind_are_refused_by_name(name, options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make_accelerator(name, **options)


class _TwoOutputs(torch.nn.Module):  # returns nested tensors, as a UNet's down stage does (output, skips)
    def forward(self, x):
        return x * 2, (x + 1,)


class _OneBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.block = _TwoOutputs()

    def cache_blocks(self):
        return [("block", self.block, "resolution_stage")]


def _served_at(reuse: str, computed: list[tuple[int, float]], step: int):
    model = _OneBlock()
    hooks = CacheHooks(model).attach()
    try:
        cache = hooks.cache
        cache.reuse = reuse
        for at, value in computed:
            cache.step = at
            cache.set_step({"block"})
            model.block(torch.tensor(value))
        cache.step = step
        cache.set_step(set())
        doubled, (plus_one,) = model.block(torch.tensor(99.0))  # not run: what stands in ignores the input
        return float(doubled), float(plus_one)
    finally:
        hooks.detach()


def test_linear_reuse_extrapolates_a_cached_block_through_its_last_two_computations():
    # the input grows by 1 a step, so the block's true outputs at step 3 are (8, 5)
    assert _served_at("linear", [(0, 1.0), (1, 2.0)], 3) == (8.0, 5.0)
    assert _served_at("last", [(0, 1.0), (1, 2.0)], 3) == (4.0, 3.0)
    assert _served_at("linear", [(0, 1.0)], 3) == (2.0, 2.0)  # one computation: nothing to extrapolate from
    assert _served_at("linear", [(0, 5.0), (2, 1.0), (4, 3.0)], 5) == (8.0, 5.0)  # the last two only, their spacing


def test_reuse_is_an_option_of_uniform_and_part_of_a_bac_schedule(policy):
    assert make_accelerator("uniform", **parse_options("uniform", ["reuse=linear"])).reuse == "linear"
    with pytest.raises(ValueError, match=re.escape("reuse must be one of ('last', 'linear')")):
        parse_options("uniform", ["reuse=cubic"])
    steps = list(range(0, 10, 3))
    schedule = {"steps": 10, "solver": "ddim", "reuse": "linear",
                "blocks": {name: steps for name, _, _ in policy.denoiser.cache_blocks()}}
    bac = make_accelerator("bac", schedule=schedule, solver="ddim", steps=10)
    uniform = UniformCache(interval=3, reuse="linear")
    torch.testing.assert_close(chunk(policy, bac), chunk(policy, uniform), rtol=0, atol=0)
    assert not torch.equal(chunk(policy, uniform), chunk(policy, UniformCache(interval=3)))
    assert bac.static_key() != make_accelerator("bac", schedule={**schedule, "reuse": "last"}, solver="ddim",
                                                steps=10).static_key()
