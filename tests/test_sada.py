"""SADA step skipping: where it may skip, what a skipped step integrates, and that it changes nothing when it never skips."""

import math

import pytest
import torch

from rtdiff.runtime.accel import make_accelerator
from rtdiff.runtime.sampling import sample


@pytest.fixture
def policy(make_tiny):  # the UNet only: these tests are about step skipping
    return make_tiny("unet")


def run(policy, accelerator, solver="ddim", steps=10):
    obs = torch.randn(1, 2, 5, generator=torch.Generator().manual_seed(1))
    return policy.predict_chunk(obs, policy.make_solver(solver, steps), torch.Generator().manual_seed(0), accelerator)


def test_never_stable_means_never_skipped(policy):
    accelerator = make_accelerator("sada", threshold=-math.inf)
    torch.testing.assert_close(run(policy, accelerator), run(policy, None), rtol=0, atol=0)
    assert accelerator.stats()["model_calls"] == 10


@pytest.mark.parametrize("max_consecutive,expected_skips", [(1, [3, 5, 7]), (2, [3, 4, 6, 7])])
def test_always_stable_skips_only_inside_the_window(policy, max_consecutive, expected_skips):
    calls = []
    accelerator = make_accelerator("sada", threshold=math.inf, window=(0.2, 0.9), max_consecutive=max_consecutive)
    original = accelerator.before_model_call
    accelerator.before_model_call = lambda i: (calls.append(i), original(i))
    run(policy, accelerator)
    assert sorted(set(range(10)) - set(calls)) == expected_skips
    assert accelerator.stats()["model_calls"] == 10 - len(expected_skips)


def test_a_skipped_step_reuses_the_last_noise_estimate_at_the_current_sample(policy):
    solver = policy.make_solver("ddim", 6)
    accelerator = make_accelerator("sada", threshold=math.inf, window=(0.5, 0.7), max_consecutive=1)  # step 3 only
    seen = {}

    def denoiser(x, t, cond):
        out = policy.denoiser(x, t, cond)
        seen[int(t[0])] = out
        return out

    x = torch.randn(1, 8, 2, generator=torch.Generator().manual_seed(2))
    cond = torch.randn(1, 2, 5)
    result = sample(denoiser, solver, x, {"cond": cond}, accelerator=accelerator)
    assert solver.timesteps[3] not in seen and len(seen) == 5
    # Replay by hand: steps 0-2 from the model, step 3 from step 2's eps, then the model again.
    from rtdiff.runtime.solvers import History

    history, xs = History(), x
    for i, t in enumerate(solver.timesteps):
        output = seen[solver.timesteps[2]] if i == 3 else seen[t]
        x0, eps = solver.predict(i, xs, output, kind="epsilon")
        history.append(t, xs, x0, eps)
        xs = solver.step(i, xs, history)
    torch.testing.assert_close(result, xs, rtol=1e-6, atol=1e-6)


def test_lagrange_estimate_extrapolates_x0_through_the_last_three_model_calls(policy):
    from rtdiff.runtime.accel.sada import _lagrange

    timesteps = [900, 700, 500, 300]
    quadratic = [torch.full((2,), 1.0 + 0.01 * t + 1e-5 * t * t) for t in timesteps]  # exact for a parabola
    torch.testing.assert_close(_lagrange(timesteps, [0, 1, 2], quadratic, 3), quadratic[3])

    solver = policy.make_solver("ddim", 6)
    accelerator = make_accelerator("sada", threshold=math.inf, window=(0.5, 0.7), max_consecutive=1,
                                   estimate="lagrange")  # step 3 only, from the model calls at 0, 1, 2
    from rtdiff.runtime.solvers import History

    history, x = History(), torch.randn(1, 8, 2)
    accelerator.begin(solver)
    for n in range(3):
        history.append(solver.timesteps[n], torch.randn(1, 8, 2), torch.randn(1, 8, 2), torch.randn(1, 8, 2))
    x0, eps = accelerator.estimate(3, x, history)
    expected = _lagrange(solver.timesteps, [0, 1, 2], history.x0, 3)
    if solver.config.clip_sample:
        expected = expected.clamp(-solver.config.clip_sample_range, solver.config.clip_sample_range)
    torch.testing.assert_close(x0, expected)
    with pytest.raises(ValueError, match="estimate must be 'eps' or 'lagrange'"):
        make_accelerator("sada", estimate="taylor")


def test_batch_skips_only_when_every_trajectory_is_stable(policy):
    accelerator = make_accelerator("sada", threshold=0.0)
    solver = policy.make_solver("ddim", 10)
    accelerator.begin(solver)
    from rtdiff.runtime.solvers import History

    history = History()
    for n in range(3):
        history.append(solver.timesteps[n], torch.randn(2, 8, 2), torch.zeros(2, 8, 2), torch.randn(2, 8, 2))
    x = torch.randn(2, 8, 2)
    scores = accelerator.stability_score(3, x, history)
    assert scores.shape == (2,)
    expected = "skip" if scores.max() <= 0 else "full"
    assert accelerator.plan_step(3, x, history) == expected


def test_skip_lattice_leaves_every_run_an_anchor():
    from rtdiff.runtime.accel.composed import skip_lattice

    assert sorted(skip_lattice(10, (0.1, 0.97), 1)) == [3, 5, 7, 9]
    assert sorted(skip_lattice(10, (0.1, 0.97), 2)) == [3, 4, 6, 7, 9]
    assert sorted(skip_lattice(10, (0.5, 0.8), 1)) == [5, 7]


def test_bac_and_sada_never_share_a_step(policy):
    names = [name for name, _, _ in policy.denoiser.cache_blocks()]
    # odd blocks refresh at 0, 3, 6; even blocks at 0, 4, 8: steps 1, 2, 5, 7, 9 refresh nothing
    schedule = {"steps": 10, "blocks": {n: [0, 3, 6] if k % 2 else [0, 4, 8] for k, n in enumerate(names)}}

    bac_only = make_accelerator("bac", schedule=schedule, solver="ddim", steps=10)
    reference, bac_fraction = run(policy, bac_only), bac_only.stats()["block_evals_fraction"]
    bac_only.unbind()
    never_skips = make_accelerator("bac+sada", schedule=schedule, solver="ddim", steps=10, threshold=-math.inf)
    torch.testing.assert_close(run(policy, never_skips), reference, rtol=0, atol=0)
    never_skips.unbind()

    always_skips = make_accelerator("bac+sada", schedule=schedule, solver="ddim", steps=10, threshold=math.inf,
                                    window=(0.0, 1.0), max_consecutive=2)
    computed = []
    original = always_skips.before_model_call
    always_skips.before_model_call = lambda i: (original(i), computed.append((i, set(always_skips.cache.compute))))
    run(policy, always_skips)
    plans = dict(computed)
    assert sorted(plans) == [0, 1, 2, 3, 4, 6, 8]  # 5, 7, 9 skipped; 1, 2 too early for the criterion
    assert all(plans[i] == {n for n in names if i in schedule["blocks"][n]} for i in plans)  # BAC's plan, unmoved
    assert always_skips.stats()["block_evals_fraction"] == bac_fraction  # every refresh still happens


def test_a_bac_sada_schedule_limits_skips_to_its_lattice_and_sets_sada_defaults(policy):
    names = [name for name, _, _ in policy.denoiser.cache_blocks()]
    schedule = {"steps": 10, "blocks": {n: [0, 2, 5, 8] for n in names}, "skippable": [3, 6],
                "sada": {"window": [0.0, 1.0], "max_consecutive": 1}}
    accelerator = make_accelerator("bac+sada", schedule=schedule, solver="ddim", steps=10, threshold=math.inf)
    run(policy, accelerator)
    assert accelerator.skipper.window == (0.0, 1.0) and accelerator.skipper.max_consecutive == 1
    assert accelerator.stats()["skipped_steps"] == 2  # 3 and 6; 4, 7, 9 refresh nothing but are not on the lattice


def test_bac_sada_makes_no_partial_call_when_sada_is_told_not_to(make_tiny):
    transformer = make_tiny("transformer")
    names = [name for name, _, _ in transformer.denoiser.cache_blocks()]
    schedule = {"steps": 10, "blocks": {n: [0, 4, 8] for n in names}}
    accelerator = make_accelerator("bac+sada", schedule=schedule, solver="ddim", steps=10, threshold=-math.inf,
                                   token_threshold=math.inf, tokenwise=False)
    run(transformer, accelerator)
    assert accelerator.stats()["partial_steps"] == 0


# Token-wise sparsity (transformer policies): partial calls recompute only the unstable action tokens.

@pytest.fixture
def transformer(make_tiny):
    return make_tiny("transformer")


def test_partial_call_recomputes_named_tokens_and_serves_the_rest_from_cache(transformer):
    from rtdiff.runtime.accel.hooks import CacheHooks

    denoiser = transformer.denoiser
    blocks = {block.name: block.module for block in denoiser.cache_blocks()}
    tokenwise = dict(denoiser.tokenwise_blocks())
    cond, t = torch.randn(2, 2, 5), torch.full((2,), 50)
    tokens, others = torch.tensor([1, 4]), [0, 2, 3, 5]
    with CacheHooks(denoiser) as hooks:
        everything = set(hooks.cache.names)
        hooks.cache.set_step(everything)
        denoiser(torch.randn(2, 6, 2), t, cond)
        stale = {name: out.clone() for name, out in hooks.cache.outputs.items()}
        inputs = {}
        for name, module in blocks.items():  # sees each block's full inputs at the partial call
            module.register_forward_hook(lambda m, args, out, name=name: inputs.__setitem__(name, args))
        hooks.cache.set_step(everything, tokens)
        before = hooks.cache.evaluated
        denoiser(torch.randn(2, 6, 2), t, cond)
        partial = dict(hooks.cache.outputs)
        n_self = len(everything) - len(tokenwise)
        assert hooks.cache.evaluated - before == pytest.approx(n_self + len(tokenwise) * 2 / 6)
    assert set(tokenwise) == {n for n in everything if not n.endswith("self_attn")}
    for name in tokenwise:
        selected, positions = tokenwise[name](inputs[name], tokens, (6,))
        assert torch.equal(positions, tokens)
        fresh = type(blocks[name]).forward(blocks[name], *selected)
        torch.testing.assert_close(partial[name][:, tokens], fresh, rtol=0, atol=0)
        torch.testing.assert_close(partial[name][:, others], stale[name][:, others], rtol=0, atol=0)
    for name in everything - set(tokenwise):  # blocks that mix tokens always run in full
        torch.testing.assert_close(partial[name], type(blocks[name]).forward(blocks[name], *inputs[name]))


def test_selected_cross_attention_equals_full_cross_attention_at_those_tokens(transformer):
    denoiser = transformer.denoiser
    name, select = next((n, f) for n, f in denoiser.tokenwise_blocks() if n.endswith("cross_attn"))
    block = {block.name: block.module for block in denoiser.cache_blocks()}[name]
    x, cond, memory = torch.randn(2, 6, 16), torch.randn(2, 16), torch.randn(2, 3, 16)
    torch.nn.init.normal_(block.modulation.linear.weight)  # adaLN-Zero starts at zero; make the gate non-trivial
    tokens = torch.tensor([0, 2, 5])
    full = block(x, cond, memory, denoiser.memory_mask)
    assert full.abs().max() > 0
    selected, positions = select((x, cond, memory, denoiser.memory_mask), tokens, (6,))
    torch.testing.assert_close(block(*selected), full[:, positions])


def test_sada_plans_partial_calls_and_refreshes_after_max_partial(transformer):
    accelerator = make_accelerator("sada", threshold=-math.inf, token_threshold=math.inf, window=(0.3, 0.9),
                                   tokenwise=True, max_partial=2)
    plans = []
    original = accelerator.plan_step
    accelerator.plan_step = lambda i, x, h: plans.append(original(i, x, h)) or plans[-1]
    run(transformer, accelerator)
    # Steps 3..8 are in the window; every token stable but no step may be skipped -> one token per partial call.
    assert plans == ["full"] * 3 + ["partial", "partial", "full"] * 2 + ["full"]
    stats = accelerator.stats()
    assert stats["model_calls"] == 10 and stats["partial_steps"] == 4
    assert stats["block_evals_fraction"] < 1.0


def test_sada_without_partial_calls_is_exact_on_the_transformer(transformer):
    reference = run(transformer, None)  # first: once bound, the model refuses to run without its accelerator
    exact = make_accelerator("sada", threshold=-math.inf, token_threshold=-math.inf, tokenwise=True)  # all unstable
    torch.testing.assert_close(run(transformer, exact), reference, rtol=0, atol=0)
    assert exact.stats()["partial_steps"] == 0


def test_unet_has_no_token_wise_path(policy):
    accelerator = make_accelerator("sada", threshold=-math.inf, token_threshold=math.inf, tokenwise=True)
    torch.testing.assert_close(run(policy, accelerator), run(policy, None), rtol=0, atol=0)
    assert accelerator.hooks is None and accelerator.stats()["partial_steps"] == 0
