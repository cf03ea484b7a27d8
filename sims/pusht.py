"""gym-pusht with state observations: episodes, scoring and demonstrations.

Score as in Diffusion Policy: per episode the maximum over time of gym-pusht's
reward (clip(coverage / 0.95, 0, 1)); an episode succeeds once coverage
reaches 0.95. Episodes last at most 300 control ticks at 10 Hz.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

MAX_STEPS = 300
CONTROL_HZ = 10
SUCCESS_COVERAGE = 0.95
OBS_DIM, ACTION_DIM = 5, 2


class Controller(Protocol):
    def reset(self, seed: int) -> None: ...

    def act(self, obs: np.ndarray) -> np.ndarray: ...


@dataclass
class Episode:
    seed: int
    score: float  # max reward over the episode
    max_coverage: float
    success: bool
    steps: int
    observations: np.ndarray  # (steps, 5): the observation each action answered
    actions: np.ndarray  # (steps, 2)
    rewards: np.ndarray  # (steps,): reward after each action
    frames: list[np.ndarray] = field(default_factory=list)


def make_env(render: bool = False):
    import gymnasium as gym
    import gym_pusht  # noqa: F401  (registers gym_pusht/PushT-v0)

    return gym.make(
        "gym_pusht/PushT-v0",
        obs_type="state",
        render_mode="rgb_array",
        max_episode_steps=MAX_STEPS,
        visualization_width=384 if render else 680,
        visualization_height=384 if render else 680,
    )


def run_episode(env, controller: Controller, seed: int, render: bool = False) -> Episode:
    """One closed-loop episode; ends on success (gym-pusht terminates) or after MAX_STEPS."""
    obs, _ = env.reset(seed=seed)
    controller.reset(seed)
    observations, actions, rewards, frames = [], [], [], []
    score, coverage = 0.0, 0.0
    success = False
    if render:
        frames.append(env.render())
    for _ in range(MAX_STEPS):
        action = np.asarray(controller.act(obs), dtype=np.float32)
        observations.append(np.asarray(obs, dtype=np.float32))
        actions.append(action)
        obs, reward, terminated, truncated, info = env.step(action)
        rewards.append(float(reward))
        score = max(score, float(reward))
        coverage = max(coverage, float(info["coverage"]))
        if render:
            frames.append(env.render())
        if coverage >= SUCCESS_COVERAGE:
            success = True
        if terminated or truncated:
            break
    return Episode(
        seed=seed,
        score=score,
        max_coverage=coverage,
        success=success,
        steps=len(actions),
        observations=np.stack(observations),
        actions=np.stack(actions),
        rewards=np.asarray(rewards, dtype=np.float32),
        frames=frames,
    )


def run_episodes(controller: Controller, seeds, progress: bool = True) -> list[Episode]:
    from tqdm import tqdm

    env = make_env()
    episodes = []
    bar = tqdm(list(seeds), desc="episodes", unit="ep", disable=not progress)
    for seed in bar:
        start = time.perf_counter()
        episodes.append(run_episode(env, controller, int(seed)))
        bar.set_postfix(score=f"{np.mean([e.score for e in episodes]):.3f}", s=f"{time.perf_counter() - start:.1f}")
    env.close()
    return episodes


def _expert_episodes(seeds: list[int]) -> list[Episode]:
    from rtdiff.sims.pusht_expert import PushTExpert

    return run_episodes(PushTExpert(), seeds, progress=False)


def run_expert(seeds, workers: int = 2) -> list[Episode]:
    """The planning expert over `seeds`, split across worker processes (the planner is CPU-bound Python)."""
    seeds = [int(s) for s in seeds]
    if workers <= 1 or len(seeds) < 2:
        return _expert_episodes(seeds)
    from rtdiff.runtime.parallel import starmap_processes

    parts = starmap_processes(_expert_episodes, [([s],) for s in seeds], workers, progress="expert")
    return [episode for part in parts for episode in part]


def demonstration(episode: Episode) -> tuple[np.ndarray, np.ndarray]:
    """The episode up to its best moment: what follows is the expert idling or dithering at the goal."""
    end = int(np.argmax(episode.rewards)) + 1
    return episode.observations[:end], episode.actions[:end]
