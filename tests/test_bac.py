"""BAC: the exact scheduler against brute force, bubbling union, recording, and the cache following its schedule."""

import itertools
import json

import numpy as np
import pytest
import torch

from rtdiff.runtime.accel.hooks import block_hooks

from rtdiff.policies.checkpoint import save_policy
from rtdiff.runtime.accel import make_accelerator
from rtdiff.runtime.accel.bac import (
    bubbling_union,
    calibrate_to_fraction,
    optimal_update_steps,
    optimal_update_steps_per_budget,
    record_block_outputs,
    similarity_matrix,
    step_sensitivity,
)


def reuse_score(similarity, updates):
    bounds = [*updates, len(similarity)]
    return sum(similarity[i, k] for i, j in zip(bounds, bounds[1:]) for k in range(i + 1, j))


@pytest.mark.parametrize("seed", range(5))
def test_scheduler_is_exact(seed):
    rng = np.random.default_rng(seed)
    steps = 8
    similarity = rng.uniform(-1, 1, (steps, steps))
    for budget in range(1, steps + 1):
        chosen = optimal_update_steps(similarity, budget)
        assert chosen[0] == 0 and len(chosen) == budget == len(set(chosen))
        best = max(reuse_score(similarity, [0, *rest]) for rest in itertools.combinations(range(1, steps), budget - 1))
        assert reuse_score(similarity, chosen) == pytest.approx(best)


@pytest.mark.parametrize("seed", range(3))
def test_scheduler_is_exact_when_only_some_steps_may_refresh(seed):
    rng = np.random.default_rng(seed)
    steps, allowed = 9, {0, 2, 3, 6, 8}
    similarity = rng.uniform(-1, 1, (steps, steps))
    per_budget = optimal_update_steps_per_budget(similarity, steps, allowed)
    assert len(per_budget) == len(allowed)  # no budget beyond the steps that may refresh
    for budget, chosen in enumerate(per_budget, start=1):
        assert set(chosen) <= allowed and chosen[0] == 0 and len(chosen) == budget
        best = max(reuse_score(similarity, [0, *rest])
                   for rest in itertools.combinations(sorted(allowed - {0}), budget - 1))
        assert reuse_score(similarity, chosen) == pytest.approx(best)


def weighted_cost(similarity, weights, updates):
    bounds = [*updates, len(similarity)]
    return sum(weights[k] * (1 - similarity[i, k]) for i, j in zip(bounds, bounds[1:]) for k in range(i + 1, j))


@pytest.mark.parametrize("seed", range(3))
def test_weighted_scheduler_is_exact(seed):
    rng = np.random.default_rng(seed)
    steps = 8
    similarity, weights = rng.uniform(-1, 1, (steps, steps)), rng.exponential(size=steps)
    for budget in range(1, steps + 1):
        chosen = optimal_update_steps(similarity, budget, weights=weights)
        best = min(weighted_cost(similarity, weights, [0, *rest])
                   for rest in itertools.combinations(range(1, steps), budget - 1))
        assert weighted_cost(similarity, weights, chosen) == pytest.approx(best)


def test_sensitive_steps_draw_the_updates():
    # Features drift at the same rate throughout; only the last step's error reaches the output.
    steps = 10
    similarity = np.fromfunction(lambda i, k: 0.9 ** np.abs(k - i), (steps, steps))
    assert optimal_update_steps(similarity, 2) == [0, 5]
    weights = np.full(steps, 1e-3)
    weights[-1] = 1.0
    assert optimal_update_steps(similarity, 2, weights=weights) == [0, steps - 1]


def test_step_sensitivity_reuses_one_step_at_a_time():
    runs = []

    def error(blocks):
        runs.append(blocks)
        missing = set(range(5)) - set(blocks["a"])
        return 10.0 ** next(iter(missing))

    assert step_sensitivity(["a", "b"], 5, error) == [0.0, 10.0, 100.0, 1000.0, 10000.0]
    assert [sorted(set(range(5)) - set(run["b"])) for run in runs] == [[1], [2], [3], [4]]
    assert all(run["a"] == run["b"] for run in runs)


def test_scheduler_refreshes_where_features_change():
    # Features constant over steps 0-4 and 5-9, changing at 5: two updates go to 0 and 5.
    features = torch.cat([torch.ones(5, 1, 4), torch.tensor([1.0, -1, 1, -1]).expand(5, 1, 4)])
    assert optimal_update_steps(similarity_matrix(features), 2) == [0, 5]


def test_bubbling_union_adds_downstream_feed_forward_updates():
    schedule = {"a.attn": [0, 4], "a.ff": [0, 2], "b.attn": [0, 6], "b.ff": [0, 3]}
    errors = {"a.attn": 0.9, "a.ff": 0.1, "b.attn": 0.5, "b.ff": 0.2}
    merged, bubbled = bubbling_union(schedule, errors, feed_forward={"a.ff", "b.ff"}, count=2)
    assert bubbled == ["a.attn", "b.attn"]
    assert merged["a.attn"] == [0, 2, 3, 4] and merged["b.attn"] == [0, 3, 6]
    assert merged["a.ff"] == [0, 2] and merged["b.ff"] == [0, 3]


def test_one_programme_answers_every_budget():
    similarity = np.random.default_rng(7).uniform(-1, 1, (12, 12))
    per_budget = optimal_update_steps_per_budget(similarity, 12)
    assert per_budget == [optimal_update_steps(similarity, budget) for budget in range(1, 13)]


def test_fraction_cap_is_kept_and_the_least_error_candidate_wins():
    rng = np.random.default_rng(3)
    outputs = {name: torch.from_numpy(rng.normal(size=(20, 2, 6)).cumsum(0)).float()
               for name in ("a.attn", "a.ff", "b.attn", "b.ff")}
    feed_forward = {"a.ff", "b.ff"}
    seen = []

    def error(blocks):  # a stand-in for the action error: here, fewer updates on b.ff is better
        seen.append(blocks)
        return len(blocks["b.ff"]) + 0.01 * sum(map(len, blocks.values()))

    schedule = calibrate_to_fraction(outputs, 0.3, feed_forward, error)
    assert schedule["block_evals_fraction"] <= 0.3
    assert all(c["block_evals_fraction"] <= 0.3 for c in schedule["candidates"])
    assert len(seen) == len(schedule["candidates"]) > 1  # every distinct candidate was scored, once
    assert schedule["output_error"] == min(c["output_error"] for c in schedule["candidates"]) == error(schedule["blocks"])
    assert sum(c["joint"] and not c["evenly_spaced"] for c in schedule["candidates"]) == 1

    # uniform caching's schedule is always a candidate: evenly over the steps that may refresh
    assert {"a.attn": [0, 3, 6, 10, 13, 16], "a.ff": [0, 3, 6, 10, 13, 16], "b.attn": [0, 3, 6, 10, 13, 16],
            "b.ff": [0, 3, 6, 10, 13, 16]} in seen
    seen.clear()
    calibrate_to_fraction(outputs, 0.3, feed_forward, error, allowed=set(range(20)) - {3, 4, 5})
    assert {name: [0, 2, 8, 11, 14, 17] for name in outputs} in seen

    def misaligned(blocks):  # an error that only schedules refreshing every block together avoid
        return len({tuple(steps) for steps in blocks.values()})

    joint = calibrate_to_fraction(outputs, 0.3, feed_forward, misaligned)
    steps = list(joint["blocks"].values())
    assert joint["joint"] and all(s == steps[0] for s in steps) and joint["block_evals_fraction"] <= 0.3
    with pytest.raises(ValueError, match="at most 0.010 of the blocks"):
        calibrate_to_fraction(outputs, 0.01, feed_forward, error)


def test_a_final_error_rescores_the_best_candidates_and_chooses():
    rng = np.random.default_rng(5)
    outputs = {name: torch.from_numpy(rng.normal(size=(20, 2, 6)).cumsum(0)).float()
               for name in ("a.attn", "a.ff", "b.attn", "b.ff")}

    def screen(blocks):  # the cheap error prefers the schedules that evaluate most
        return -sum(map(len, blocks.values()))

    screened = calibrate_to_fraction(outputs, 0.3, {"a.ff", "b.ff"}, screen)
    rescored = []

    def final(blocks):  # the costly one disagrees with the screen's choice
        rescored.append(blocks)
        return 1.0 if blocks == screened["blocks"] else 0.5

    chosen = calibrate_to_fraction(outputs, 0.3, {"a.ff", "b.ff"}, screen, final_error=final, finalists=3)
    assert len(rescored) == 3 and screened["blocks"] in rescored  # only the screen's best three, its choice among them
    assert chosen["blocks"] != screened["blocks"] and chosen["blocks"] in rescored and chosen["final_error"] == 0.5
    assert chosen["output_error"] == screen(chosen["blocks"])
    finalists = sorted(c["output_error"] for c in chosen["candidates"] if "final_error" in c)
    assert finalists == sorted(c["output_error"] for c in chosen["candidates"])[:3]


def test_sensitivity_adds_weighted_candidates_and_the_least_error_one_wins():
    rng = np.random.default_rng(4)
    outputs = {name: torch.from_numpy(rng.normal(size=(20, 2, 6)).cumsum(0)).float() for name in ("a", "b")}
    sensitivity = [0.0] * 19 + [1.0]  # only the last step matters

    def last_step_error(blocks):  # the action error such a model would show: reuse at the last step costs
        return sum(19 not in steps for steps in blocks.values()) + 0.001 * sum(map(len, blocks.values()))

    plain = calibrate_to_fraction(outputs, 0.2, set(), last_step_error)
    weighted = calibrate_to_fraction(outputs, 0.2, set(), last_step_error, sensitivity=sensitivity)
    assert {c["objective"] for c in plain["candidates"]} == {"similarity"}
    assert {c["objective"] for c in weighted["candidates"]} == {"similarity", "sensitivity-weighted"}
    assert weighted["objective"] == "sensitivity-weighted" and weighted["output_error"] < plain["output_error"]
    assert all(19 in steps for steps in weighted["blocks"].values())
    assert weighted["step_sensitivity"] == sensitivity and weighted["block_evals_fraction"] <= 0.2
    with pytest.raises(ValueError, match="19 entries for 20 steps"):
        calibrate_to_fraction(outputs, 0.2, set(), last_step_error, sensitivity=sensitivity[1:])


@pytest.fixture
def tiny_policy(make_tiny):
    return make_tiny("transformer")


def test_recording_captures_every_block_at_every_step(tiny_policy):
    obs = torch.randn(3, 2, 5)
    solver = tiny_policy.make_solver("ddim", 7)
    outputs = record_block_outputs(lambda recorder: tiny_policy.predict_chunk(obs, solver, None, recorder))
    assert list(outputs) == [name for name, _, _ in tiny_policy.denoiser.cache_blocks()]
    assert all(value.shape[:2] == (7, 3) for value in outputs.values())
    assert block_hooks(tiny_policy.denoiser).cache is None  # the hooks stay, with no cache active


def test_bac_cache_follows_its_schedule(tiny_policy):
    names = [name for name, _, _ in tiny_policy.denoiser.cache_blocks()]
    obs = torch.randn(2, 2, 5)
    solver = tiny_policy.make_solver("ddim", 6)
    reference = tiny_policy.predict_chunk(obs, solver, torch.Generator().manual_seed(0))

    everything = make_accelerator("bac", schedule={"steps": 6, "blocks": {n: list(range(6)) for n in names}},
                                  solver="ddim", steps=6)
    exact = tiny_policy.predict_chunk(obs, solver, torch.Generator().manual_seed(0), everything)
    torch.testing.assert_close(exact, reference, rtol=0, atol=0)
    everything.unbind()

    sparse = {n: [0, 3] if k % 2 else [0, 1, 2, 3, 4, 5] for k, n in enumerate(names)}
    bac = make_accelerator("bac", schedule={"steps": 6, "blocks": sparse}, solver="ddim", steps=6)
    cached = tiny_policy.predict_chunk(obs, solver, torch.Generator().manual_seed(0), bac)
    assert bac.stats()["block_evals_fraction"] == pytest.approx(sum(map(len, sparse.values())) / (6 * len(names)))
    assert not torch.equal(cached, reference)


def test_mismatched_schedules_are_refused(tiny_policy):
    with pytest.raises(ValueError, match="for ddim 10 steps, not ddim 6"):
        make_accelerator("bac", schedule={"steps": 10, "solver": "ddim", "blocks": {}}, solver="ddim", steps=6)
    with pytest.raises(ValueError, match="different weights"):
        make_accelerator("bac", schedule={"steps": 6, "checkpoint_sha256": "aa", "blocks": {}}, solver="ddim",
                         steps=6, checkpoint_hash="bb")
    bac = make_accelerator("bac", schedule={"steps": 6, "blocks": {"layers.0.nope": [0]}}, solver="ddim", steps=6)
    with pytest.raises(ValueError, match="does not have"):
        bac.bind(tiny_policy.denoiser)
    assert bac.cache is None and block_hooks(tiny_policy.denoiser).cache is None  # nothing of it is left active


def test_calibrate_command_writes_schedule_and_heatmap_used_by_eval(tiny_policy, tmp_path):
    from rtdiff.policies.accelerate import calibrate_bac, policy_accelerator
    from rtdiff.sims.tasks import TASKS
    DEMOS_PATH = TASKS["pusht"].demos

    folder = save_policy(tiny_policy, tmp_path / "tiny")
    schedule, path = calibrate_bac(str(folder), "ddim", 8, budget=3, demos_path=DEMOS_PATH, observations=8, bubble=2)
    assert path == folder / "bac-ddim-8.json" and path.with_suffix(".png").stat().st_size > 1000
    stored = json.loads(path.read_text())
    assert stored["format"] == "rtdiff-bac-schedule/1" and len(stored["checkpoint_sha256"]) == 64
    assert all(len(steps) >= 3 and steps[0] == 0 for steps in stored["blocks"].values())
    assert len(stored["bubbled"]) == 2
    accelerator = policy_accelerator("bac", str(folder), "ddim", 8)
    assert accelerator.updates == {name: set(steps) for name, steps in stored["blocks"].items()}
    with pytest.raises(FileNotFoundError, match="calibrate bac"):
        policy_accelerator("bac", str(folder), "ddim", 9)


def test_a_bac_sada_schedule_keeps_refreshes_off_the_steps_sada_may_skip(tiny_policy, tmp_path):
    from rtdiff.policies.accelerate import calibrate_bac, policy_accelerator
    from rtdiff.runtime.accel.composed import skip_lattice
    from rtdiff.sims.tasks import TASKS
    DEMOS_PATH = TASKS["pusht"].demos

    folder = save_policy(tiny_policy, tmp_path / "tiny")
    sada = {"window": (0.1, 0.97), "max_consecutive": 2}
    schedule, path = calibrate_bac(str(folder), "ddim", 10, budget=None, fraction=0.5, demos_path=DEMOS_PATH,
                                   observations=8, sada=sada)
    assert path == folder / "bac+sada-ddim-10.json"
    lattice = skip_lattice(10, **sada)
    assert schedule["skippable"] == sorted(lattice) and schedule["block_evals_fraction"] <= 0.5
    assert not any(lattice & set(steps) for steps in schedule["blocks"].values())
    sensitivity = schedule["step_sensitivity"]  # measured on the tiny model: one run per step, step 0 always computes
    assert len(sensitivity) == 10 and sensitivity[0] == 0 and all(s > 0 for s in sensitivity[1:])
    accelerator = policy_accelerator("bac+sada", str(folder), "ddim", 10)
    assert accelerator.skipper.skippable == lattice and accelerator.skipper.max_consecutive == 2
    with pytest.raises(FileNotFoundError, match="calibrate bac\\+sada"):
        policy_accelerator("bac+sada", str(folder), "ddim", 8)
