"""A listening client: streams music from an rtdiff server into a wav file, as a player would consume it.

    rtdiff listen --server tcp://127.0.0.1:5555 --model music --prompt "a slow low melody" --seconds 20 \\
        --out song.wav --json song.json

The player starts when the first chunk arrives and plays in real time; a
chunk's credit goes back to the server when the player has finished it, so
the server computes at most `credits` chunks ahead of what is heard
(`paced=False` grants each credit as its chunk arrives: the server then runs
as fast as it can, which is how raw generation speed is measured). The wav on
disk is valid after every chunk (its header is rewritten with each write).

Figures: `first_chunk_ms` (request to first chunk), `total_ms`, `audio_seconds`,
`chunks`, `realtime_factor` (audio seconds received after the first chunk per
wall second from the first chunk to the last) and `underruns` (times the
player ran dry: it then waits for the next chunk and plays on from there).
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rtdiff_client import Client


@dataclass
class Player:
    """Where a real-time player that started with the first chunk would be: it plays while it has audio and
    waits, counting an underrun, when it has none."""

    started: float | None = None
    received_s: float = 0.0  # audio received so far
    position_s: float = 0.0  # audio played at `clock`
    clock: float = 0.0
    underruns: int = 0
    ends: list = field(default_factory=list)  # stream time at which each received chunk ends

    def receive(self, seconds: float, now: float) -> None:
        if self.started is None:
            self.started = self.clock = now
        else:
            self.advance(now)
        self.received_s += seconds
        self.ends.append(self.received_s)

    def advance(self, now: float) -> None:
        position = self.position_s + (now - self.clock)
        if position > self.received_s + 1e-9:  # ran dry before this moment: it waited at the end of its audio
            self.underruns += 1
            position = self.received_s
        self.position_s, self.clock = position, now

    def finished_chunks(self, now: float) -> int:
        """How many received chunks have been played through by `now`."""
        if self.started is None:
            return 0
        position = min(self.received_s, self.position_s + (now - self.clock))
        return bisect.bisect_right(self.ends, position + 1e-9)

    def time_until_next_finish(self, now: float, granted: int) -> float | None:
        """Seconds until the chunk after the first `granted` finished ones is played through; None if it has
        not arrived."""
        if self.started is None or granted >= len(self.ends):
            return None
        position = self.position_s + (now - self.clock)
        return max(0.0, self.ends[granted] - position)


def listen(address: str, model: str | None, prompt: str, seconds: float | None, out: str | Path,
           credits: int = 4, paced: bool = True, timeout_ms: float = 120_000, curve: str | None = None,
           prompt_changes: list[tuple[float, str]] = (), **params) -> tuple[dict, np.ndarray, np.ndarray, list[int]]:
    """Streams into `out`; returns the report, the mel (frames x bins) and the wave received, and the mel
    frame index at which each chunk after the first begins. `prompt_changes`: (seconds, prompt) pairs; the
    first grant sent once that much audio has arrived carries the prompt, which the server plays from its next
    window."""
    import soundfile

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    params = {"prompt": prompt, **({"seconds": seconds} if seconds is not None else {}), **params}
    with Client(address, model=model, timeout_ms=timeout_ms, retries=0, curve_dir=curve) as client:
        model, sample_rate = _music_model(client, model)
        player, mels, waves, boundaries = Player(), [], [], []
        started = time.perf_counter()
        with soundfile.SoundFile(str(out), "w", sample_rate, 1, subtype="FLOAT") as wav:
            request_id = client.submit("stream", credits=credits, **params)
            try:
                _receive(client, request_id, player, wav, mels, waves, boundaries, sample_rate, paced, timeout_ms,
                         sorted(prompt_changes))
            except KeyboardInterrupt:  # how an endless stream's listener stops: what it has is kept and reported
                client.submit("cancel", target=request_id)
                if not waves:
                    raise
    first_ms, last = (player.started - started) * 1e3, player.clock
    total_ms = (last - started) * 1e3
    audio = sum(w.shape[0] for w in waves) / sample_rate
    after_first = audio - waves[0].shape[0] / sample_rate
    report = {"server": address, "model": model, "prompt": prompt, "params": params, "paced": paced,
              "credits": credits, "prompt_changes": [list(c) for c in prompt_changes], "first_chunk_ms": first_ms, "total_ms": total_ms, "audio_seconds": audio,
              "chunks": len(waves), "sample_rate": sample_rate,
              "realtime_factor": after_first / ((total_ms - first_ms) / 1e3) if len(waves) > 1 else None,
              "underruns": player.underruns}
    return report, np.concatenate(mels), np.concatenate(waves), boundaries


def _receive(client, request_id, player: Player, wav, mels: list, waves: list, boundaries: list, sample_rate: int,
             paced: bool, timeout_ms: float, prompt_changes: list) -> None:
    """Chunks into the wav and the lists until the final one, granting credit as the player finishes chunks
    (paced) or as each arrives; a grant carries the next prompt change once its time has arrived."""
    granted, changes = 0, list(prompt_changes)

    def grant(k: int) -> None:
        change = {}
        if changes and changes[0][0] <= player.received_s + 1e-9:
            change = {"prompt": changes.pop(0)[1]}
        client.submit("stream", request_id=request_id, grant=k, **change)

    while True:
        wait = player.time_until_next_finish(time.perf_counter(), granted) if paced else None
        try:
            reply = client.result(request_id, timeout_ms if wait is None else wait * 1e3)
        except TimeoutError:
            if wait is None:
                raise
            grant(1)  # the player finished a chunk
            granted += 1
            continue
        now = time.perf_counter()
        wave, mel = reply.arrays["wave"], reply.arrays["mel"]
        if mels:
            boundaries.append(sum(m.shape[0] for m in mels))
        player.receive(wave.shape[0] / sample_rate, now)
        wav.write(wave)
        wav.flush()
        mels.append(mel)
        waves.append(wave)
        if reply.header.get("final"):
            return
        if not paced:
            grant(1)
            continue
        done = player.finished_chunks(now)
        if done > granted:
            grant(done - granted)
            granted = done


def _music_model(client, model: str | None) -> tuple[str, int]:
    """The served music model's name (the only model, if none is named) and its sample rate."""
    models = client.info(model=model)["models"]
    if model is None:
        if len(models) != 1:
            raise ValueError(f"the server serves {sorted(models)}: name one with --model")
        model = client.model = next(iter(models))
    if "sample_rate" not in models[model]:
        raise ValueError(f"model {model!r} is not a music model ({models[model].get('kind')})")
    return model, int(models[model]["sample_rate"])
