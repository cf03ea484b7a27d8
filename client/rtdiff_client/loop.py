"""A control loop that never waits on inference: an action plan refilled ahead of time from a server.

The simulator ticks at its own rate. At every tick the loop reads any chunk
that has arrived and merges it into the plan, asks for the next chunk when the
plan has no more than `lead` actions left (lead from the measured round trip),
and executes the planned action for this tick. A tick with nothing planned is a
stall: the last action is held (for PushT, the target stays where it is) and
the stall is counted.

A chunk is computed from the observation at the tick it was asked for, so its
first actions may already be in the past when it arrives: those are dropped.
Where it overlaps what is still planned, the two are crossfaded: the weight of
the new chunk rises linearly over the overlap. We crossfade rather than
temporally ensemble (ACT) because an ensemble keeps averaging several chunks
into every action, which lags and can average two different ways of pushing
into one that is neither; a crossfade commits to the newest chunk (made from the
newest observation) and only smooths the hand-over.
"""

from __future__ import annotations

import math
import time
from collections import deque

import numpy as np

from rtdiff_client.client import Client, ServerError


class ChunkPlan:
    """Actions by tick, with the crossfade where a new chunk overlaps the one being executed."""

    def __init__(self):
        self.actions: dict[int, np.ndarray] = {}

    def clear(self) -> None:
        self.actions.clear()

    def remaining(self, tick: int) -> int:
        return sum(1 for t in self.actions if t >= tick)

    def merge(self, start_tick: int, chunk: np.ndarray, now: int) -> None:
        """`chunk[j]` is for tick start_tick + j; ticks before `now` are past and dropped."""
        new = {start_tick + j: a for j, a in enumerate(chunk) if start_tick + j >= now}
        overlap = sorted(t for t in new if t in self.actions)
        for j, tick in enumerate(overlap):
            weight = (j + 1) / (len(overlap) + 1)
            new[tick] = (1 - weight) * self.actions[tick] + weight * new[tick]
        self.actions = {t: a for t, a in self.actions.items() if t >= now and t not in new} | new

    def pop(self, tick: int) -> np.ndarray | None:
        for past in [t for t in self.actions if t < tick]:
            del self.actions[past]
        return self.actions.pop(tick, None)


class RemoteController:
    """A PushT/robosuite controller (reset, act) whose chunks come from an rtdiff server, paced in real time."""

    def __init__(self, client: Client, n_obs_steps: int, rate_hz: float, margin_ticks: int = 1,
                 request_timeout_ms: float = 1000.0, realtime: bool = True, max_lost_in_row: int = 60):
        self.client = client
        self.n_obs_steps = n_obs_steps
        self.dt = 1.0 / rate_hz
        self.margin_ticks = margin_ticks
        self.request_timeout = request_timeout_ms / 1e3
        self.realtime = realtime
        self.max_lost_in_row = max_lost_in_row
        self._lost_in_row = 0
        self.client_ms: list[float] = []
        self.server_ms: dict[str, list[float]] = {"queue_ms": [], "compute_ms": [], "total_ms": []}
        self.stalls = self.errors = self.timeouts = 0
        self.plan = ChunkPlan()
        self.reset(0)

    def reset(self, seed: int) -> None:
        self.seed = seed
        self.tick = 0
        self.history: deque[np.ndarray] = deque(maxlen=self.n_obs_steps)
        self.plan.clear()
        self.in_flight: tuple | None = None  # (request id, tick asked, time sent)
        self.last_action: np.ndarray | None = None
        self.start_time: float | None = None

    @property
    def lead(self) -> int:
        """Ticks of plan to keep: the slow end of the measured round trip, in ticks, plus a margin."""
        recent = self.client_ms[-50:]
        p90_ms = float(np.percentile(recent, 90)) if recent else 1e3 * self.dt
        return math.ceil(p90_ms / 1e3 / self.dt) + self.margin_ticks

    def act(self, obs: np.ndarray) -> np.ndarray:
        obs = np.asarray(obs, dtype=np.float32)
        if not self.history:
            self.history.extend([obs] * self.n_obs_steps)
        self.history.append(obs)
        if self.start_time is None:  # warm-up: the episode starts once its first chunk is in hand
            self._request()
            while self.in_flight is not None:
                self._receive(self.request_timeout, resend=True)
            self.start_time = time.monotonic()
        else:
            self._pace()
            self._receive(0.0)
        if self.in_flight is None and self.plan.remaining(self.tick) <= self.lead:
            self._request()
        action = self.plan.pop(self.tick)
        if action is None:
            self.stalls += 1
            action = self.last_action
        self.last_action = action
        self.tick += 1
        return action

    def _pace(self) -> None:
        """Wait for this tick's time; a reply that comes meanwhile is taken when it arrives, so the measured
        round trip is the real one, not rounded up to the tick."""
        while self.realtime:
            delay = self.start_time + self.tick * self.dt - time.monotonic()
            if delay <= 0:
                return
            if self.in_flight is None:
                time.sleep(delay)
                return
            self._receive(delay)

    def _request(self) -> None:
        deadline_ms = max(self.plan.remaining(self.tick), 1) * self.dt * 1e3 + 1e3 * self.dt * 4
        seed = (self.seed * 100_003 + self.tick) % 2**63
        sent = time.monotonic()  # before the send: the send may hand the core to the I/O thread for a while
        request_id = self.client.submit("act", {"obs": np.stack(self.history)}, deadline_ms=deadline_ms, seed=seed)
        self.in_flight = (request_id, self.tick, sent)

    def _receive(self, timeout_s: float, resend: bool = False) -> None:
        """Take the in-flight reply if it comes within `timeout_s`; `resend`: ask again at once after a loss."""
        request_id, asked_tick, sent = self.in_flight or (None, None, None)
        if request_id is None:
            return
        try:
            reply = self.client.result(request_id, timeout_ms=timeout_s * 1e3)
        except TimeoutError:
            if time.monotonic() - sent > self.request_timeout:  # lost (server restarted?): reconnect and ask again
                self.timeouts += 1
                self._lost_in_row += 1
                if self._lost_in_row > self.max_lost_in_row:
                    raise TimeoutError(f"no reply from {self.client.address} to {self._lost_in_row} requests in a row")
                self.client.reconnect()
                self.in_flight = None
                if resend:
                    self._request()
            return
        except ServerError:
            self.errors += 1
            self.in_flight = None
            if resend:
                self._request()
            return
        self.in_flight = None
        self._lost_in_row = 0
        self.client_ms.append((time.monotonic() - sent) * 1e3)
        for key, values in self.server_ms.items():
            if key in reply.timing:
                values.append(reply.timing[key])
        self.plan.merge(asked_tick, reply.arrays["actions"], self.tick)
