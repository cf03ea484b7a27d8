"""The `null` model: answers zeros of the declared shapes with no compute, for protocol benchmarks and client
tests (as Triton's identity models serve perf_analyzer). Everything else is real: the server validates its
requests against its specs and batches, queues and streams them like any model's.

    rtdiff serve --model bench=null                        # PushT's shapes: obs float32 (2, 5) -> actions (8, 2)
    rtdiff serve --model bench=null:obs=2x5:actions=16x2   # other shapes
    rtdiff serve --model slow=null:steps=1000:step_ms=300  # a stream of 1000 steps taking 300 ms each (sleeping),
                                                           # to stand for a long audio window beside a policy
"""

from __future__ import annotations

import time

import numpy as np

from rtdiff.runtime.service import ArraySpec, ParamSpec

PUSHT_SHAPES = {"obs": (2, 5), "actions": (8, 2)}


class NullService:
    ops = ("act", "stream")
    params = {"seed": ParamSpec("int", 0, 2**63 - 1, doc="accepted and ignored")}
    chunk_inputs = ()

    def __init__(self, obs: tuple[int, ...] = PUSHT_SHAPES["obs"], actions: tuple[int, ...] = PUSHT_SHAPES["actions"],
                 steps: int = 1, step_ms: float = 0.0):
        self.steps, self.step_ms = steps, step_ms
        self.inputs = (ArraySpec("obs", "float32", tuple(obs)),)
        self.outputs = (ArraySpec("actions", "float32", tuple(actions)),)
        self._zeros = np.zeros(actions, np.float32)
        self.answered = 0

    @classmethod
    def from_spec(cls, spec: str) -> NullService:
        """`null`, or `null:obs=2x5:actions=16x2`."""
        kind, *options = spec.split(":")
        if kind != "null":
            raise ValueError(f"not a null model spec: {spec!r}")
        shapes, timing = dict(PUSHT_SHAPES), {"steps": 1, "step_ms": 0.0}
        for option in options:
            name, sep, text = option.partition("=")
            if sep and name in timing:
                try:
                    timing[name] = type(timing[name])(text)
                except ValueError:
                    raise ValueError(f"null model option {option!r}: {name} takes a number") from None
                if timing[name] < (1 if name == "steps" else 0):
                    raise ValueError(f"null model option {option!r}: out of range")
                continue
            if not sep or name not in shapes:
                raise ValueError(f"null model option {option!r}: expected obs=AxB, actions=AxB, steps=N or step_ms=T")
            try:
                shapes[name] = tuple(int(d) for d in text.split("x"))
            except ValueError:
                raise ValueError(f"null model option {option!r}: dimensions are integers joined by x") from None
            if not shapes[name] or any(d < 1 for d in shapes[name]):
                raise ValueError(f"null model option {option!r}: dimensions must be positive")
        return cls(shapes["obs"], shapes["actions"], timing["steps"], timing["step_ms"])

    def info(self) -> dict:
        return {"kind": "null", "checkpoint": None, "solver": None, "steps": self.steps, "step_ms": self.step_ms,
                "accel": "none", "backend": "none"}

    def stats(self) -> dict:
        return {"answered": self.answered}

    def run_batch(self, messages) -> list[dict[str, np.ndarray]]:
        self.answered += len(messages)
        return [{"actions": self._zeros} for _ in messages]

    def stream(self, message):
        self.answered += 1
        for step in range(self.steps):
            time.sleep(self.step_ms / 1e3)  # stands for a step's compute; no CPU is used
            yield {"actions": self._zeros}, {"step": step, "steps": self.steps}, step == self.steps - 1
