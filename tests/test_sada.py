"""SADA step skipping: where it may skip, what a skipped step integrates, and that it changes nothing when it never skips."""

import math

import pytest
import torch

from policies.config import PolicyConfig
from policies.modeling import DiffusionPolicy
from runtime.accel import make_accelerator
from runtime.sampling import sample


@pytest.fixture
def policy():
    torch.manual_seed(0)
    config = PolicyConfig(arch="unet", down_dims=(8, 16), n_groups=4, diffusion_step_embed_dim=8, horizon=8,
                          n_action_steps=4)
    return DiffusionPolicy(config).eval()


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
    accelerator = make_accelerator("sada", threshold=math.inf, window=(0.5, 0.7))  # skips step 3 only
    seen = {}

    def denoiser(x, t, cond):
        out = policy.denoiser(x, t, cond)
        seen[int(t[0])] = out
        return out

    x = torch.randn(1, 8, 2, generator=torch.Generator().manual_seed(2))
    cond = torch.randn(1, 2, 5)
    result = sample(denoiser, solver, x, cond, accelerator=accelerator)
    assert solver.timesteps[3] not in seen and len(seen) == 5
    # Replay by hand: steps 0-2 from the model, step 3 from step 2's eps, then the model again.
    from runtime.solvers import History

    history, xs = History(), x
    for i, t in enumerate(solver.timesteps):
        output = seen[solver.timesteps[2]] if i == 3 else seen[t]
        x0, eps = solver.predict(i, xs, output, kind="epsilon")
        history.append(t, xs, x0, eps)
        xs = solver.step(i, xs, history)
    torch.testing.assert_close(result, xs, rtol=1e-6, atol=1e-6)


def test_batch_skips_only_when_every_trajectory_is_stable(policy):
    accelerator = make_accelerator("sada", threshold=0.0)
    solver = policy.make_solver("ddim", 10)
    accelerator.begin(solver)
    from runtime.solvers import History

    history = History()
    for n in range(3):
        history.append(solver.timesteps[n], torch.randn(2, 8, 2), torch.zeros(2, 8, 2), torch.randn(2, 8, 2))
    x = torch.randn(2, 8, 2)
    scores = accelerator.stability_score(3, x, history)
    assert scores.shape == (2,)
    expected = "skip" if scores.max() <= 0 else "full"
    assert accelerator.plan_step(3, x, history) == expected


def test_bac_inside_sada_steps(policy):
    names = [name for name, _ in policy.denoiser.cache_blocks()]
    schedule = {"steps": 10, "blocks": {n: [0, 3, 6] if k % 2 else list(range(10)) for k, n in enumerate(names)}}

    bac_only = make_accelerator("bac", schedule=schedule, solver="ddim", steps=10)
    reference = run(policy, bac_only)
    bac_only.unbind()
    never_skips = make_accelerator("bac+sada", schedule=schedule, solver="ddim", steps=10, threshold=-math.inf)
    torch.testing.assert_close(run(policy, never_skips), reference, rtol=0, atol=0)
    never_skips.unbind()

    # Step 3 is skipped (window covers only it), so the blocks scheduled there refresh at step 4 instead.
    composed = make_accelerator("bac+sada", schedule=schedule, solver="ddim", steps=10, threshold=math.inf,
                                window=(0.3, 0.4))
    computed = []
    original = composed.before_model_call
    composed.before_model_call = lambda i: (original(i), computed.append((i, set(composed.hooks.cache.compute))))
    run(policy, composed)
    plans = dict(computed)
    assert 3 not in plans and composed.stats()["model_calls"] == 9
    assert plans[4] == set(names)  # odd blocks: pending from step 3; even blocks: scheduled every step
    assert plans[5] == {n for k, n in enumerate(names) if k % 2 == 0}
