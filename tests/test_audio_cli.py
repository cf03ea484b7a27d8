"""`rtdiff audio generate` on tiny random MusicLDM components: what it writes, and what it refuses."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile
import torch

from rtdiff.audio.components import load_musicldm
from rtdiff.audio.pipeline import TextToMusic
from rtdiff.runtime.cli import main
from tests.musicldm_tiny import build_tiny_musicldm

SECONDS = 0.05


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_musicldm(tmp_path_factory.mktemp("musicldm") / "tiny")


def generate(folder, out, *extra):
    main(["audio", "generate", "--model", str(folder), "--prompt", "a fast high melody with drums",
          "--seconds", str(SECONDS), "--steps", "4", "--quiet", "--out", str(out), *extra])


def test_generate_writes_the_wav_npz_json_and_plot(folder, tmp_path):
    generate(folder, tmp_path / "song.wav", "--save-npz", str(tmp_path / "song.npz"), "--json",
             str(tmp_path / "song.json"), "--plot", str(tmp_path / "song.png"))
    wave, rate = soundfile.read(tmp_path / "song.wav", dtype="float32")
    assert rate == 16000 and wave.shape == (int(SECONDS * 16000),)
    arrays = np.load(tmp_path / "song.npz")
    assert sorted(arrays.files) == ["latent", "mel", "wave"]
    np.testing.assert_array_equal(arrays["wave"], wave)  # the wav holds float32 samples exactly as produced
    assert arrays["latent"].shape == (4, 100, 4) and arrays["mel"].shape == (1, 200, 8)
    report = json.loads((tmp_path / "song.json").read_text())
    assert set(report["stage_ms"]) == {"text", "denoise", "vae", "vocoder"}
    assert report["model_calls"] == 4 and report["block_evals_fraction"] == 1.0
    assert (tmp_path / "song.png").stat().st_size > 1000


def test_latents_are_the_initial_noise(folder, tmp_path):
    noise = TextToMusic(load_musicldm(folder)).initial_latents(1, SECONDS, torch.Generator().manual_seed(11))
    np.save(tmp_path / "noise.npy", noise[0].numpy())
    generate(folder, tmp_path / "a.wav", "--latents", str(tmp_path / "noise.npy"), "--save-npz", str(tmp_path / "a.npz"))
    generate(folder, tmp_path / "b.wav", "--seed", "11", "--save-npz", str(tmp_path / "b.npz"))
    np.testing.assert_array_equal(np.load(tmp_path / "a.npz")["latent"], np.load(tmp_path / "b.npz")["latent"])
    generate(folder, tmp_path / "c.wav", "--seed", "12", "--save-npz", str(tmp_path / "c.npz"))
    assert not np.array_equal(np.load(tmp_path / "a.npz")["latent"], np.load(tmp_path / "c.npz")["latent"])


def test_bad_inputs_are_named(folder, tmp_path, capsys, tiny_checkpoint):
    np.save(tmp_path / "wrong.npy", np.zeros((4, 7, 4), np.float32))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    cases = [(["--latents", str(tmp_path / "wrong.npy")], "initial latents have shape"),
             (["--latents", str(tmp_path / "objects.npy")], "not a readable .npy"),
             (["--solver", "ddpm"], "unknown solver 'ddpm'"),
             (["--seconds", "0"], "seconds must be positive"),
             (["--backend", "onnxruntime"], "not built for audio yet")]
    for extra, message in cases:
        with pytest.raises(SystemExit):
            generate(folder, tmp_path / "x.wav", *extra)
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generate(tiny_checkpoint, tmp_path / "x.wav")
    assert "not a music model" in capsys.readouterr().err


def test_calibrate_writes_a_schedule_that_generate_uses(folder, tmp_path, capsys):
    main(["audio", "calibrate", "bac", "--model", str(folder), "--steps", "6", "--fraction", "0.5",
          "--seconds", str(SECONDS), "--final-prompts", "2", "--final-seconds", str(SECONDS),
          "--out", str(folder / "bac-dpmpp-6.json")])
    schedule = json.loads((folder / "bac-dpmpp-6.json").read_text())
    assert schedule["block_evals_fraction"] <= 0.5 and schedule["checkpoint_sha256"]
    assert len(schedule["calibration"]["final_prompts"]) == 2  # the finalists ran as served, on other captions
    assert not set(schedule["calibration"]["final_prompts"]) & set(schedule["calibration"]["prompts"])
    assert schedule["final_error"] == min(c["final_error"] for c in schedule["candidates"] if "final_error" in c)
    generate(folder, tmp_path / "bac.wav", "--steps", "6", "--accel", "bac", "--json", str(tmp_path / "bac.json"))
    report = json.loads((tmp_path / "bac.json").read_text())
    assert report["block_evals_fraction"] <= 0.5 and report["accel"] == "bac"
    with pytest.raises(SystemExit):  # no schedule for 7 steps: the error names the command that makes one
        generate(folder, tmp_path / "x.wav", "--steps", "7", "--accel", "bac")
    assert "rtdiff audio calibrate bac" in capsys.readouterr().err


def test_calibrate_bac_sada_keeps_the_sada_options_it_scored_with(folder, tmp_path, capsys):
    out = tmp_path / "bac+sada.json"
    main(["audio", "calibrate", "bac+sada", "--model", str(folder), "--steps", "12", "--fraction", "0.5",
          "--seconds", str(SECONDS), "--final-prompts", "1", "--final-seconds", str(SECONDS),
          "--accel-option", "estimate=lagrange", "--accel-option", "max_consecutive=1", "--reuse", "linear",
          "--out", str(out)])
    schedule = json.loads(out.read_text())
    assert schedule["sada"] == {"estimate": "lagrange", "max_consecutive": 1} and schedule["reuse"] == "linear"
    refreshing = set().union(*map(set, schedule["blocks"].values()))
    assert schedule["skippable"] and not refreshing & set(schedule["skippable"])
    with pytest.raises(SystemExit):
        main(["audio", "calibrate", "bac+sada", "--model", str(folder), "--steps", "12", "--fraction", "0.5",
              "--accel-option", "estimate=cubic", "--out", str(out)])
    assert "estimate must be 'eps' or 'lagrange', got 'cubic'" in capsys.readouterr().err
