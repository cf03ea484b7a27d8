"""Out of the box: shipped schedules, the accelerator's own schedule on an exported backend, task demonstrations."""

import json

import pytest

from rtdiff.policies.accelerate import accelerator_spec, calibrate_bac, default_schedule_path, task_demos
from rtdiff.policies.backend import with_backend
from rtdiff.policies.checkpoint import load_policy, save_policy
from rtdiff.runtime.accel import SCHEDULED
from rtdiff.runtime.checkpoints import bundled, cache_root, find_schedule, schedule_path


@pytest.mark.parametrize("name", ["pusht-unet", "pusht-transformer", "lift-unet"])
@pytest.mark.parametrize("accel", SCHEDULED)
def test_every_bundled_checkpoint_ships_its_schedules_at_its_own_solver(name, accel):
    solver, steps = load_policy(name).solver_settings()
    path = find_schedule(name, solver, steps, accel)
    assert path is not None and path.parent == bundled()[name]
    accelerator_spec(accel, name, solver, steps)()  # loads, matches the weights' hash, the solver and the steps


@pytest.mark.parametrize("accel", SCHEDULED)
def test_music_tiny_ships_its_schedules_at_the_generate_defaults(accel):
    from rtdiff.audio.accelerate import music_accelerator_spec
    from rtdiff.runtime.cli import build_parser

    args = build_parser().parse_args(["audio", "generate", "--prompt", "x", "--out", "x.wav"])
    path = find_schedule("music-tiny", args.solver, args.steps, accel)
    assert path is not None and path.parent == bundled()["music-tiny"]
    music_accelerator_spec(accel, "music-tiny", args.solver, args.steps)()  # the weights' hash, solver, steps


def test_an_exported_backend_uses_the_schedule_of_the_accelerator_asked_for(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("RTDIFF_CACHE", str(tmp_path / "cache"))
    folder = save_policy(load_policy(tiny_checkpoint), tmp_path / "only-bac+sada")
    calibrate_bac(str(folder), "ddim", 10, 3, None, observations=4, sada={"window": (0.1, 0.97), "max_consecutive": 2})
    assert not schedule_path(folder, "ddim", 10, "bac").exists()  # only the bac+sada one exists
    policy = with_backend(load_policy(folder), str(folder), "onnxruntime", "ddim", 10, "bac+sada")
    schedule = json.loads(schedule_path(folder, "ddim", 10, "bac+sada").read_text())
    assert policy.denoiser.manifest["schedule"]["steps"] == schedule["steps"] == 10
    with pytest.raises(FileNotFoundError, match="no bac schedule"):
        with_backend(load_policy(folder), str(folder), "onnxruntime", "ddim", 10, "bac")


def test_calibration_defaults_to_the_checkpoint_s_task_and_never_writes_the_source_tree(tmp_path, monkeypatch):
    monkeypatch.setenv("RTDIFF_CACHE", str(tmp_path / "cache"))
    assert task_demos(load_policy("lift-unet")).name == "lift_demos.safetensors"
    path = default_schedule_path("lift-unet", "ddim", 10)
    assert path.is_relative_to(cache_root()) and not path.is_relative_to(bundled()["lift-unet"])
    # and what a user calibrates there wins over what ships
    path.parent.mkdir(parents=True)
    path.write_text("{}")
    assert find_schedule("lift-unet", "ddim", 10) == path
