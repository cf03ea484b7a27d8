"""The simulated tasks: where each one's episodes, expert and demonstrations live, and its control rate.

A task module provides `CONTROL_HZ`, `OBS_DIM`, `ACTION_DIM`, `run_episodes(controller, seeds, progress)`,
`run_episode(env, controller, seed, render)`, `make_env(render)`, `run_expert(seeds, workers)` and
`demonstration(episode)`; its episodes have `seed`, `score`, `success` and `steps`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parent / "data"


@dataclass(frozen=True)
class Task:
    name: str
    module: str
    demos: Path
    expert: str  # what generated the demonstrations
    demo_noise: float = 0.0  # Gaussian noise on the expert's executed actions while recording (DART)

    def load(self):
        return importlib.import_module(self.module)


TASKS = {
    "pusht": Task("pusht", "rtdiff.sims.pusht", DATA / "pusht_demos.safetensors", "rtdiff.sims.pusht_expert.PushTExpert"),
    "lift": Task("lift", "rtdiff.sims.robosuite_lift", DATA / "lift_demos.safetensors", "rtdiff.sims.robosuite_lift.LiftExpert",
                 demo_noise=0.1),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(TASKS)}")
    return TASKS[name]


def summarize(episodes) -> dict:
    scores = [float(e.score) for e in episodes]
    return {
        "episodes": len(episodes),
        "seeds": [e.seed for e in episodes],
        "scores": scores,
        "score_mean": float(np.mean(scores)),
        "success_rate": float(np.mean([e.success for e in episodes])),
        "steps_mean": float(np.mean([e.steps for e in episodes])),
    }
