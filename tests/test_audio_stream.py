"""Streaming music (audio/stream.py, audio/service.py) on tiny random MusicLDM components."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rtdiff.audio.components import load_musicldm
from rtdiff.audio.pipeline import TextToMusic
from rtdiff.audio.stream import MusicStream, noise_timeline
from tests.musicldm_tiny import build_tiny_musicldm

PROMPT = "a fast high melody with drums"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_musicldm(tmp_path_factory.mktemp("musicldm") / "tiny")


@pytest.fixture(scope="module")
def pipeline(folder):
    return TextToMusic(load_musicldm(folder))


def frames_s(pipeline, frames: int) -> float:
    model = pipeline.model
    return frames * model.vae_scale_factor * model.hop_length / model.sample_rate


def stream(pipeline, frames=40, window=16, overlap=4, context=2, **options):
    s = lambda n: frames_s(pipeline, n)  # noqa: E731
    return MusicStream(pipeline, options.pop("prompt", PROMPT), s(frames) if frames else None, s(window), s(overlap),
                       steps=options.pop("steps", 4), context_s=s(context), fade_s=s(1), **options)


def chunks(music, limit=None):
    found = []
    for chunk in music:
        if chunk is not None:
            found.append(chunk)
            if limit is not None and len(found) == limit:
                break
    return found


def test_one_window_is_the_offline_generation(pipeline):
    """A stream shorter than its window is one trajectory, decoded whole: exactly `generate` on that noise."""
    music = stream(pipeline, frames=16, window=16, overlap=4)
    (only,) = chunks(music)
    noise = noise_timeline(pipeline, 0).frames(0, 16)
    offline = pipeline.generate([PROMPT], frames_s(pipeline, 16), steps=4, solver="dpmpp", latents=noise)
    assert torch.equal(only.mel, offline.mel[0, 0]) and torch.equal(only.wave, offline.wave[0])
    assert only.final and only.offset_s == 0


@pytest.mark.parametrize("tie", ["inpaint", "fusion"])
def test_chunks_join_into_the_length_asked(pipeline, tie):
    music = stream(pipeline, frames=40, tie=tie)
    found = chunks(music)
    model = pipeline.model
    samples_per_frame = model.vae_scale_factor * model.hop_length
    assert sum(c.wave.shape[0] for c in found) == int(frames_s(pipeline, 40) * model.sample_rate)
    assert [c.final for c in found] == [False] * (len(found) - 1) + [True]
    offset = 0.0
    for chunk in found:
        assert chunk.offset_s == pytest.approx(offset)
        assert chunk.wave.shape[0] == chunk.mel.shape[0] * model.hop_length
        assert chunk.mel.shape[1] == model.mel_bins
        assert torch.isfinite(chunk.wave).all()
        offset += chunk.wave.shape[0] / model.sample_rate
    assert found[0].wave.shape[0] == (16 - 2 if tie == "inpaint" else 12) * samples_per_frame


def test_an_endless_stream_goes_on_and_is_causal(pipeline):
    endless = chunks(stream(pipeline, frames=None), limit=5)
    finite = chunks(stream(pipeline, frames=200))
    for a, b in zip(endless, finite):
        assert torch.equal(a.wave, b.wave)
    assert len(endless) == 5 and not endless[-1].final


def test_the_prompt_may_change_between_windows(pipeline):
    switch = frames_s(pipeline, 24)  # window 2's new frames start at latent frame 28 (stride 12, overlap 4)
    one = chunks(stream(pipeline, frames=52))
    two = chunks(stream(pipeline, frames=52, prompt=[(0.0, PROMPT), (switch, "a slow low organ in minor")]))
    assert torch.equal(one[0].wave, two[0].wave) and torch.equal(one[1].wave, two[1].wave)
    assert not torch.equal(one[-1].wave, two[-1].wave)


def test_bad_stream_settings_are_named(pipeline):
    with pytest.raises(ValueError, match="overlap"):
        stream(pipeline, window=8, overlap=8)
    with pytest.raises(ValueError, match="context_s"):
        stream(pipeline, overlap=2, context=3, tie="fusion")
    with pytest.raises(ValueError, match="prompts"):
        stream(pipeline, prompt=[(1.0, PROMPT)])
    with pytest.raises(ValueError, match="unknown solver"):
        stream(pipeline, solver="euler")


def test_the_service_streams_chunks_over_the_server(folder, pipeline):
    from rtdiff.audio.service import MusicService
    from rtdiff.runtime.run import RunConfig
    from rtdiff_client import Client, ServerError
    from tests.conftest import ServerThread

    service = MusicService(folder, RunConfig(str(folder), steps=4))
    seconds = frames_s(pipeline, 40)
    params = dict(prompt=PROMPT, seconds=seconds, window_s=frames_s(pipeline, 16), overlap_s=frames_s(pipeline, 4))
    with ServerThread({"music": service}) as server, Client(server.address, model="music", timeout_ms=30_000) as client:
        replies = list(client.stream({}, **params))
        wave = np.concatenate([r.arrays["wave"] for r in replies])
        assert wave.dtype == np.float32 and wave.shape[0] == int(seconds * pipeline.model.sample_rate)
        assert [r.result["index"] for r in replies] == list(range(len(replies))) and replies[-1].header["final"]
        assert replies[1].result["offset_s"] == pytest.approx(replies[0].arrays["wave"].shape[0] / 16000)
        # what the library streams, the server sends
        local = chunks(MusicStream(pipeline, PROMPT, seconds, params["window_s"], params["overlap_s"], steps=4))
        assert np.array_equal(wave, torch.cat([c.wave for c in local]).numpy())
        for bad, match in (({"tie": "average"}, "tie"), ({"accel": "fast"}, "accel"),
                           ({"overlap_s": params["window_s"]}, "overlap"), ({"prompt": 3}, "prompt")):
            with pytest.raises(ServerError, match=match):
                list(client.stream({}, **{**params, **bad}))
        described = client.info()["models"]["music"]
        assert described["kind"] == "music" and list(described["stream_updates"]) == ["prompt"]
        # an endless stream goes on while granted, and cancel ends it
        endless = client.submit("stream", credits=2, **{k: v for k, v in params.items() if k != "seconds"})
        chunks_seen = [client.result(endless) for _ in range(2)]
        assert [r.result["index"] for r in chunks_seen] == [0, 1] and not chunks_seen[-1].header.get("final")
        cancel = client.submit("cancel", target=endless)
        with pytest.raises(ServerError, match="cancelled"):
            client.result(endless)
        assert client.result(cancel).result == {"cancelled": True} and client.stats()["streams"] == 0


def test_the_player_counts_underruns():
    from rtdiff.audio.listen import Player

    steady = Player()
    for arrival in (10.0, 10.5, 11.0, 11.9):  # 1 s chunks, each before the last ran out
        steady.receive(1.0, arrival)
    assert steady.underruns == 0 and steady.finished_chunks(12.05) == 2
    assert steady.time_until_next_finish(12.05, 2) == pytest.approx(0.95)
    late = Player()
    for arrival in (10.0, 12.5, 13.0, 15.0):  # dry from 11 to 12.5, then from 14.5 (it resumed at 12.5)
        late.receive(1.0, arrival)
    assert late.underruns == 2


def test_listen_writes_the_stream_and_its_report(folder, pipeline, tmp_path):
    import json

    import soundfile

    from rtdiff.audio.service import MusicService
    from rtdiff.runtime.cli import main
    from rtdiff.runtime.run import RunConfig
    from tests.conftest import ServerThread

    seconds = frames_s(pipeline, 40)
    with ServerThread({"music": MusicService(folder, RunConfig(str(folder), steps=4))}) as server:
        main(["listen", "--server", server.address, "--prompt", PROMPT, "--seconds", str(seconds),
              "--window-s", str(frames_s(pipeline, 16)), "--overlap-s", str(frames_s(pipeline, 4)),
              "--out", str(tmp_path / "s.wav"), "--json", str(tmp_path / "s.json"), "--plot", str(tmp_path / "s.png")])
    wave, rate = soundfile.read(tmp_path / "s.wav", dtype="float32")
    report = json.loads((tmp_path / "s.json").read_text())
    assert rate == 16000 and wave.shape[0] == int(seconds * 16000)
    assert report["chunks"] == 3 and report["audio_seconds"] == pytest.approx(wave.shape[0] / 16000)
    assert report["first_chunk_ms"] <= report["total_ms"] and isinstance(report["underruns"], int)
    assert len(report["boundary_mel_frames"]) == 2 and (tmp_path / "s.png").stat().st_size > 0


def test_a_grant_may_change_the_prompt_from_the_next_window(folder, pipeline):
    from rtdiff.audio.service import MusicService
    from rtdiff.runtime.run import RunConfig
    from rtdiff_client import Client, ServerError
    from tests.conftest import ServerThread

    other = "a slow low organ in minor"
    params = dict(prompt=PROMPT, seconds=frames_s(pipeline, 52), window_s=frames_s(pipeline, 16),
                  overlap_s=frames_s(pipeline, 4))
    service = MusicService(folder, RunConfig(str(folder), steps=4))
    with ServerThread({"music": service}) as server, Client(server.address, model="music", timeout_ms=30_000) as client:
        stream_id = client.submit("stream", credits=1, **params)
        waves = [client.result(stream_id).arrays["wave"]]  # window 0's chunk; out of credit until the grant
        client.submit("stream", request_id=stream_id, grant=8, prompt=other)
        while True:
            reply = client.result(stream_id)
            waves.append(reply.arrays["wave"])
            if reply.header.get("final"):
                break
        with pytest.raises(ServerError, match="bad_message: a grant carries only"):  # and it ends the stream
            bad = client.submit("stream", credits=1, **params)
            client.result(bad)
            client.call("stream", request_id=bad, grant=1, guidance=3.0)
        assert client.stats()["streams"] == 0
    # the change takes effect where window 1's new frames begin (latent frame 16)
    schedule = [(0.0, PROMPT), (frames_s(pipeline, 16), other)]
    local = chunks(MusicStream(pipeline, schedule, params["seconds"], params["window_s"], params["overlap_s"], steps=4))
    assert np.array_equal(np.concatenate(waves), torch.cat([c.wave for c in local]).numpy())
    unchanged = chunks(MusicStream(pipeline, PROMPT, params["seconds"], params["window_s"], params["overlap_s"], steps=4))
    assert not torch.equal(local[-1].wave, unchanged[-1].wave)


def test_listen_changes_the_prompt_when_asked(folder, pipeline, tmp_path, capsys):
    import soundfile

    from rtdiff.audio.service import MusicService
    from rtdiff.runtime.cli import main
    from rtdiff.runtime.run import RunConfig
    from tests.conftest import ServerThread

    other = "a slow low organ in minor"
    seconds, window, overlap = frames_s(pipeline, 52), frames_s(pipeline, 16), frames_s(pipeline, 4)
    with ServerThread({"music": MusicService(folder, RunConfig(str(folder), steps=4))}) as server:
        # one credit: the server waits for each grant, so the change lands at window 1 exactly
        main(["listen", "--server", server.address, "--prompt", PROMPT, "--seconds", str(seconds),
              "--window-s", str(window), "--overlap-s", str(overlap), "--credits", "1",
              "--change-prompt", f"0={other}", "--out", str(tmp_path / "s.wav")])
    wave, _ = soundfile.read(tmp_path / "s.wav", dtype="float32")
    local = chunks(MusicStream(pipeline, [(0.0, PROMPT), (frames_s(pipeline, 16), other)], seconds, window, overlap,
                               steps=4))
    assert np.array_equal(wave, torch.cat([c.wave for c in local]).numpy())
    with pytest.raises(SystemExit):
        main(["listen", "--prompt", PROMPT, "--change-prompt", "soon=x", "--out", str(tmp_path / "t.wav")])
    assert "--change-prompt takes SECONDS=PROMPT, got 'soon=x'" in capsys.readouterr().err
