"""A planning expert for gym-pusht (state observations).

The expert pushes the T with a sequence of primitives. Each primitive picks a
contact point on the T's outline and a push depth by simulating every
candidate push in a private copy of the physics (the block is quasi-static in
PushT: the space damps all velocity away each step, so one push is a short,
cheap rollout) and keeping the push that brings the T's eight corners closest
to the goal's. The cursor (the action: the agent's PD target) then travels
around the block to the pre-contact point and pushes through the contact.

Diversity comes from the seeded choice among near-best candidates: two pushes
whose outcomes differ by less than `tie_px` are equally good, so which side
the expert approaches from varies between episodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import shapely.geometry as sg

GOAL_POSE = np.array([256.0, 256.0, np.pi / 4])
AGENT_RADIUS = 15.0
# The T's outline in the block's body frame, counter-clockwise (gym-pusht's add_tee with scale 30).
T_OUTLINE = np.array(
    [(-60, 0), (60, 0), (60, 30), (15, 30), (15, 120), (-15, 120), (-15, 30), (-60, 30)], dtype=np.float64
)
# gym-pusht's PD gains and physics step; the planner's rollouts must match the env's own control.
K_P, K_V, DT, SUBSTEPS = 100.0, 20.0, 0.01, 10


def rotation(theta: float) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[c, -s], [s, c]])


def to_world(pose: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ rotation(pose[2]).T + pose[:2]


def keypoint_error(pose: np.ndarray) -> float:
    """Mean distance (px) between the T's corners at `pose` and at the goal."""
    return float(np.linalg.norm(to_world(pose, T_OUTLINE) - to_world(GOAL_POSE, T_OUTLINE), axis=1).mean())


def outline_contacts(spacing: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    """Points along the T's outline (body frame) and their outward normals."""
    points, normals = [], []
    for a, b in zip(T_OUTLINE, np.roll(T_OUTLINE, -1, axis=0)):
        edge = b - a
        length = np.linalg.norm(edge)
        normal = np.array([edge[1], -edge[0]]) / length
        count = max(int(length // spacing), 1)
        for t in (np.arange(count) + 0.5) / count:
            points.append(a + t * edge)
            normals.append(normal)
    return np.array(points), np.array(normals)


@dataclass
class Push:
    contact: np.ndarray  # world frame
    normal: np.ndarray  # outward, world frame
    depth: float
    speed: float  # px per tick
    predicted_error: float


class PushSimulator:
    """A private gym-pusht physics space for trying pushes without touching the real episode."""

    def __init__(self):
        import pymunk
        from gym_pusht.envs.pusht import PushTEnv

        # Built from gym-pusht's own shape factories, without the env's contact-counting callback,
        # which would cost more than the physics itself.
        self.space = pymunk.Space()
        self.space.gravity = (0.0, 0.0)
        self.space.damping = 0.0
        corners = [(5, 506), (5, 5), (506, 5), (506, 506)]
        self.space.add(*[PushTEnv.add_segment(self.space, a, b, 2) for a, b in zip(corners, corners[1:] + corners[:1])])
        self.agent = PushTEnv.add_circle(self.space, (256, 400), AGENT_RADIUS)
        self.block, _ = PushTEnv.add_tee(self.space, (256, 300), 0)

    def push(self, pose: np.ndarray, start: np.ndarray, path: list[np.ndarray], settle_ticks: int) -> np.ndarray:
        """Place the agent at `start`, drive its target along `path` (one point a tick), return the T's pose."""
        # Angle first: pymunk rotates about the centre of gravity, so setting it second would move the origin.
        self.block.angle = float(pose[2])
        self.block.position = (float(pose[0]), float(pose[1]))
        self.block.velocity = (0.0, 0.0)
        self.block.angular_velocity = 0.0
        self.agent.position = (float(start[0]), float(start[1]))
        self.agent.velocity = (0.0, 0.0)
        for target in path + [path[-1]] * settle_ticks:
            tx, ty = float(target[0]), float(target[1])
            for _ in range(SUBSTEPS):
                px, py = self.agent.position
                vx, vy = self.agent.velocity
                self.agent.velocity = (vx + (K_P * (tx - px) - K_V * vx) * DT, vy + (K_P * (ty - py) - K_V * vy) * DT)
                self.space.step(DT)
        return np.array([self.block.position[0], self.block.position[1], self.block.angle])


class PushTExpert:
    """Closed-loop expert: `reset(seed)` once per episode, then `act(obs)` every control tick."""

    def __init__(
        self,
        approach_speed: float = 20.0,
        push_speed: float = 12.0,
        depth_factors: tuple[float, ...] = (0.3, 0.6, 1.2, 2.4),
        standoff: float = 4.0,
        tie_px: float = 1.5,
        refine_contacts: int = 6,
        settle_px: float = 2.0,
        max_wait: int = 8,
        settle_ticks: int = 2,
    ):
        self.approach_speed = approach_speed
        self.push_speed = push_speed
        self.depth_factors = depth_factors
        self.standoff = standoff
        self.tie_px = tie_px
        self.refine_contacts = refine_contacts
        self.settle_px = settle_px
        self.max_wait = max_wait
        self.settle_ticks = settle_ticks
        self._sim = PushSimulator()
        self._contacts, self._normals = outline_contacts()
        self.reset(0)

    def reset(self, seed: int) -> None:
        self._rng = np.random.default_rng(seed)
        self._cursor: np.ndarray | None = None
        self._approach: list[np.ndarray] = []
        self._push: list[np.ndarray] = []
        self._waited = 0

    def act(self, obs: np.ndarray) -> np.ndarray:
        agent, pose = np.asarray(obs[:2], dtype=np.float64), np.asarray(obs[2:5], dtype=np.float64)
        if self._cursor is None:
            self._cursor = agent.copy()
        if not self._approach and not self._push:
            self._plan_primitive(agent, pose)
        if self._approach:
            self._cursor = self._approach.pop(0)
        elif self._must_settle(agent):
            self._waited += 1  # hold the pre-contact spot: the simulated push started from rest there
        else:
            self._cursor = self._push.pop(0)
        return self._cursor.astype(np.float32)

    def _must_settle(self, agent: np.ndarray) -> bool:
        at_start = len(self._push) == self._push_ticks
        return at_start and np.linalg.norm(agent - self._cursor) > self.settle_px and self._waited < self.max_wait

    # -- planning ---------------------------------------------------------------------------

    def _plan_primitive(self, agent: np.ndarray, pose: np.ndarray) -> None:
        push = self._choose_push(agent, pose)
        self._waited = 0
        if push is None:  # nothing improves: hold still rather than push blindly
            self._approach = [self._cursor.copy()]
            self._push, self._push_ticks = [], 0
            return
        pre_contact = push.contact + push.normal * (AGENT_RADIUS + self.standoff)
        end = push.contact - push.normal * push.depth
        self._approach = _walk(self._cursor, self._route(self._cursor, pre_contact, pose), self.approach_speed)
        self._push = _walk(pre_contact, [end], push.speed) + [end] * self.settle_ticks
        self._push_ticks = len(self._push)

    def _choose_push(self, agent: np.ndarray, pose: np.ndarray) -> Push | None:
        now = keypoint_error(pose)
        # Near the goal the pushes get short and slow: coverage 0.95 needs the corners within ~2 px.
        depths = np.clip(now * np.asarray(self.depth_factors), 1.0, 45.0)
        speed = float(np.clip(now / 2.0, 2.0, self.push_speed))

        def attempt(contact, normal, depth) -> tuple[float, Push]:
            start = contact + normal * (AGENT_RADIUS + self.standoff)
            path = _walk(start, [contact - normal * depth], speed)
            error = keypoint_error(self._sim.push(pose, start, path, settle_ticks=self.settle_ticks))
            travel_cost = 0.01 * np.linalg.norm(start - agent)
            return error + travel_cost, Push(contact, normal, depth, speed, error)

        # Coarse pass: every reachable contact at the middle depth; fine pass: all depths at the best few.
        reachable = self._reachable_contacts(pose)
        middle = depths[len(depths) // 2]
        coarse = sorted((attempt(c, n, middle)[0], i) for i, (c, n) in enumerate(reachable))
        candidates = [attempt(*reachable[i], d) for _, i in coarse[: self.refine_contacts] for d in depths]
        improving = [(score, push) for score, push in candidates if push.predicted_error < now - 0.25]
        if not improving:
            return None
        best = min(score for score, _ in improving)
        ties = [push for score, push in improving if score <= best + self.tie_px]
        return ties[self._rng.integers(len(ties))]

    def _reachable_contacts(self, pose: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Contacts (world frame, with outward normals) whose pre-contact spot is free and inside the arena."""
        block = sg.Polygon(to_world(pose, T_OUTLINE))
        reachable = []
        for contact, normal in zip(to_world(pose, self._contacts), self._normals @ rotation(pose[2]).T):
            start = contact + normal * (AGENT_RADIUS + self.standoff)
            if block.distance(sg.Point(start)) >= AGENT_RADIUS and _inside_arena(start):
                reachable.append((contact, normal))
        return reachable

    def _route(self, start: np.ndarray, goal: np.ndarray, pose: np.ndarray) -> list[np.ndarray]:
        """Waypoints from start to goal that keep the agent clear of the T: straight if clear, else around."""
        keep_out = sg.Polygon(to_world(pose, T_OUTLINE)).buffer(AGENT_RADIUS + 2.0)
        if not keep_out.intersects(sg.LineString([start, goal])):
            return [goal]
        center = to_world(pose, np.array([[0.0, 45.0]]))[0]
        radius = 80.0 + AGENT_RADIUS + 12.0
        a0 = np.arctan2(*(start - center)[::-1])
        a1 = np.arctan2(*(goal - center)[::-1])
        sweep = (a1 - a0 + np.pi) % (2 * np.pi) - np.pi
        arc = [center + radius * np.array([np.cos(a), np.sin(a)]) for a in a0 + np.linspace(0, sweep, 2 + int(abs(sweep) / 0.5))]
        lead_in = goal + (goal - center) / max(np.linalg.norm(goal - center), 1e-6) * 12.0
        return [np.clip(p, 20.0, 492.0) for p in arc] + [lead_in, goal]


def _walk(start: np.ndarray, waypoints: list[np.ndarray], speed: float) -> list[np.ndarray]:
    """Cursor positions, one per tick, moving at `speed` px/tick through the waypoints."""
    ticks, here = [], np.asarray(start, dtype=np.float64)
    for point in waypoints:
        delta = point - here
        steps = max(int(np.ceil(np.linalg.norm(delta) / speed)), 1)
        ticks.extend(here + delta * (k / steps) for k in range(1, steps + 1))
        here = np.asarray(point, dtype=np.float64)
    return ticks


def _inside_arena(point: np.ndarray) -> bool:
    return bool(np.all(point > 5.0 + AGENT_RADIUS) and np.all(point < 506.0 - AGENT_RADIUS))
