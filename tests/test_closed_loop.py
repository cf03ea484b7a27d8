"""The done-criteria of the bundled policies, run in full: 50 seeded episodes each (slow; `make test-slow`)."""

import pytest

from rtdiff.policies.evaluate import evaluate
from rtdiff.runtime.run import RunConfig
from rtdiff.policies.cli import EVAL_SEED

EPISODES = 50


@pytest.fixture(scope="module")
def expert_score():
    from rtdiff.sims.pusht import run_expert
    from rtdiff.sims.tasks import summarize

    return summarize(run_expert(range(EVAL_SEED, EVAL_SEED + EPISODES), workers=2))["score_mean"]


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint", ["pusht-unet", "pusht-transformer"])
def test_bundled_policy_reaches_90_percent_of_the_expert(checkpoint, expert_score):
    report = evaluate(RunConfig(checkpoint, "ddim", 10), EPISODES, EVAL_SEED, workers=2)
    assert report["score_mean"] >= 0.9 * expert_score, (report["score_mean"], expert_score)


@pytest.mark.slow
def test_bundled_lift_policy_reaches_90_percent_of_the_expert():
    from rtdiff.sims.robosuite_lift import run_expert
    from rtdiff.sims.tasks import summarize

    expert = summarize(run_expert(range(EVAL_SEED, EVAL_SEED + EPISODES), workers=2))["success_rate"]
    report = evaluate(RunConfig("lift-unet", "ddim", 10), EPISODES, EVAL_SEED, workers=2, task="lift")
    assert report["success_rate"] >= 0.9 * expert, (report["success_rate"], expert)


@pytest.mark.slow
def test_onnxruntime_backend_scores_as_torch_does(tmp_path, monkeypatch):
    monkeypatch.setenv("RTDIFF_CACHE", str(tmp_path))  # a fresh export, made by the evaluation itself
    torch_report = evaluate(RunConfig("pusht-unet", "ddim", 10), EPISODES, EVAL_SEED, workers=2)
    ort_report = evaluate(RunConfig("pusht-unet", "ddim", 10, backend="onnxruntime"), EPISODES, EVAL_SEED, workers=2)
    assert abs(ort_report["score_mean"] - torch_report["score_mean"]) <= 0.02, (ort_report["score_mean"],
                                                                                 torch_report["score_mean"])
