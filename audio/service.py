"""The audio service: text to an endless stream of music over the `stream` op (audio/stream.py).

    rtdiff serve --model music=music-tiny --accel bac+sada

A `stream` request names a prompt and how to generate (all optional but the
prompt); each reply carries one chunk as arrays `mel` (float32, frames x mel
bins) and `wave` (float32, samples at the model's rate) and, in its result,
the chunk's `offset_s` in the stream. The stream ends after `seconds`, or
never without it (until the client cancels it or stops granting credit, and
its lease runs out). Every chunk is computed one denoising step per job, so
the server answers other models between the steps of a window.
"""

from __future__ import annotations

import threading
from collections import deque
from pathlib import Path

import numpy as np

from rtdiff.audio.accelerate import music_accelerator_spec
from rtdiff.audio.components import load_musicldm
from rtdiff.audio.pipeline import TextToMusic
from rtdiff.audio.stream import OVERLAP_S, WINDOW_S, MusicStream
from rtdiff.runtime.accel import ACCELERATORS
from rtdiff.runtime.checkpoints import checkpoint_hash
from rtdiff.runtime.run import RunConfig
from rtdiff.runtime.service import ArraySpec, ParamSpec
from rtdiff.runtime.windows import RAMPS, TIES
from rtdiff_client.protocol import Message, ProtocolError

SOLVER, STEPS = "dpmpp", 50  # what a music model is served with unless `rtdiff serve` names another


class MusicService:
    ops = ("stream",)
    inputs = ()
    chunk_inputs = ()
    params = {
        "prompt": ParamSpec("str", 1, 500, required=True, doc="what to play"),
        "negative_prompt": ParamSpec("str", high=500, doc="what to steer away from"),
        "seconds": ParamSpec("number", 1e-4, 86_400.0, doc="the stream's length; without it, endless"),
        "window_s": ParamSpec("number", 1e-4, 10.24, doc=f"latent window length, default {WINDOW_S}"),
        "overlap_s": ParamSpec("number", 1e-4, 5.12, doc=f"how much of each window is tied to the one before, "
                                                          f"default {OVERLAP_S}"),
        "tie": ParamSpec("str", high=16, doc=f"how the overlap is tied: {' or '.join(TIES)} (default inpaint)"),
        "ramp": ParamSpec("str", high=16, doc=f"fusion's weights: {' or '.join(RAMPS)}"),
        "guidance": ParamSpec("number", 1.0, 20.0, doc="classifier-free guidance scale, default 2"),
        "seed": ParamSpec("int", 0, 2**63 - 1, doc="fixes the stream's noise"),
        "accel": ParamSpec("str", high=16, doc=f"one of {', '.join(ACCELERATORS)}; default: the server's"),
    }

    stream_updates = {"prompt": ParamSpec("str", 1, 500, doc="a grant may change the prompt: from the next window on")}

    def __init__(self, folder: Path, run: RunConfig):
        if run.backend != "torch":
            raise NotImplementedError(f"backend {run.backend!r} is not built for audio yet: only torch serves music")
        self.run = run = run.with_solver(SOLVER, STEPS)
        if run.solver not in ("ddim", "dpmpp"):
            raise ValueError(f"MusicLDM is served with ddim or dpmpp, not {run.solver!r}")
        self.model = load_musicldm(folder)
        self.pipeline = TextToMusic(self.model)
        self.hash = checkpoint_hash(run.checkpoint)
        self.outputs = (ArraySpec("mel", "float32", ("frames", self.model.mel_bins)),
                        ArraySpec("wave", "float32", ("samples",)))
        self._specs = {run.accel: music_accelerator_spec(run.accel, run.checkpoint, run.solver, run.steps,
                                                         run.accel_options)}
        self.recent: deque[dict] = deque(maxlen=1000)  # per finished chunk, for `stats`
        self._lock = threading.Lock()  # appended on the model's worker, read on the server's loop

    def info(self) -> dict:
        return {"kind": "music", "checkpoint": self.run.checkpoint, "checkpoint_sha256": self.hash,
                "solver": self.run.solver, "steps": self.run.steps, "accel": self.run.accel,
                "accel_options": self.run.accel_options, "backend": self.run.backend,
                "sample_rate": self.model.sample_rate, "mel_bins": self.model.mel_bins,
                "latent_frame_s": self.model.vae_scale_factor * self.model.hop_length / self.model.sample_rate}

    def stats(self) -> dict:
        with self._lock:
            recent = list(self.recent)
        if not recent:
            return {"accel": self.run.accel, "chunks": 0}
        return {"accel": self.run.accel, "chunks": len(recent),
                "chunk_compute_ms_mean": float(np.mean([r["compute_ms"] for r in recent])),
                "audio_s_per_compute_s": float(sum(r["audio_s"] for r in recent)
                                               / max(1e-9, sum(r["compute_ms"] for r in recent) / 1e3))}

    def stream(self, message: Message):
        """Checks the request whole (so a bad one is refused before any compute), then returns the chunks'
        iterator: None after each denoising step that finishes no chunk, then (arrays, result, final)."""
        params = message.params
        try:  # an unknown tie, ramp or accelerator, or a window that cannot tie, is a ValueError naming it
            new_accelerator = self._accelerator(params.get("accel", self.run.accel))
            music = MusicStream(
                self.pipeline, params["prompt"], params.get("seconds"), params.get("window_s", WINDOW_S),
                params.get("overlap_s", OVERLAP_S), params.get("tie", "inpaint"), params.get("ramp", "linear"),
                self.run.steps, self.run.solver, params.get("guidance", 2.0), params.get("negative_prompt"),
                params.get("seed", 0), new_accelerator)
        except (ValueError, FileNotFoundError) as error:
            raise ProtocolError("bad_message", str(error)) from None
        return MusicReplies(music, self._replies(music))

    def _accelerator(self, name: str):
        if name not in self._specs:  # a request's own choice: no options but its schedule's
            self._specs[name] = music_accelerator_spec(name, self.run.checkpoint, self.run.solver, self.run.steps)
        return self._specs[name]

    def _replies(self, music: MusicStream):
        for chunk in music:
            if chunk is None:
                yield None
                continue
            audio_s = chunk.wave.shape[0] / self.model.sample_rate
            with self._lock:
                self.recent.append({"compute_ms": chunk.compute_ms, "audio_s": audio_s})
            arrays = {"mel": np.ascontiguousarray(chunk.mel.numpy()), "wave": np.ascontiguousarray(chunk.wave.numpy())}
            result = {"index": chunk.index, "offset_s": chunk.offset_s, "seconds": audio_s,
                      "compute_ms": chunk.compute_ms}
            yield arrays, result, chunk.final


class MusicReplies:
    """A music stream's replies, and the way a grant's `prompt` reaches it (`update`, on the model's worker)."""

    def __init__(self, music: MusicStream, replies):
        self.music, self._replies = music, replies

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._replies)

    def update(self, params: dict) -> None:
        if "prompt" in params:
            self.music.change_prompt(params["prompt"])

