"""Streaming music, measured: time to first chunk, real-time factor, seams, and a robot beside a listener.

    python benchmarks/audio_stream.py --json benchmarks/results/audio_stream.json

Sections (each on the bundled music-tiny, DPM-Solver++ 50, guidance 2, one prompt):
- `first_chunk`: for each accelerator (none, sada, bac+sada), `rtdiff audio generate`'s 20 s generation timed
  in this process (as that command times it: text, denoising, VAE, vocoder), then the same 20 s streamed by a
  server process to `rtdiff listen` unpaced (credit granted on arrival, so the server runs flat out), at each
  window size: first-chunk time, its share of the generate time, real-time factor. One server at a time, so the
  two never share the cores.
- `ties`: inpainting against fusion (linear and log ramps), 20 s in this process: seam flux (audio/metrics.py)
  on the streamed log-mel and on the log-mel of the streamed waveform (what is heard), and each stream against
  the offline 20 s generation from the same noise (the fidelity metrics).
- `sixty`: one listener, paced as a player (credit back when a chunk has played), 60 s, best accelerator:
  underruns and real-time factor; then four such listeners at once.
- `pusht`: one server holding pusht-unet and music-tiny, `rtdiff sim pusht` (10 Hz, real time) for 10
  episodes while one listener streams: the sim's stalls and act latency.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from abuse import serving  # noqa: E402

PROMPT = "a fast high melody with drums"
ACCELERATORS = ("none", "sada", "bac+sada")


def generate_ms(pipeline, accel: str, seconds: float, noise: torch.Tensor) -> tuple[float, object]:
    from rtdiff.audio.accelerate import music_accelerator_spec

    accelerator = music_accelerator_spec(accel, "music-tiny", "dpmpp", 50)()
    started = time.perf_counter()
    music = pipeline.generate([PROMPT], seconds, steps=50, solver="dpmpp", guidance=2.0, latents=noise,
                              accelerator=accelerator)
    return (time.perf_counter() - started) * 1e3, music


def timeline_noise(pipeline, seconds: float, seed: int = 0) -> torch.Tensor:
    """The noise a stream of `seconds` starts from, so the offline generation is the stream's counterpart."""
    from rtdiff.audio.stream import noise_timeline

    return noise_timeline(pipeline, seed).frames(0, pipeline.latent_shape(1, seconds)[2])


def stream_over_server(address: str, seconds: float, paced: bool, **params) -> dict:
    from rtdiff.audio.listen import listen

    with tempfile.TemporaryDirectory() as scratch:
        report, mel, wave, boundaries = listen(address, "music", PROMPT, seconds, Path(scratch) / "s.wav",
                                               paced=paced, **params)
    return {k: report[k] for k in ("first_chunk_ms", "total_ms", "audio_seconds", "chunks", "realtime_factor",
                                   "underruns")} | {"mel": mel, "wave": wave, "boundaries": boundaries}


def seams(mel: np.ndarray, wave: np.ndarray, boundaries: list[int]) -> dict:
    from rtdiff.audio.features import log_mel
    from rtdiff.audio.metrics import seam_flux

    heard = log_mel(torch.from_numpy(np.ascontiguousarray(wave))[None])[0]
    mel = torch.from_numpy(mel)
    # the control: the same measure halfway between the joins, where no seam is; it says what "no seam" reads
    middles = [(a + b) // 2 for a, b in zip([0, *boundaries], boundaries)]
    return {"mel": seam_flux(mel, boundaries), "wave": seam_flux(heard, boundaries),
            "control_mel": seam_flux(mel, middles), "control_wave": seam_flux(heard, middles)}


def first_chunk(pipeline, seconds: float, windows: list[float], threads: int) -> list[dict]:
    rows = []
    noise = timeline_noise(pipeline, seconds)
    for accel in ACCELERATORS:
        wall_ms, _ = generate_ms(pipeline, accel, seconds, noise)
        with serving("music=music-tiny", server_threads=threads) as address:
            for window in windows:
                got = stream_over_server(address, seconds, paced=False, accel=accel, window_s=window,
                                         overlap_s=window / 4)
                row = {"accel": accel, "window_s": window, "overlap_s": window / 4, "generate_ms": wall_ms,
                       **{k: v for k, v in got.items() if k not in ("mel", "wave", "boundaries")}}
                row["first_chunk_share"] = row["first_chunk_ms"] / wall_ms
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def ties(pipeline, seconds: float, accel: str) -> list[dict]:
    from rtdiff.audio.accelerate import music_accelerator_spec
    from rtdiff.audio.metrics import fidelity
    from rtdiff.audio.pipeline import Generation
    from rtdiff.audio.stream import MusicStream

    spec = music_accelerator_spec(accel, "music-tiny", "dpmpp", 50)
    _, offline = generate_ms(pipeline, accel, seconds, timeline_noise(pipeline, seconds))
    rows = []
    for tie, ramp in (("inpaint", "linear"), ("fusion", "linear"), ("fusion", "log")):
        chunks = [c for c in MusicStream(pipeline, PROMPT, seconds, tie=tie, ramp=ramp, new_accelerator=spec)
                  if c is not None]
        mel = torch.cat([c.mel for c in chunks])
        wave = torch.cat([c.wave for c in chunks])
        boundaries = list(np.cumsum([c.mel.shape[0] for c in chunks[:-1]]))
        streamed = Generation(None, mel[None, None], wave[None], offline.sample_rate)
        frames = min(mel.shape[0], offline.mel.shape[2])
        reference = Generation(None, offline.mel[:, :, :frames], offline.wave[:, :wave.shape[0]], offline.sample_rate)
        streamed.mel = streamed.mel[:, :, :frames]
        row = {"tie": tie, "ramp": ramp, "accel": accel, "seconds": seconds,
               "seams": seams(mel.numpy(), wave.numpy(), [int(b) for b in boundaries]),
               "against_offline": fidelity(reference, streamed)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def sixty(seconds: float, accel: str, listeners: int, threads: int) -> dict:
    with serving("music=music-tiny", server_threads=threads) as address:
        results = [None] * listeners

        def one(k: int) -> None:
            results[k] = stream_over_server(address, seconds, paced=True, accel=accel, seed=k)

        threads_ = [threading.Thread(target=one, args=(k,)) for k in range(listeners)]
        for t in threads_:
            t.start()
        for t in threads_:
            t.join()
    rows = []
    for got in results:
        row = {k: v for k, v in got.items() if k not in ("mel", "wave", "boundaries")}
        row["seams"] = seams(got["mel"], got["wave"], got["boundaries"])
        rows.append(row)
    summary = {"listeners": listeners, "seconds": seconds, "accel": accel, "per_listener": rows,
               "underruns_total": sum(r["underruns"] for r in rows),
               "realtime_factor_min": min(r["realtime_factor"] for r in rows)}
    print(json.dumps(summary), flush=True)
    return summary


def pusht_beside_listener(episodes: int, accel: str, threads: int, model_threads: str = "auto") -> dict:
    from rtdiff.sims.remote import run_remote

    with serving("pusht=pusht-unet", "music=music-tiny", server_threads=threads,
                 model_threads=model_threads) as address:
        stop, received = threading.Event(), []

        def keep_listening() -> None:
            from rtdiff_client import Client

            with Client(address, model="music", timeout_ms=60_000) as client:
                for reply in client.stream({}, credits=2, prompt=PROMPT, accel=accel):
                    received.append(reply.arrays["wave"].shape[0] / 16000)
                    time.sleep(received[-1])  # played in real time before its credit goes back
                    if stop.is_set():
                        client.call("cancel", target=reply.header["id"])
                        return

        listener = threading.Thread(target=keep_listening, daemon=True)
        listener.start()
        time.sleep(3.0)  # the stream is under way before the first episode
        report = run_remote("pusht", address, "pusht", episodes, 100_000, workers=1)
        stop.set()
        listener.join(timeout=30)
    keys = ("score_mean", "success_rate", "stalls", "ticks", "latency_ms", "server_latency_ms", "request_errors",
            "request_timeouts", "episodes")
    summary = {"accel": accel, "model_threads": model_threads, "music_seconds_during_sim": sum(received),
               **{k: report[k] for k in keys}}
    print(json.dumps(summary), flush=True)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="first_chunk,ties,sixty,pusht")
    parser.add_argument("--seconds", type=float, default=20.0, help="first_chunk and ties: the clip length")
    parser.add_argument("--windows", default="1.28,2.56,5.12", help="first_chunk: window lengths (s)")
    parser.add_argument("--long-seconds", type=float, default=60.0, help="sixty: the stream's length")
    parser.add_argument("--best", default="bac+sada", help="sixty, ties and pusht: the accelerator")
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2, help="the server's torch threads (and this process's)")
    parser.add_argument("--model-threads", choices=["on", "off", "auto"], default="auto",
                        help="pusht: the server's --model-threads (auto: threads, since it holds two models)")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sections = args.sections.split(",")
    result = {"prompt": PROMPT, "model": "music-tiny", "solver": "dpmpp", "steps": 50, "guidance": 2.0,
              "threads": args.threads}
    pipeline = None
    if "first_chunk" in sections or "ties" in sections:
        from rtdiff.audio.cli import load_music_model
        from rtdiff.audio.pipeline import TextToMusic

        pipeline = TextToMusic(load_music_model("music-tiny"))
    if "first_chunk" in sections:
        result["first_chunk"] = first_chunk(pipeline, args.seconds, [float(w) for w in args.windows.split(",")],
                                            args.threads)
    if "ties" in sections:
        result["ties"] = ties(pipeline, args.seconds, args.best)
    if "sixty" in sections:
        result["one_listener"] = sixty(args.long_seconds, args.best, 1, args.threads)
        result["four_listeners"] = sixty(args.long_seconds, args.best, 4, args.threads)
    if "pusht" in sections:
        result["pusht"] = pusht_beside_listener(args.episodes, args.best, args.threads, args.model_threads)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
