"""Which client's request goes next, and how big a batch may be: the server's scheduling policy per model.

Fewest waiting, then least attained service. The next request comes from the
client with the fewest requests queued: a client that waits for each reply
before asking again (a robot's control loop) has one, a flood has its whole
per-client cap, so a 10 Hz client is in the very next batch however many flood,
and deadlines buy a flooder nothing. Between clients with as many queued, the
one served least goes first; service is a count of its requests computed,
decaying with a half-life of `HALF_LIFE_S`, so clients asking equally much
alternate. (Round-robin, which this replaces, put a client whose queue had run
empty behind every flooder when it came back.)

Batch cap. A request that arrives just as a batch starts waits for that batch
and computes in the next, so both must fit its deadline: the cap is the largest
batch size whose measured compute time (a running mean per size) is at most
half the tightest deadline seen in the last `DEADLINE_MEMORY_S`, trying one
size up while that size is unmeasured (or not computed for `COST_MEMORY_S`)
and the cap's own time fits. A model's time is not linear in
the batch (a PushT UNet: 36 ms for one, 76 ms for two, 103 ms for eight), so it
is measured per size rather than modelled. Without recent deadlines the cap is
`max_batch`.
"""

from __future__ import annotations

import math

HALF_LIFE_S = 1.0
DEADLINE_MEMORY_S = 10.0
MAX_CLIENTS_REMEMBERED = 4096
COST_SMOOTHING = 0.3
COST_MEMORY_S = 2.0  # a size not computed for this long is tried again: load changes, and one slow batch must not
                     # shut a size out for good


class FairBatcher:
    def __init__(self, max_batch: int):
        self.max_batch = max_batch
        self.cap = max_batch
        self._service: dict[bytes, tuple[float, float]] = {}  # client -> (decayed count, when)
        self._cost_ms: dict[int, float] = {}  # batch size -> running mean compute time
        self._cost_at: dict[int, float] = {}  # batch size -> when last computed
        self._tightest_ms: float | None = None
        self._tightest_at = 0.0

    def service(self, client: bytes, now: float) -> float:
        count, when = self._service.get(client, (0.0, now))
        return count * math.exp2(-(now - when) / HALF_LIFE_S)

    def next_client(self, queued: dict, now: float) -> bytes:
        """Of the clients with queued requests (`queued`: client -> its deque of requests), the one whose request
        goes next."""
        if len(queued) == 1:
            return next(iter(queued))
        return min(queued, key=lambda client: (len(queued[client]), self.service(client, now)))

    def charge(self, client: bytes, now: float) -> None:
        self._service[client] = (self.service(client, now) + 1.0, now)
        if len(self._service) > MAX_CLIENTS_REMEMBERED:  # forget the clients served longest ago
            for old in sorted(self._service, key=lambda c: self._service[c][1])[:len(self._service) // 2]:
                del self._service[old]

    def saw_deadline(self, budget_ms: float, now: float) -> None:
        if self._tightest_ms is None or budget_ms <= self._tightest_ms or now - self._tightest_at > DEADLINE_MEMORY_S:
            self._tightest_ms, self._tightest_at = budget_ms, now

    def finished(self, batch: int, compute_ms: float, now: float) -> None:
        known = self._cost_ms.get(batch)
        self._cost_ms[batch] = compute_ms if known is None else known + COST_SMOOTHING * (compute_ms - known)
        self._cost_at[batch] = now
        for size in [size for size, when in self._cost_at.items() if now - when > COST_MEMORY_S]:
            del self._cost_ms[size], self._cost_at[size]
        if self._tightest_ms is None or now - self._tightest_at > DEADLINE_MEMORY_S:
            self._tightest_ms, self.cap = None, self.max_batch
            return
        budget = self._tightest_ms / 2
        fitting = [size for size, cost in self._cost_ms.items() if cost <= budget and size <= self.max_batch]
        cap = max(fitting, default=1)
        if cap < self.max_batch and cap + 1 not in self._cost_ms and self._cost_ms.get(cap, math.inf) <= budget:
            cap += 1  # not measured yet and the cap's own time fits: try one more
        self.cap = cap
