"""A policy as a served model: observation history in, executed actions out, batched across requests.

Stateless per request (the client keeps the episode), so requests from any
clients batch together. Everything that belongs to one trajectory is made per
request: its accelerator (block caches, step counters, SADA's history) from
the service's `AcceleratorSpec`, its initial noise, and the generator DDPM
draws per-step noise from, both seeded from the request's `seed` when it
gives one. So a seeded stream's answer does not depend on what else the
server runs between its steps.

`act`: arrays {"obs": float32 (n_obs_steps, obs_dim)}, params {"seed": int}
(optional) -> arrays {"actions": float32 (n_action_steps, action_dim)}.
`stream`: the same request; one reply per solver step with the executed-action
estimate so far (the last reply is what `act` returns).
"""

from __future__ import annotations

import threading
from collections import deque

import numpy as np
import torch

from rtdiff.policies.accelerate import accelerator_spec
from rtdiff.policies.backend import with_backend
from rtdiff.policies.checkpoint import load_policy
from rtdiff.runtime.checkpoints import checkpoint_hash
from rtdiff.runtime.service import ArraySpec, ParamSpec
from rtdiff_client.protocol import Message
from rtdiff.runtime.run import RunConfig


class PolicyService:
    """The service contract (runtime/service.py) for a policy; the server checks requests against the specs."""

    ops = ("act", "stream")
    params = {"seed": ParamSpec("int", 0, 2**63 - 1, doc="fixes the request's noise")}
    chunk_inputs = ()

    def __init__(self, run: RunConfig):
        policy = load_policy(run.checkpoint)
        self.run = run = run.with_solver(*policy.solver_settings())
        self.checkpoint = run.checkpoint
        self.policy = with_backend(policy, run.checkpoint, run.backend, run.solver, run.steps, run.accel,
                                   run.batch_sizes, run.threads)
        self.solver = self.policy.make_solver(run.solver, run.steps)
        self.new_accelerator = accelerator_spec(run.accel, run.checkpoint, run.solver, run.steps, run.accel_options,
                                                run.accel_schedule)
        self.generator = torch.Generator().manual_seed(run.seed)  # for requests without a seed
        config = self.policy.config
        self.inputs = (ArraySpec("obs", "float32", (config.n_obs_steps, config.obs_dim)),)
        self.outputs = (ArraySpec("actions", "float32", (config.n_action_steps, config.action_dim)),)
        self.hash = checkpoint_hash(run.checkpoint)
        self.recent_stats: deque[dict] = deque(maxlen=1000)  # per finished trajectory, for `stats`
        self._stats_lock = threading.Lock()  # appended on the model's worker, read on the server's loop

    def info(self) -> dict:
        """What `info` says of this model beyond its declared contract (the server adds ops, inputs, outputs)."""
        return {
            "kind": "policy",
            "task": self.policy.config.task,
            "checkpoint": self.checkpoint,
            "checkpoint_sha256": self.hash,
            "arch": self.policy.config.arch,
            "solver": self.run.solver,
            "steps": self.run.steps,
            "accel": self.run.accel,
            "accel_options": self.run.accel_options,
            "backend": self.run.backend,
        }

    def _generator(self, message: Message) -> torch.Generator:
        seed = message.params.get("seed")
        return torch.Generator().manual_seed(seed) if seed is not None else self.generator

    def run_batch(self, messages: list[Message]) -> list[dict[str, np.ndarray]]:
        *_, outputs = self.act_steps(messages)
        return outputs

    def act_steps(self, messages: list[Message]):
        """`run_batch` one solver step at a time: yields None after each step but the last, then the replies'
        arrays. The server steps a batch so that a request from a lighter client can go first (runtime/server.py)."""
        obs = torch.from_numpy(np.stack([m.arrays["obs"] for m in messages]))
        generators = [self._generator(m) for m in messages]
        noise = torch.cat([self.policy.initial_noise(1, g) for g in generators])
        accelerator = self.new_accelerator()  # DDPM's per-step noise: row by row, each request's own generator
        for actions in self.policy.action_steps(obs, self.solver, generators, accelerator, noise):
            if actions is None:
                yield None
        self._record(accelerator)
        yield [{"actions": a} for a in actions.numpy()]

    def stream(self, message: Message):
        """Yields (arrays, result, final) per solver step."""
        obs = torch.from_numpy(np.array(message.arrays["obs"]))[None]
        generator = self._generator(message)
        noise = self.policy.initial_noise(1, generator)
        accelerator = self.new_accelerator()
        steps = self.policy.refine_actions(obs, self.solver, noise, accelerator, generator)
        for i, actions in steps:
            final = i == self.run.steps - 1
            if final:
                self._record(accelerator)
            yield {"actions": actions[0].numpy()}, {"step": i, "steps": self.run.steps}, final

    def _record(self, accelerator) -> None:
        with self._stats_lock:
            self.recent_stats.append(accelerator.stats())

    def stats(self) -> dict:
        """The accelerator's figures averaged over recent trajectories."""
        with self._stats_lock:
            recent = list(self.recent_stats)
        if not recent:
            return {"accel": self.run.accel, "trajectories": 0}
        numbers = {key for stats in recent for key, value in stats.items() if isinstance(value, (int, float))}
        return {"accel": self.run.accel, "trajectories": len(recent),
                **{key: float(np.mean([stats.get(key, 0.0) for stats in recent])) for key in sorted(numbers)}}
