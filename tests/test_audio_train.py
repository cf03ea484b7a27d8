"""Each music-tiny trainer, a few steps on a few clips: it writes a component the MusicLDM loader reads whole, with
the command that made it in the weights' metadata."""

import json

from safetensors import safe_open

from rtdiff.audio.components import load_musicldm
from rtdiff.audio.pipeline import TextToMusic
from rtdiff.runtime.cli import main


def test_every_component_trains_into_a_loadable_folder(tmp_path, monkeypatch):
    folder = tmp_path / "music"
    for component in ("clap", "vae", "vocoder", "unet"):
        argv = ["audio", "train", component, "--out", str(folder), "--steps", "2", "--clips", "24",
                "--batch-size", "4", "--threads", "1"]
        monkeypatch.setattr("sys.argv", ["rtdiff", *argv])
        main(argv)
    model = load_musicldm(folder)
    for component in ("text_encoder", "vae", "vocoder", "unet"):
        (weights,) = (folder / component).glob("*.safetensors")
        with safe_open(str(weights), "pt") as f:
            metadata = f.metadata()
        assert metadata["rtdiff_command"].startswith(f"rtdiff audio train {'clap' if component == 'text_encoder' else component}")
        assert json.loads(metadata["rtdiff_report"])["steps"] == 2
    music = TextToMusic(model).generate(["a fast high piano melody in major with drums"], 0.32, steps=2)
    assert music.wave.shape == (1, 5120) and music.mel.shape == (1, 1, 32, 64)
