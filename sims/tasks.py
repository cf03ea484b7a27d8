"""The simulated tasks: where each one's episodes, expert and demonstrations live, and its control rate.

A task module provides `CONTROL_HZ`, `OBS_DIM`, `ACTION_DIM`, `run_episodes(controller, seeds, progress)`,
`run_episode(env, controller, seed, render)`, `make_env(render)`, `run_expert(seeds, workers)` and
`demonstration(episode)`; its episodes have `seed`, `score`, `success` and `steps`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from rtdiff.runtime.stats import summarize_episodes

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
    return summarize_episodes([(e.seed, e.score, e.success, e.steps) for e in episodes])
