"""Accelerators for MusicLDM checkpoints: BAC block schedules calibrated on prompts.

    rtdiff audio calibrate bac --model music-tiny --solver dpmpp --steps 50 --fraction 0.5

Calibration records every cacheable block's output at every step for a few
training captions (guided, as generation runs), then picks per-block refresh
steps under a cap on block evaluations (runtime/accel/bac.py). Candidate
schedules are screened by how far each moves the final latent from the full
model's on those short clips; the best few are then run as they will be
served (the accelerator itself, SADA included for bac+sada, one prompt at a
time, at the length generation uses, on other captions), and the one whose
log-mel lands nearest the full model's is kept. A bundled checkpoint's
schedules are written to the cache directory, a user's beside their checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rtdiff.audio import data
from rtdiff.audio.metrics import mel_psnr
from rtdiff.audio.pipeline import TextToMusic
from rtdiff.runtime.accel import make_accelerator
from rtdiff.runtime.accel.base import check_reuse
from rtdiff.runtime.accel.bac import (FORMAT, calibrate_to_fraction, plot_schedule, record_block_outputs,
                                      save_schedule)
from rtdiff.runtime.accel.composed import skip_lattice
from rtdiff.runtime.accel.hooks import feed_forward_blocks
from rtdiff.runtime.accel.schedules import accelerator_spec, default_schedule_path
from rtdiff.runtime.checkpoints import checkpoint_hash

CALIBRATION_SECONDS = 2.56  # block outputs at every step are kept: a short clip keeps that in memory
FINAL_PROMPTS, FINAL_SECONDS = 4, 10.0  # the finalists run as served, at the bundled generate's length
CALIBRATE_COMMAND = "rtdiff audio calibrate"


def calibration_prompts(count: int, seed: int) -> list[str]:
    """Training captions (never the held-out ones the quality benchmark prompts with)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [data.training_caption(data.draw_clip(rng, seed=i), rng) for i in range(count)]


def music_accelerator_spec(name: str, checkpoint: str, solver: str, steps: int, options: dict | None = None):
    return accelerator_spec(name, checkpoint, solver, steps, options, calibrate_command=CALIBRATE_COMMAND)


def calibrate_music_bac(checkpoint: str, pipeline: TextToMusic, solver: str, steps: int, fraction: float,
                        prompts: int = 2, seed: int = 0, guidance: float = 2.0, sada: dict | None = None,
                        out: str | Path | None = None, command: str | None = None,
                        seconds: float = CALIBRATION_SECONDS, final_prompts: int = FINAL_PROMPTS,
                        final_seconds: float = FINAL_SECONDS, reuse: str = "last") -> tuple[dict, Path]:
    """`sada`: SADA's options for bac+sada (its window and run length also lay out the steps left to it);
    `final_prompts` 0 keeps the screen's choice; `reuse`: what stands in for a cached block (hooks.BlockCache),
    which every candidate is scored with and the schedule keeps."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction of block evaluations must be in (0, 1], got {fraction}")
    check_reuse(reuse)
    method = "bac" if sada is None else "bac+sada"
    texts = calibration_prompts(prompts, seed)
    noise = pipeline.initial_latents(len(texts), seconds, torch.Generator().manual_seed(seed))

    def final_latent(accelerator=None) -> torch.Tensor:
        return pipeline.generate(texts, seconds, steps=steps, solver=solver, guidance=guidance,
                                 latents=noise, accelerator=accelerator).latent

    outputs = record_block_outputs(lambda recorder: final_latent(recorder))
    reference = final_latent()
    scale = reference.pow(2).mean()

    def error(blocks: dict) -> float:
        schedule = {"format": FORMAT, "steps": steps, "solver": solver, "reuse": reuse, "blocks": blocks}
        accelerator = make_accelerator("bac", schedule=schedule, solver=solver, steps=steps)
        try:
            return float((final_latent(accelerator) - reference).pow(2).mean() / scale)
        finally:
            accelerator.unbind()

    skippable = skip_lattice(steps, sada.get("window", (0.1, 0.97)), sada.get("max_consecutive", 2)) \
        if sada is not None else set()
    extra = {"reuse": reuse}
    if sada is not None:
        extra.update(skippable=sorted(skippable), sada=_json_options(sada))
    final_texts = calibration_prompts(final_prompts, seed + 1)
    final_error = served_error(pipeline, method, {"format": FORMAT, "steps": steps, "solver": solver, **extra},
                               final_texts, final_seconds, seed + 1, guidance) if final_prompts else None
    schedule = calibrate_to_fraction(outputs, fraction, feed_forward_blocks(pipeline.denoiser), error,
                                     set(range(steps)) - skippable, final_error=final_error)
    schedule.update(extra)
    schedule.update(command=command, solver=solver, checkpoint=str(checkpoint),
                    checkpoint_sha256=checkpoint_hash(checkpoint),
                    calibration={"prompts": texts, "seconds": seconds, "guidance": guidance,
                                 "seed": seed, "bubble_blocks": len(schedule["bubbled"]),
                                 "error": "final latent MSE relative to its mean square",
                                 **({"final_prompts": final_texts, "final_seconds": final_seconds,
                                     "final_error": f"{method} as served, one prompt at a time: log-mel MSE over "
                                                    "the reference's squared range (10^(-PSNR/10)), mean over "
                                                    "prompts"} if final_prompts else {})})
    path = Path(out) if out else default_schedule_path(checkpoint, solver, steps, method)
    save_schedule(schedule, path)
    plot_schedule(schedule, path.with_suffix(".png"))
    return schedule, path


def served_error(pipeline: TextToMusic, method: str, schedule: dict, texts: list[str], seconds: float, seed: int,
                 guidance: float):
    """blocks -> log-mel error of `method` with those blocks, run as served: one prompt at a time, from its own
    noise, against the unaccelerated mel; the error is MSE over the reference's squared range, 10^(-PSNR/10),
    averaged over the prompts."""
    solver, steps = schedule["solver"], schedule["steps"]
    noises = [pipeline.initial_latents(1, seconds, torch.Generator().manual_seed(seed + k)) for k in range(len(texts))]

    def mel(text, latents, accelerator=None):
        return pipeline.generate([text], seconds, steps=steps, solver=solver, guidance=guidance, latents=latents,
                                 accelerator=accelerator).mel

    references = [mel(text, latents) for text, latents in zip(texts, noises)]

    def error(blocks: dict) -> float:
        errors = []
        for text, latents, reference in zip(texts, noises, references):
            accelerator = make_accelerator(method, schedule={**schedule, "blocks": blocks}, solver=solver,
                                           steps=steps)
            try:
                errors.append(float(10 ** (-mel_psnr(reference, mel(text, latents, accelerator)) / 10)))
            finally:
                accelerator.unbind()
        return sum(errors) / len(errors)

    return error


def _json_options(options: dict) -> dict:
    return {key: list(value) if isinstance(value, tuple) else value for key, value in options.items()}
