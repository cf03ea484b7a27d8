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


def test_the_vocoder_trains_against_discriminators_from_its_weights(tmp_path, monkeypatch):
    folder = tmp_path / "music"
    for extra in ([], ["--init", "--adversarial"]):
        argv = ["audio", "train", "vocoder", "--out", str(folder), "--steps", "2", "--clips", "8", "--batch-size", "2",
                "--threads", "1", *extra]
        monkeypatch.setattr("sys.argv", ["rtdiff", *argv])
        main(argv)
    with safe_open(str(folder / "vocoder" / "model.safetensors"), "pt") as f:
        metadata = f.metadata()
    report = json.loads(metadata["rtdiff_report"])
    assert report["adversarial"] and report["discriminator_loss_last_100"] > 0
    assert json.loads(metadata["rtdiff_init_commands"])[-1].endswith("--threads 1")  # the spectral run before it


def test_discriminators_learn_to_tell_a_clean_tone_from_a_noisy_one():
    import torch

    from rtdiff.audio.discriminators import WaveDiscriminators, discriminator_loss

    torch.manual_seed(0)
    t = torch.arange(5121) / 16_000  # odd length: the period discriminators pad to a whole number of periods
    clean = torch.stack([torch.sin(2 * torch.pi * f * t) for f in (165.0, 220.0, 330.0, 440.0)]) * 0.4
    noisy = clean + 0.1 * torch.randn(clean.shape)
    critics = WaveDiscriminators()
    outputs = critics(clean)
    assert len(outputs) == 8 and all(logits.shape[0] == 4 and len(features) == 5 for logits, features in outputs)
    optimizer = torch.optim.Adam(critics.parameters(), lr=2e-3)
    for _ in range(100):
        loss = discriminator_loss(critics(clean), critics(noisy))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # 4.0 is where eight discriminators answer 0.5 to everything, telling nothing apart
    assert discriminator_loss(critics(clean), critics(noisy)).item() < 1.0
