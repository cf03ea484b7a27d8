"""The causal sliding-window sampler (runtime/windows.py): its ties, its noise, what it settles and emits."""

import pytest
import torch

from rtdiff.runtime.flow_matching import FlowMatchConfig
from rtdiff.runtime.sampling import sample
from rtdiff.runtime.solvers import SchedulerConfig, make_solver
from rtdiff.runtime.windows import (CrossFade, Emitter, NoiseTimeline, WindowPlan, fusion_weights,
                                    sliding_windows)

CONFIG = SchedulerConfig(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.0015,
                         beta_end=0.0195, clip_sample=False)


class TimeMixer(torch.nn.Module):
    """An epsilon model whose output at a frame depends on its neighbours in time, so windows see each other."""

    def forward(self, x, t, level=None):
        smoothed = torch.nn.functional.avg_pool2d(x, (3, 1), stride=1, padding=(1, 0), count_include_pad=False)
        shift = 0.0 if level is None else level.view(-1, 1, 1, 1)
        return torch.tanh(0.8 * smoothed + 0.3 * x + shift) * (1 + t.view(-1, 1, 1, 1) / 2000)


def windows(plan, frames, solver="dpmpp", steps=8, seed=0, cond=lambda k: {}):
    noise = NoiseTimeline((1, 2, 1, 3), torch.Generator().manual_seed(seed))
    return [w for w in sliding_windows(TimeMixer(), make_solver(solver, CONFIG, steps), plan, noise, cond, frames)
            if w is not None]


@pytest.mark.parametrize("solver", ["ddim", "dpmpp"])
def test_one_window_is_the_plain_trajectory(solver):
    plan = WindowPlan(window=12, overlap=4)
    (only,) = windows(plan, 12, solver)
    noise = NoiseTimeline((1, 2, 1, 3), torch.Generator().manual_seed(0)).frames(0, 12)
    assert torch.equal(only.latent, sample(TimeMixer(), make_solver(solver, CONFIG, 8), noise, {}))
    assert only.last and only.settled == 12


def test_noise_timeline_does_not_depend_on_how_it_is_read():
    one = NoiseTimeline((1, 2, 1, 3), torch.Generator().manual_seed(3)).frames(0, 20)
    parts = NoiseTimeline((1, 2, 1, 3), torch.Generator().manual_seed(3))
    first, second = parts.frames(0, 12), parts.frames(8, 20)
    assert torch.equal(first, one[:, :, :12]) and torch.equal(second, one[:, :, 8:])
    with pytest.raises(ValueError, match="already dropped"):
        parts.frames(0, 4)


@pytest.mark.parametrize("solver", ["ddim", "dpmpp"])
def test_inpainting_holds_the_overlap_to_the_previous_windows_final_latent(solver):
    plan = WindowPlan(window=12, overlap=4, tie="inpaint")
    found = windows(plan, 30, solver)
    assert [w.start for w in found] == [0, 8, 16, 24] and found[-1].last
    for before, after in zip(found, found[1:]):
        assert torch.equal(after.latent[:, :, :4], before.latent[:, :, -4:])
        assert not torch.equal(after.latent[:, :, 4:8], before.latent[:, :, -4:])  # the rest is its own
    assert all(w.settled == w.start + 12 for w in found)


def test_fusion_blends_from_the_previous_window_into_the_current():
    plan = WindowPlan(window=12, overlap=4, tie="fusion")
    found = windows(plan, 30)
    for before, after in zip(found, found[1:]):
        # weight 0 on the oldest overlap frame: the previous window's sample there, step after step
        assert torch.equal(after.latent[:, :, 0], before.latent[:, :, 8])
        assert not torch.equal(after.latent[:, :, 3], before.latent[:, :, 11])
    assert [w.settled for w in found] == [8, 16, 24, 36]  # the overlap settles only when the next window is done


def test_fusion_weights():
    assert torch.allclose(fusion_weights(5), torch.tensor([0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64))
    log = fusion_weights(5, "log")
    assert log[0] == 0 and log[-1] == pytest.approx(1.0) and log[1] > 0.25  # hands over sooner than linear
    assert torch.all(log[1:] > log[:-1])


@pytest.mark.parametrize("tie", ["fusion", "inpaint"])
def test_windows_are_causal(tie):
    """Window k does not depend on how long the stream will run: an endless stream's first windows are a finite
    one's."""
    plan = WindowPlan(window=12, overlap=4, tie=tie)
    finite = windows(plan, 40)
    endless = sliding_windows(TimeMixer(), make_solver("dpmpp", CONFIG, 8), plan,
                              NoiseTimeline((1, 2, 1, 3), torch.Generator().manual_seed(0)), lambda k: {}, None)
    found = []
    for w in endless:
        if w is not None:
            found.append(w)
            if len(found) == 3:
                break
    for a, b in zip(found, finite):
        assert torch.equal(a.latent, b.latent)


def test_conditioning_may_change_between_windows():
    plan = WindowPlan(window=12, overlap=4)
    same = windows(plan, 30, cond=lambda k: {"level": torch.tensor([0.0])})
    changed = windows(plan, 30, cond=lambda k: {"level": torch.tensor([0.0 if k < 2 else 1.0])})
    assert torch.equal(same[1].latent, changed[1].latent)
    assert not torch.equal(same[2].latent, changed[2].latent)


@pytest.mark.parametrize("solver", ["ddim", "dpmpp", "flow"])
def test_level_is_where_the_trajectory_is(solver):
    """For data that is one point, the exact model keeps a deterministic trajectory on alpha x0 + sigma noise:
    `Solver.level(i)` must name those coefficients after every step (what inpainting noises to)."""
    x0 = torch.tensor([[0.5, -1.0, 2.0]])
    z = torch.tensor([[1.0, 0.3, -0.7]])
    config = FlowMatchConfig(shift=3.0) if solver == "flow" else CONFIG
    run = make_solver(solver, config, 10)

    def exact(x, t):
        if solver == "flow":
            return z - x0  # velocity
        alpha, sigma = run.level(i - 1)
        return (x - alpha * x0) / sigma  # epsilon

    alpha, sigma = run.level(-1)
    x = alpha * x0 + sigma * z
    from rtdiff.runtime.solvers import History

    history = History()
    for i, t in enumerate(run.timesteps):
        pred_x0, eps = run.predict(i, x, exact(x, t))
        history.append(t, x, pred_x0, eps)
        x = run.step(i, x, history)
        alpha, sigma = run.level(i)
        assert torch.allclose(x, alpha * x0 + sigma * z, atol=1e-5), (i, alpha, sigma)
    assert run.level(len(run.timesteps) - 1) == (1.0, 0.0)


@pytest.mark.parametrize("tie", ["fusion", "inpaint"])
def test_emitter_covers_the_timeline_once_with_context(tie):
    plan = WindowPlan(window=12, overlap=4, tie=tie)
    found = windows(plan, 30)
    emitter = Emitter(plan, context=2, length=30)
    segments = [s for s in map(emitter.push, found) if s is not None]
    assert segments[0].start == 0 and segments[-1].end == 30 and segments[-1].last
    for before, after in zip(segments, segments[1:]):
        assert after.start == before.end
    timeline = {}  # the settled value of each frame, from the window that settled it
    for w in found:
        for j in range(w.latent.shape[2]):
            if w.start + j < w.settled:
                timeline.setdefault(w.start + j, w.latent[:, :, j])
                if tie == "fusion":
                    timeline[w.start + j] = w.latent[:, :, j]  # a later window's fused overlap replaces it
    for s in segments:
        assert s.latent.shape[2] == s.left + s.end - s.start + s.right
        assert s.left == (0 if s.start == 0 else 2) and s.right == (0 if s.last else 2)
        for j in range(s.start - s.left, s.end):
            assert torch.equal(s.latent[:, :, j - s.start + s.left], timeline[j])


@pytest.mark.parametrize("fade_length", [0, 15])
def test_cross_fade_joins_segments_without_a_step(fade_length):
    plan = WindowPlan(window=12, overlap=4, tie="inpaint")
    emitter = Emitter(plan, context=2, length=30)
    fade = CrossFade(rate=10, fade=fade_length)
    pieces = []
    for w in windows(plan, 30):
        segment = emitter.push(w)
        if segment is None:
            continue
        # a decoder whose output is a ramp in time plus an offset that differs per segment, as two decodes of
        # the same frames differ: unfaded, each boundary jumps by the offsets' difference, 0.5
        time = torch.arange((segment.start - segment.left) * 10, (segment.end + segment.right) * 10) / 10.0
        pieces.append(fade(time + 0.5 * len(pieces), segment))
    signal = torch.cat(pieces)
    assert signal.shape[0] == 300
    jumps = (signal[1:] - signal[:-1]).abs()
    boundaries = torch.cumsum(torch.tensor([p.shape[0] for p in pieces[:-1]]), 0) - 1
    if fade_length:
        assert jumps.max() < 0.2
    else:
        assert torch.allclose(jumps[boundaries], torch.tensor(0.6))


def test_plans_refuse_what_cannot_tie():
    with pytest.raises(ValueError, match="overlap"):
        WindowPlan(window=8, overlap=8)
    with pytest.raises(ValueError, match="fusion needs"):
        WindowPlan(window=8, overlap=1, tie="fusion")
    with pytest.raises(ValueError, match="unknown window tie"):
        WindowPlan(window=8, overlap=2, tie="average")
