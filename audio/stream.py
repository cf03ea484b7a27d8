"""Endless music: MusicLDM continued window by window (runtime/windows.py), each window's new audio sent as it
settles.

    chunks = MusicStream(TextToMusic(model), "a slow low melody with drums", seconds=20)
    for chunk in chunks:          # None after each denoising step that finishes no chunk
        if chunk is not None:
            play(chunk.wave)      # (samples,) float32 at 16 kHz; chunk.mel (frames, mel bins)

Each window is a latent of `window_s` seconds whose first `overlap_s` are tied
to the window before (inpainting by default, or StableAvatar's fusion). The
settled frames are decoded with `context_s` of latent on both sides (by default
half the overlap, at most CONTEXT_S), so the VAE and the vocoder never see an
edge inside what is kept; then cut to the new part and cross-faded over
`fade_s` into what the previous chunk's decode gave there. So a listener gets its first audio after one window's denoising, and
every later chunk costs one window's, however long the stream runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from rtdiff.audio.pipeline import SOLVERS, TextToMusic
from rtdiff.audio.text import embed_prompts, embed_text
from rtdiff.runtime.guidance import ClassifierFreeGuidance
from rtdiff.runtime.solvers import make_solver
from rtdiff.runtime.windows import CrossFade, Emitter, NoiseTimeline, WindowPlan, sliding_windows

WINDOW_S, OVERLAP_S = 2.56, 0.64  # the length the UNet was trained on; a quarter of it tied to the window before
CONTEXT_S, FADE_S = 0.32, 0.04


@dataclass
class MusicChunk:
    index: int
    offset_s: float  # where its first sample falls in the stream
    mel: torch.Tensor  # (frames, mel bins): the VAE's log-mel
    wave: torch.Tensor  # (samples,) at the model's sample rate
    final: bool
    compute_ms: float  # wall time since the previous chunk (or since the stream began)


Prompts = str | Sequence[tuple[float, str]]  # one prompt, or (from second, prompt) pairs in order


class MusicStream:
    def __init__(self, pipeline: TextToMusic, prompt: Prompts, seconds: float | None = None,
                 window_s: float = WINDOW_S, overlap_s: float = OVERLAP_S, tie: str = "inpaint",
                 ramp: str = "linear", steps: int = 50, solver: str = "dpmpp", guidance: float = 2.0,
                 negative_prompt: str | None = None, seed: int = 0,
                 new_accelerator: Callable[[], object] | None = None,
                 context_s: float | None = None, fade_s: float | None = None):
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r} for MusicLDM; expected one of {SOLVERS}")
        model = pipeline.model
        self.pipeline, self.model = pipeline, model
        self.frame_s = model.vae_scale_factor * model.hop_length / model.sample_rate  # one latent frame
        self.plan = WindowPlan(self._frames(window_s, "window_s"), self._frames(overlap_s, "overlap_s"), tie, ramp)
        self.length = self._frames(seconds, "seconds") if seconds is not None else None
        self.samples = int(seconds * model.sample_rate) if seconds is not None else None
        # by default as much decoder context as half the overlap allows, up to CONTEXT_S, and a fade within it
        context_s = min(CONTEXT_S, overlap_s / 2) if context_s is None else context_s
        fade_s = min(FADE_S, context_s / 2) if fade_s is None else fade_s
        self.context = self._frames(context_s, "context_s") if context_s > 0 else 0
        if self.context > self.plan.overlap and tie == "fusion":
            raise ValueError(f"context_s {context_s} is longer than the overlap {overlap_s}: under fusion the "
                             "decoder's right context must lie in the window's own overlap")
        self.prompts = self._prompt_schedule(prompt)
        self.steps, self.solver, self.guidance = steps, solver, guidance
        self.negative_prompt, self.seed, self.new_accelerator = negative_prompt, seed, new_accelerator
        self.fade_s = fade_s
        self._embeddings: dict[str, torch.Tensor] = {}
        self._pending_prompt: str | None = None

    def _frames(self, seconds: float, name: str) -> int:
        frames = round(seconds / self.frame_s)
        if seconds <= 0 or frames < 1:
            raise ValueError(f"{name} must be at least one latent frame ({self.frame_s} s), got {seconds}")
        return frames

    @staticmethod
    def _prompt_schedule(prompt: Prompts) -> list[tuple[float, str]]:
        schedule = [(0.0, prompt)] if isinstance(prompt, str) else [(float(t), p) for t, p in prompt]
        if not schedule or schedule[0][0] != 0.0 or any(b[0] <= a[0] for a, b in zip(schedule, schedule[1:])):
            raise ValueError("prompts: a prompt from second 0, then (second, prompt) pairs in increasing order")
        if any(not p for _, p in schedule):
            raise ValueError("an empty prompt")
        return schedule

    def change_prompt(self, prompt: str) -> None:
        """From the next window that has not started on (what a listener asks for mid-stream)."""
        if not prompt:
            raise ValueError("an empty prompt")
        self._pending_prompt = prompt

    def prompt_at(self, k: int) -> str:
        """The prompt of window k: the last one whose start is at or before the window's new frames."""
        return [p for t, p in self.prompts if t <= self._new_from(k) + 1e-9][-1]

    def _new_from(self, k: int) -> float:
        """Where window k's new frames begin, in seconds."""
        return (self.plan.start(k) + (self.plan.overlap if k else 0)) * self.frame_s

    def _conditioning(self, k: int) -> dict:
        if self._pending_prompt is not None:  # a change asked for while the previous window ran
            begins = self._new_from(k)
            self.prompts = [(t, p) for t, p in self.prompts if t < begins] + [(begins, self._pending_prompt)]
            self._pending_prompt = None
        prompt = self.prompt_at(k)
        if prompt not in self._embeddings:
            self._embeddings[prompt] = embed_text(self.model.text_encoder, self.model.tokenizer, [prompt])
        return {"text": self._embeddings[prompt]}

    def __iter__(self) -> Iterator[MusicChunk | None]:
        return self.chunks()

    @torch.no_grad()
    def chunks(self) -> Iterator[MusicChunk | None]:
        """One pass over the stream; each pass starts afresh (its own noise, emitter and fades)."""
        model, plan = self.model, self.plan
        first = self.prompts[0][1]
        negative = [self.negative_prompt] if self.negative_prompt is not None else None
        self._embeddings[first], uncond = embed_prompts(model.text_encoder, model.tokenizer, [first], negative)
        denoiser = self.pipeline.denoiser
        if self.guidance > 1.0:
            denoiser = ClassifierFreeGuidance(denoiser, self.guidance, {"text": uncond})
        noise = noise_timeline(self.pipeline, self.seed)
        sampler = make_solver(self.solver, model.scheduler, self.steps)
        emitter = Emitter(plan, self.context, self.length)
        mel_rate = model.vae_scale_factor
        mel_fade = CrossFade(mel_rate, int(round(self.fade_s / self.frame_s * mel_rate)), axis=0)
        wave_fade = CrossFade(mel_rate * model.hop_length, int(round(self.fade_s * model.sample_rate)), axis=0)
        started = time.perf_counter()
        index = 0
        for window in sliding_windows(denoiser, sampler, plan, noise, self._conditioning, self.length,
                                      self.new_accelerator):
            segment = emitter.push(window) if window is not None else None
            if segment is None:
                yield None
                continue
            mel, wave = self._decode(segment)
            mel, wave = mel_fade(mel, segment), wave_fade(wave, segment)
            if segment.last and self.samples is not None:
                wave = wave[:self.samples - int(segment.start * self.frame_s * model.sample_rate)]
            now = time.perf_counter()
            yield MusicChunk(index, segment.start * self.frame_s, mel, wave, segment.last, (now - started) * 1e3)
            started, index = now, index + 1
            if segment.last:
                return

    def _decode(self, segment) -> tuple[torch.Tensor, torch.Tensor]:
        """The segment's latent, context included, to its log-mel (frames, bins) and waveform (samples,)."""
        model = self.model
        mel = model.vae.decode(segment.latent / model.vae.config.scaling_factor).sample  # (1, 1, frames, bins)
        return mel[0, 0], model.vocoder(mel.squeeze(1))[0]


def noise_timeline(pipeline: TextToMusic, seed: int) -> NoiseTimeline:
    """The initial noise of a stream with this seed, frame by frame; `frames(0, n)` is what an offline
    generation of the same n latent frames starts from to be the stream's counterpart."""
    shape = list(pipeline.latent_shape(1, 1.0))
    shape[2] = 1  # the latent's time axis
    return NoiseTimeline(tuple(shape), torch.Generator().manual_seed(seed), time_dim=2)
