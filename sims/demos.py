"""Demonstration files: every episode's observations and actions in one safetensors file.

Layout: `observations` (N, obs_dim) float32, `actions` (N, action_dim) float32
and `episode_ends` (E,) int64, the exclusive end index of each episode, as in
Diffusion Policy's replay buffer. String metadata records how the file was
made (task, generator, seeds) so a reader can reproduce it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT = "rtdiff-demos/1"


@dataclass
class Demos:
    observations: np.ndarray
    actions: np.ndarray
    episode_ends: np.ndarray
    meta: dict

    @property
    def episodes(self) -> int:
        return len(self.episode_ends)

    def episode(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        start = 0 if k == 0 else int(self.episode_ends[k - 1])
        end = int(self.episode_ends[k])
        return self.observations[start:end], self.actions[start:end]


def save_demos(path: str | Path, episodes: list[tuple[np.ndarray, np.ndarray]], meta: dict) -> None:
    from safetensors.numpy import save_file

    observations = np.concatenate([obs for obs, _ in episodes]).astype(np.float32)
    actions = np.concatenate([act for _, act in episodes]).astype(np.float32)
    episode_ends = np.cumsum([len(obs) for obs, _ in episodes]).astype(np.int64)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {"observations": observations, "actions": actions, "episode_ends": episode_ends},
        str(path),
        metadata={"format": FORMAT, "meta": json.dumps(meta)},
    )


def load_demos(path: str | Path) -> Demos:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"demonstrations file not found: {path}")
    with safe_open(str(path), framework="numpy") as f:
        header = f.metadata() or {}
        if header.get("format") != FORMAT:
            raise ValueError(f"{path} is not an rtdiff demonstrations file (format {header.get('format')!r})")
        arrays = {key: f.get_tensor(key) for key in ("observations", "actions", "episode_ends")}
    demos = Demos(**arrays, meta=json.loads(header.get("meta", "{}")))
    if len(demos.observations) != len(demos.actions) or demos.episode_ends[-1] != len(demos.actions):
        raise ValueError(f"{path}: episode boundaries do not match the arrays")
    return demos
