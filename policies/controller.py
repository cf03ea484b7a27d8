"""A diffusion policy as a closed-loop controller: observation history in, one action per tick out.

In-process and synchronous: when the queue of executed actions runs dry the
controller infers the next chunk, timing each inference. (Serving over the
network, with a queue that never runs dry, is the server's and sims' job.)
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np
import torch

from rtdiff.policies.modeling import DiffusionPolicy
from rtdiff.runtime.accel.base import Accelerator
from rtdiff.runtime.solvers import Solver


class PolicyController:
    def __init__(self, policy: DiffusionPolicy, solver: Solver, accelerator: Accelerator | None = None):
        self.policy = policy
        self.solver = solver
        self.accelerator = accelerator
        self.latencies_ms: list[float] = []
        self.reset(0)

    def reset(self, seed: int) -> None:
        self._history: deque[np.ndarray] = deque(maxlen=self.policy.config.n_obs_steps)
        self._queue: deque[np.ndarray] = deque()
        self._generator = torch.Generator().manual_seed(seed)  # same seed, same episode

    def act(self, obs: np.ndarray) -> np.ndarray:
        obs = np.asarray(obs, dtype=np.float32)
        if not self._history:  # before the first step, the past looks like the present (as in training)
            self._history.extend([obs] * self._history.maxlen)
        self._history.append(obs)
        if not self._queue:
            history = torch.from_numpy(np.stack(self._history))[None]
            start = time.perf_counter()
            actions = self.policy.predict_actions(history, self.solver, self._generator, self.accelerator)
            self.latencies_ms.append((time.perf_counter() - start) * 1e3)
            self._queue.extend(actions[0].numpy())
        return self._queue.popleft()
