"""The flow-matching Euler solver against diffusers' FlowMatchEulerDiscreteScheduler, and SADA on a flow model."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from rtdiff.runtime.accel import make_accelerator  # noqa: E402
from rtdiff.runtime.flow_matching import FlowMatchConfig  # noqa: E402
from rtdiff.runtime.sampling import sample, trajectory  # noqa: E402
from rtdiff.runtime.solvers import make_solver  # noqa: E402


def velocity_model(x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
    """A smooth, nonlinear stand-in for a network, the same for both sides."""
    t = t.reshape(-1, *([1] * (x.ndim - 1))) / 1000
    return torch.tanh(0.8 * x + t) - 0.3 * torch.sin(2.0 * x) * t


@pytest.mark.parametrize("steps, options", [(10, {}), (25, {"shift": 3.0}), (7, {"shift": 5.0}),
                                            (50, {"shift": 3.0, "shift_terminal": 0.02}), (4, {"shift": 1.7})])
def test_flow_euler_matches_diffusers_over_a_whole_trajectory(steps, options):
    x = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(steps))
    reference = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **options)
    reference.set_timesteps(steps)
    solver = make_solver("flow", FlowMatchConfig(**options), steps)
    assert torch.allclose(torch.tensor(solver.timesteps), reference.timesteps, rtol=1e-6, atol=1e-4)

    expected = x.clone()
    for t in reference.timesteps:
        expected = reference.step(velocity_model(expected, t[None]), t, expected).prev_sample
    ours = sample(velocity_model, solver, x.clone(), None)
    assert (ours - expected).abs().max() <= 1e-5


def test_unsupported_diffusers_options_are_refused_by_name():
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        FlowMatchConfig.from_dict({"use_dynamic_shifting": True, "shift": 3.0})
    config = FlowMatchConfig.from_dict(dict(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).config))
    assert config.shift == 3.0 and config.num_train_timesteps == 1000
    with pytest.raises(ValueError, match="flow-matching scheduler config"):
        make_solver("flow", object(), 10)


def test_sada_on_a_flow_model_skips_stable_steps_and_extrapolates_the_velocity():
    solver = make_solver("flow", FlowMatchConfig(shift=3.0), 20)
    x = torch.randn(1, 8, 4, generator=torch.Generator().manual_seed(0))
    reference = sample(velocity_model, solver, x.clone(), None)
    sada = make_accelerator("sada", threshold=1e9, window=[0.0, 1.0], max_consecutive=1)  # every allowed skip
    steps = list(trajectory(velocity_model, solver, x.clone(), None, accelerator=sada))
    skipped = [step.i for step in steps if not step.model_called]
    assert skipped and all(i >= 3 for i in skipped) and all(b - a > 1 for a, b in zip(skipped, skipped[1:]))
    # a skipped step's velocity is 2 v_{n-1} - v_{n-2}; Euler's velocity at step n is (x_{n+1} - x_n) / dsigma_n
    samples = [x] + [step.x for step in steps]
    v = [(samples[n + 1] - samples[n]) / (solver.sigmas[n + 1] - solver.sigmas[n]) for n in range(len(steps))]
    k = skipped[0]
    assert torch.allclose(v[k], 2 * v[k - 1] - v[k - 2], atol=1e-4)
    assert (steps[-1].x - reference).abs().max() < 0.05  # a smooth model: skipping costs little
    never = make_accelerator("sada", threshold=-1e9)
    assert torch.equal(sample(velocity_model, solver, x.clone(), None, accelerator=never), reference)
