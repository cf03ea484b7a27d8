"""Solver parity: each rtdiff solver against its diffusers scheduler over a whole trajectory."""

import inspect
import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from rtdiff.runtime.solvers import SchedulerConfig, make_solver  # noqa: E402

ORACLES = {
    "ddpm": diffusers.DDPMScheduler,
    "ddim": diffusers.DDIMScheduler,
    "dpmpp": diffusers.DPMSolverMultistepScheduler,
}


def fake_model(x: torch.Tensor, t: int) -> torch.Tensor:
    """A deterministic, nonlinear stand-in for a network: the same outputs reach both solvers."""
    return torch.tanh(0.7 * x + 0.01 * t) + 0.1 * torch.sin(3.0 * x)


def rtdiff_trajectory(name, config, steps, x, seed):
    solver = make_solver(name, config, steps)
    from rtdiff.runtime.solvers import History

    history, generator, states = History(), torch.Generator().manual_seed(seed), []
    for i, t in enumerate(solver.timesteps):
        x0, eps = solver.predict(i, x, fake_model(x, t))
        history.append(t, x, x0, eps)
        x = solver.step(i, x, history, generator)
        states.append(x)
    return solver.timesteps, states


def diffusers_trajectory(name, config, steps, x, seed):
    options = dict(config.to_dict())
    if options["timestep_spacing"] is None:
        del options["timestep_spacing"]
    if name == "dpmpp":
        options.update(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint")
    accepted = inspect.signature(ORACLES[name].__init__).parameters
    oracle = ORACLES[name](**{k: v for k, v in options.items() if k in accepted})
    oracle.set_timesteps(steps)
    generator, states = torch.Generator().manual_seed(seed), []
    for t in oracle.timesteps:
        x = oracle.step(fake_model(x, int(t)), t, x, generator=generator).prev_sample
        states.append(x)
    return [int(t) for t in oracle.timesteps], states


CASES = [
    # (solver, steps, config overrides)
    ("ddpm", 100, {}),
    ("ddpm", 20, {"beta_schedule": "linear"}),
    ("ddpm", 25, {"prediction_type": "sample", "clip_sample": False}),
    ("ddim", 10, {}),
    ("ddim", 16, {"beta_schedule": "linear", "prediction_type": "sample"}),
    ("ddim", 10, {"timestep_spacing": "trailing", "num_train_timesteps": 1000, "clip_sample": False}),
    ("ddim", 8, {"prediction_type": "v_prediction", "set_alpha_to_one": False}),
    ("dpmpp", 10, {"clip_sample": False}),
    ("dpmpp", 20, {"beta_schedule": "linear", "prediction_type": "sample", "clip_sample": False}),
    ("dpmpp", 5, {"timestep_spacing": "trailing", "clip_sample": False, "num_train_timesteps": 1000}),
    ("dpmpp", 12, {"timestep_spacing": "leading", "clip_sample": False, "prediction_type": "v_prediction"}),
]


@pytest.mark.parametrize("name,steps,overrides", CASES)
def test_solver_matches_diffusers(name, steps, overrides):
    config = SchedulerConfig(**overrides)
    x = torch.randn(3, 16, 2, generator=torch.Generator().manual_seed(0))
    ours_t, ours = rtdiff_trajectory(name, config, steps, x.clone(), seed=1)
    theirs_t, theirs = diffusers_trajectory(name, config, steps, x.clone(), seed=1)
    assert ours_t == theirs_t
    for i, (a, b) in enumerate(zip(ours, theirs)):
        # 1e-5 absolute, and relative where unclipped states grow to 1e3+ and float32's own spacing exceeds 1e-5.
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m, i=i: f"step {i}: {m}")


def test_reads_diffusers_scheduler_config(tmp_path):
    oracle = diffusers.DDIMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=True)
    oracle.save_config(tmp_path)
    config = SchedulerConfig.from_file(tmp_path)
    assert config.num_train_timesteps == 100 and config.beta_schedule == "squaredcos_cap_v2" and config.clip_sample


def test_refuses_unsupported_options(tmp_path):
    (tmp_path / "scheduler_config.json").write_text(json.dumps({"thresholding": True}))
    with pytest.raises(ValueError, match="thresholding"):
        SchedulerConfig.from_file(tmp_path)
    with pytest.raises(ValueError, match="unknown solver 'euler'"):
        make_solver("euler", SchedulerConfig(), 10)
    with pytest.raises(ValueError, match="steps must be"):
        make_solver("ddim", SchedulerConfig(), 0)
