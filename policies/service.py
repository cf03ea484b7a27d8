"""A policy as a served model: observation history in, executed actions out, batched across requests.

Stateless per request (the client keeps the episode), so requests from any
clients batch together. Each request's initial noise is drawn on its own (from
its `seed` when it gives one), so an answer does not depend on what it was
batched with. (DDPM's per-step noise comes from the service's generator.)

`act`: arrays {"obs": float32 (n_obs_steps, obs_dim)}, params {"seed": int}
(optional) -> arrays {"actions": float32 (n_action_steps, action_dim)}.
`stream`: the same request; one reply per solver step with the executed-action
estimate so far (the last reply is what `act` returns).
"""

from __future__ import annotations

import numpy as np
import torch

from rtdiff.policies.accelerate import policy_accelerator
from rtdiff.policies.checkpoint import checkpoint_hash, load_policy
from rtdiff.runtime.protocol import Message, ProtocolError


class PolicyService:
    batchable = True

    def __init__(self, checkpoint: str, solver: str = "ddim", steps: int = 10, accel: str = "none", seed: int = 0,
                 backend: str = "torch", batch_sizes: tuple[int, ...] = (1, 4, 16), threads: int = 1,
                 accel_options: dict | None = None):
        from rtdiff.export.backends import with_backend

        self.checkpoint = str(checkpoint)
        # batch_sizes: the static shapes an exported backend is built for; other batches run padded up
        self.policy = with_backend(load_policy(checkpoint), checkpoint, backend, solver, steps, accel, batch_sizes,
                                   threads)
        self.solver = self.policy.make_solver(solver, steps)
        self.accel_options = dict(accel_options or {})
        self.accelerator = policy_accelerator(accel, checkpoint, solver, steps, **self.accel_options)
        self.solver_name, self.steps, self.accel, self.backend = solver, steps, accel, backend
        self.generator = torch.Generator().manual_seed(seed)
        config = self.policy.config
        self.obs_shape = (config.n_obs_steps, config.obs_dim)
        self.action_shape = (config.n_action_steps, config.action_dim)
        self.hash = checkpoint_hash(checkpoint)

    def info(self) -> dict:
        return {
            "kind": "policy",
            "task": self.policy.config.task,
            "checkpoint": self.checkpoint,
            "checkpoint_sha256": self.hash,
            "arch": self.policy.config.arch,
            "ops": ["act", "stream"],
            "inputs": [{"name": "obs", "dtype": "float32", "shape": list(self.obs_shape)}],
            "outputs": [{"name": "actions", "dtype": "float32", "shape": list(self.action_shape)}],
            "params": {"seed": "optional integer in [0, 2^63): fixes the request's initial noise"},
            "solver": self.solver_name,
            "steps": self.steps,
            "accel": self.accel,
            "accel_options": self.accel_options,
            "backend": self.backend,
        }

    def check(self, message: Message) -> None:
        """Raises ProtocolError unless the message is exactly what this policy takes."""
        if set(message.arrays) != {"obs"}:
            raise ProtocolError("bad_array", f"a policy takes one array named 'obs', got {sorted(message.arrays)}")
        obs = message.arrays["obs"]
        if obs.dtype != np.float32 or obs.shape != self.obs_shape:
            raise ProtocolError("bad_array", f"obs must be float32{list(self.obs_shape)}, got "
                                             f"{obs.dtype.name}{list(obs.shape)}")
        if not np.isfinite(obs).all():
            raise ProtocolError("non_finite", "obs holds NaN or infinity")
        unknown = set(message.params) - {"seed"}
        if unknown:
            raise ProtocolError("unsupported", f"unknown params {sorted(unknown)}; a policy takes 'seed'")
        seed = message.params.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
            raise ProtocolError("bad_message", "seed must be an integer in [0, 2^63)")

    def _noise(self, messages: list[Message]) -> torch.Tensor:
        noises = []
        for message in messages:
            seed = message.params.get("seed")
            generator = torch.Generator().manual_seed(seed) if seed is not None else self.generator
            noises.append(self.policy.initial_noise(1, generator))
        return torch.cat(noises)

    def run_batch(self, messages: list[Message]) -> list[dict[str, np.ndarray]]:
        obs = torch.from_numpy(np.stack([m.arrays["obs"] for m in messages]))
        actions = self.policy.predict_actions(obs, self.solver, self.generator, self.accelerator, self._noise(messages))
        return [{"actions": a} for a in actions.numpy()]

    def stream(self, message: Message):
        """Yields (arrays, result, final) per solver step."""
        obs = torch.from_numpy(np.array(message.arrays["obs"]))[None]
        steps = self.policy.refine_actions(obs, self.solver, self._noise([message]), self.accelerator, self.generator)
        for i, actions in steps:
            yield {"actions": actions[0].numpy()}, {"step": i, "steps": self.steps}, i == self.steps - 1

    def stats(self) -> dict:
        return self.accelerator.stats()
