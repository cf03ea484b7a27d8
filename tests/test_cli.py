"""The command line: a short closed-loop evaluation, and one clear error line for each kind of bad input."""

import json
import subprocess
import sys

import pytest

from rtdiff.runtime.checkpoints import bundled


def rtdiff(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "rtdiff.runtime.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def assert_one_error_line(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rtdiff: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_bundled_checkpoints_exist():
    assert {"pusht-unet", "pusht-transformer"} <= set(bundled())


@pytest.mark.parametrize("checkpoint", ["pusht-unet", "pusht-transformer"])
def test_eval_runs_closed_loop_and_writes_json(tmp_path, checkpoint):
    out = tmp_path / "eval.json"
    result = rtdiff("eval", "pusht", "--checkpoint", checkpoint, "--episodes", "2", "--steps", "4", "--json", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["episodes"] == 2 and len(report["scores"]) == 2 and report["seeds"] == [100_000, 100_001]
    assert report["solver"] == "ddim" and report["steps"] == 4 and report["checkpoint"] == checkpoint
    assert report["accel"] == "none" and report["model_calls"] == 4 and report["block_evals_fraction"] == 1.0
    assert all(0.0 <= s <= 1.0 for s in report["scores"])
    assert report["score_mean"] == pytest.approx(sum(report["scores"]) / 2)
    assert 0 < report["latency_ms"]["p50"] <= report["latency_ms"]["p99"]
    assert checkpoint in result.stdout and "score" in result.stdout


def test_missing_checkpoint(tmp_path):
    assert_one_error_line(rtdiff("eval", "pusht", "--checkpoint", str(tmp_path / "nope"), "--episodes", "1"), "nope")


def test_malformed_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text("{]")
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert_one_error_line(rtdiff("eval", "pusht", "--checkpoint", str(tmp_path), "--episodes", "1"), "not valid JSON")


def test_unknown_solver():
    assert_one_error_line(rtdiff("eval", "pusht", "--solver", "euler", "--episodes", "1"), "unknown solver 'euler'")


def test_accelerator_options_reach_the_evaluated_accelerator(tmp_path):
    out = tmp_path / "eval.json"
    result = rtdiff("eval", "pusht", "--episodes", "1", "--steps", "10", "--accel", "uniform",
                    "--accel-option", "interval=3", "--json", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["accel_options"] == {"interval": 3}
    assert report["block_evals_fraction"] == pytest.approx(0.4)  # steps 0, 3, 6, 9 of 10 (interval 2 gives 0.5)


def test_unknown_accelerator_option():
    assert_one_error_line(rtdiff("eval", "pusht", "--episodes", "1", "--accel", "sada", "--accel-option", "speed=2"),
                          "accelerator 'sada' has no option 'speed'")
