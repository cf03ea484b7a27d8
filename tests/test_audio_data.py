"""The synthetic music: captions say what made each clip, held-out combinations stay out, and the sound follows
the words (the features benchmarks/audio_quality.py measures)."""

import numpy as np

from rtdiff.audio import data
from rtdiff.audio.features import HOP, MEL_BINS, log_mel


def test_captions_name_every_parameter_and_training_data_leaves_the_held_out_out():
    items = list(data.dataset(40, 0.5, seed=3))
    for clip, caption, wave in items:
        assert not clip.held_out
        assert data.HELD_OUT_TEMPLATE.split(",")[0].format(mode=clip.mode, timbre=clip.timbre) not in caption
        for word in (clip.tempo, clip.register, clip.mode, clip.timbre, "with drums" if clip.drums else "without drums"):
            assert word in caption
        assert wave.dtype == np.float32 and wave.shape == (8000,) and 0.2 < np.abs(wave).max() <= 0.5
    assert all(c.held_out for c, _, _ in data.dataset(10, 0.1, seed=3, held_out=True))
    again = list(data.dataset(3, 0.5, seed=3))
    assert all(np.array_equal(a[2], b[2]) and a[1] == b[1] for a, b in zip(items, again))


def test_register_and_drums_are_audible():
    import librosa

    rng = np.random.default_rng(0)
    base = data.draw_clip(rng, seed=5, timbre="piano", tempo="slow", register="low", mode="major", drums=False)
    import dataclasses

    high = dataclasses.replace(base, register="high")
    drums = dataclasses.replace(base, drums=True)
    centroid = {c: float(np.median(librosa.feature.spectral_centroid(y=data.render(c, 2.0), sr=16000)))
                for c in (base, high)}
    assert centroid[high] > 1.5 * centroid[base]
    _, percussive = librosa.effects.hpss(data.render(drums, 2.0))
    _, quiet = librosa.effects.hpss(data.render(base, 2.0))
    assert np.sum(percussive**2) > 2 * np.sum(quiet**2)


def test_log_mel_has_one_frame_per_hop():
    import torch

    mel = log_mel(torch.zeros(2, 100 * HOP))
    assert mel.shape == (2, 100, MEL_BINS)
    torch.testing.assert_close(mel, torch.full_like(mel, float(np.log(1e-5))))
