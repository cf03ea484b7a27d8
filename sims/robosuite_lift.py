"""robosuite Lift (Panda, low-dimensional state, headless): episodes, a scripted expert and demonstrations.

Observations are one vector per tick: the end effector's position and
quaternion, the gripper's finger positions, the cube's position and quaternion
and the gripper-to-cube offset (19 numbers). Actions are the default Panda
arm controller's (OSC_POSE deltas: position 3, axis-angle 3, gripper 1, each
in [-1, 1]) at 20 Hz. An episode succeeds by robosuite's own check (the cube
lifted 4 cm above the table) and ends there, or after MAX_STEPS ticks.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np

MAX_STEPS = 200
CONTROL_HZ = 20
OBS_KEYS = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "cube_pos", "cube_quat", "gripper_to_cube_pos")
OBS_DIM, ACTION_DIM = 19, 7


def make_env(render: bool = False):
    os.environ.setdefault("MUJOCO_GL", "egl")  # headless
    # robosuite warns about optional extras at import and logs every controller load; keep its errors only.
    robosuite_log = logging.getLogger("robosuite_logs")
    if not robosuite_log.filters:
        robosuite_log.addFilter(lambda record: record.levelno >= logging.ERROR)
    import robosuite

    return robosuite.make(
        "Lift", robots="Panda", has_renderer=False, has_offscreen_renderer=render, use_camera_obs=False,
        control_freq=CONTROL_HZ, horizon=MAX_STEPS, ignore_done=True, reward_shaping=False,
        camera_names="frontview", camera_heights=256, camera_widths=256,
    )


def observation(obs: dict) -> np.ndarray:
    return np.concatenate([np.asarray(obs[key], dtype=np.float32) for key in OBS_KEYS])


def reset(env, seed: int) -> np.ndarray:
    """A seeded episode: the cube's placement and the arm's initial noise come from env.rng, reseeded in place
    (robosuite's placement sampler holds the same generator)."""
    env.rng.bit_generator.state = np.random.default_rng(seed).bit_generator.state
    np.random.seed(seed % 2**32)
    return observation(env.reset())


@dataclass
class Episode:
    seed: int
    success: bool
    steps: int
    observations: np.ndarray
    actions: np.ndarray
    frames: list = field(default_factory=list, repr=False)

    @property
    def score(self) -> float:
        return float(self.success)


def run_episode(env, controller, seed: int, render: bool = False) -> Episode:
    obs = reset(env, seed)
    controller.reset(seed)
    observations, actions, frames = [], [], []
    success = False
    for _ in range(MAX_STEPS):
        action = np.clip(np.asarray(controller.act(obs), dtype=np.float64), -1.0, 1.0)
        observations.append(obs)
        actions.append(action.astype(np.float32))
        raw, _, _, _ = env.step(action)
        obs = observation(raw)
        if render:
            frames.append(env.sim.render(camera_name="frontview", height=256, width=256)[::-1])
        if env._check_success():
            success = True
            break
    return Episode(seed, success, len(actions), np.stack(observations), np.stack(actions), frames)


def run_episodes(controller, seeds, progress: bool = True) -> list[Episode]:
    from tqdm import tqdm

    env = make_env()
    episodes = []
    bar = tqdm(list(seeds), desc="lift episodes", unit="ep", disable=not progress)
    for seed in bar:
        episodes.append(run_episode(env, controller, int(seed)))
        bar.set_postfix(success=f"{np.mean([e.success for e in episodes]):.2f}")
    env.close()
    return episodes


class LiftExpert:
    """Reach above the cube, descend, close, lift: proportional control on the end effector's position.

    Reactive: the phase is read from the state at every tick (where the hand is relative to the cube,
    how far the fingers have closed), so after a slip or a missed grasp it opens and tries again. Each
    episode draws its own hover height, approach gain and grasp depth, so demonstrations differ in how
    they approach the cube, not only in where it is.
    """

    # Finger joint positions (robot0_gripper_qpos[0]): ~0.039 open, ~0.028 closed on the cube, ~0 on nothing.
    OPEN, HOLD_LOW, HOLD_HIGH = 0.036, 0.012, 0.033
    SETTLE_TICKS = 3  # fingers in the holding range this long before lifting: the grip has stopped closing

    def __init__(self):
        self.reset(0)

    def reset(self, seed: int) -> None:
        rng = np.random.default_rng(seed + 7919)
        self.hover = rng.uniform(0.06, 0.12)
        self.gain = rng.uniform(8.0, 14.0)
        self.grasp_depth = rng.uniform(-0.005, 0.005)
        self.settled = 0

    def act(self, obs: np.ndarray) -> np.ndarray:
        eef, finger, cube = obs[0:3], obs[7], obs[9:12]
        grasp_point = cube + [0.0, 0.0, self.grasp_depth]
        offset = grasp_point - eef
        aligned = np.linalg.norm(offset[:2]) < 0.012
        near = aligned and abs(offset[2]) < 0.015
        gripping = self.HOLD_LOW < finger < self.HOLD_HIGH and np.linalg.norm(offset) < 0.03  # the cube is in hand
        self.settled = self.settled + 1 if gripping else 0
        if self.settled >= self.SETTLE_TICKS:  # holding the cube: lift it straight up
            target, grip = np.array([cube[0], cube[1], eef[2] + 0.1]), 1.0
        elif (near or gripping) and finger > self.HOLD_LOW:  # in place: close (or keep closing)
            target, grip = grasp_point, 1.0
        elif aligned and finger > self.OPEN:  # above the cube, hand open: go down
            target, grip = grasp_point, -1.0
        elif finger <= self.OPEN:  # closed on nothing, or not yet open: open where we are
            target, grip = eef + [0.0, 0.0, 0.01], -1.0
        else:  # open, not above the cube: hover over it
            target, grip = cube + [0.0, 0.0, self.hover], -1.0
        move = np.clip(self.gain * (target - eef), -1.0, 1.0)
        return np.concatenate([move, np.zeros(3), [grip]]).astype(np.float32)


class NoisyExecution:
    """Executes the expert's action plus Gaussian noise, remembering the clean action as the label (DART):
    the demonstrations then show how to come back from small mistakes, which a policy will make."""

    def __init__(self, expert, scale: float):
        self.expert, self.scale = expert, scale
        self.clean: list[list[np.ndarray]] = []  # per episode run, the expert's actions

    def reset(self, seed: int) -> None:
        self.expert.reset(seed)
        self.rng = np.random.default_rng(seed + 104729)
        self.clean.append([])

    def act(self, obs: np.ndarray) -> np.ndarray:
        action = self.expert.act(obs)
        self.clean[-1].append(action)
        noise = self.rng.normal(0.0, self.scale, size=action.shape).astype(np.float32)
        noise[-1] = 0.0  # the gripper command stays the expert's
        return action + noise


def demonstration(episode: Episode) -> tuple[np.ndarray, np.ndarray] | None:
    """The whole episode, which ends at the lift that succeeds; a failed episode is not kept."""
    return (episode.observations, episode.actions) if episode.success else None


def _expert_episodes(seeds: list[int], noise: float = 0.0) -> list[Episode]:
    if not noise:
        return run_episodes(LiftExpert(), seeds, progress=False)
    controller = NoisyExecution(LiftExpert(), noise)
    episodes = run_episodes(controller, seeds, progress=False)
    for episode, clean in zip(episodes, controller.clean):
        episode.actions = np.stack(clean)  # the labels are the expert's clean actions
    return episodes


def run_expert(seeds, workers: int = 2, noise: float = 0.0) -> list[Episode]:
    """The expert over `seeds`; with `noise`, its actions are executed with that much Gaussian noise (the
    recorded actions stay clean), which is how the demonstrations are made."""
    seeds = [int(s) for s in seeds]
    if workers <= 1:
        return _expert_episodes(seeds, noise)
    from rtdiff.runtime.parallel import starmap_processes
    from rtdiff.runtime.stats import shard

    parts = starmap_processes(_expert_episodes, [(part, noise) for part in shard(seeds, workers)])
    return sorted((e for part in parts for e in part), key=lambda e: e.seed)
