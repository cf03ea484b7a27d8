"""Accelerators for MusicLDM checkpoints: BAC block schedules calibrated on prompts.

    rtdiff audio calibrate bac --model music-tiny --solver dpmpp --steps 50 --fraction 0.5

Calibration records every cacheable block's output at every step for a few
training captions (guided, as generation runs), then picks per-block refresh
steps under a cap on block evaluations (runtime/accel/bac.py), choosing among
candidate schedules by how far each moves the final latent from the full
model's on the same prompts and noise. A bundled checkpoint's schedules are
written to the cache directory, a user's beside their checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rtdiff.audio import data
from rtdiff.audio.pipeline import TextToMusic
from rtdiff.runtime.accel import make_accelerator
from rtdiff.runtime.accel.bac import (FORMAT, calibrate_to_fraction, plot_schedule, record_block_outputs,
                                      save_schedule)
from rtdiff.runtime.accel.composed import skip_lattice
from rtdiff.runtime.accel.hooks import feed_forward_blocks
from rtdiff.runtime.accel.schedules import accelerator_spec, default_schedule_path
from rtdiff.runtime.checkpoints import checkpoint_hash

CALIBRATION_SECONDS = 2.56  # block outputs at every step are kept: a short clip keeps that in memory
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
                        seconds: float = CALIBRATION_SECONDS) -> tuple[dict, Path]:
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction of block evaluations must be in (0, 1], got {fraction}")
    texts = calibration_prompts(prompts, seed)
    noise = pipeline.initial_latents(len(texts), seconds, torch.Generator().manual_seed(seed))

    def final_latent(accelerator=None) -> torch.Tensor:
        return pipeline.generate(texts, seconds, steps=steps, solver=solver, guidance=guidance,
                                 latents=noise, accelerator=accelerator).latent

    outputs = record_block_outputs(lambda recorder: final_latent(recorder))
    reference = final_latent()
    scale = reference.pow(2).mean()

    def error(blocks: dict) -> float:
        schedule = {"format": FORMAT, "steps": steps, "solver": solver, "blocks": blocks}
        accelerator = make_accelerator("bac", schedule=schedule, solver=solver, steps=steps)
        try:
            return float((final_latent(accelerator) - reference).pow(2).mean() / scale)
        finally:
            accelerator.unbind()

    skippable = skip_lattice(steps, **sada) if sada is not None else set()
    schedule = calibrate_to_fraction(outputs, fraction, feed_forward_blocks(pipeline.denoiser), error,
                                     set(range(steps)) - skippable)
    if sada is not None:
        schedule.update(skippable=sorted(skippable), sada={"window": list(sada["window"]),
                                                            "max_consecutive": sada["max_consecutive"]})
    schedule.update(command=command, solver=solver, checkpoint=str(checkpoint),
                    checkpoint_sha256=checkpoint_hash(checkpoint),
                    calibration={"prompts": texts, "seconds": seconds, "guidance": guidance,
                                 "seed": seed, "bubble_blocks": len(schedule["bubbled"]),
                                 "error": "final latent MSE relative to its mean square"})
    method = "bac" if sada is None else "bac+sada"
    path = Path(out) if out else default_schedule_path(checkpoint, solver, steps, method)
    save_schedule(schedule, path)
    plot_schedule(schedule, path.with_suffix(".png"))
    return schedule, path
