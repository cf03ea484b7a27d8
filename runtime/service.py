"""The service contract: what the server speaks to, whatever the modality.

A service declares its ops and the arrays and params each takes and gives, as
specs. The server validates every request against the declaration before the
service sees it (`check_request`), so a service never re-checks by hand what
it declared. Ops:

- `act`: request/reply; `run_batch(messages)` answers many clients' requests in one call; a service may also
  offer `act_steps(messages)`, the same one denoising step at a time (yielding None after each step but the
  last, then what `run_batch` returns), and the server then steps its batches so that a lighter client's
  request need not wait for a whole batch;
- `stream`: one request, many replies; `stream(message)` yields (arrays, result, final) per reply, and may
  yield None after a step of work that finishes no reply (a denoising step of a music window), so that the
  server hands other requests to the model between its steps. A service may declare `stream_updates` (param
  specs): a grant may then carry new values of those params, and the server hands them to the stream's
  iterator (`update(params)`, on the model's worker) before its next step;
- `duplex`: a stream whose client keeps sending input chunks (validated against `chunk_inputs`) while
  outputs flow back; `open_duplex(message)` returns a session whose `step(inputs, ended)` takes what it
  needs from the queue of received chunks and returns the next output, or None while it waits for input.

A checkpoint's format makes its service from a run configuration (`make_service`).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from rtdiff.runtime.checkpoints import checkpoint_format
from rtdiff.runtime.run import RunConfig
from rtdiff_client.protocol import DTYPES, Message, ProtocolError

OPS = ("act", "stream", "duplex")
Output = tuple[dict[str, np.ndarray], dict, bool]  # arrays, result, final


@dataclass(frozen=True)
class ArraySpec:
    """One named array: dtype, shape (an int is fixed, a string names a variable dimension that must have the same
    size wherever it appears in one message, with at most `max_dims[name]` if given), finiteness."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]
    finite: bool = True
    max_dims: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"array spec {self.name!r}: dtype {self.dtype!r} is not a wire dtype {DTYPES}")
        # looked up once: `dtype.name` costs microseconds on every request
        object.__setattr__(self, "_dtype", np.dtype(self.dtype))
        object.__setattr__(self, "_fixed", all(isinstance(d, int) for d in self.shape))

    def describe(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    def check(self, array: np.ndarray, sizes: dict[str, int]) -> None:
        if array.dtype != self._dtype or array.ndim != len(self.shape) or (self._fixed and array.shape != self.shape):
            raise ProtocolError("bad_array", f"{self.name} must be {self.dtype}{list(self.shape)}, got "
                                             f"{array.dtype.name}{list(array.shape)}")
        if not self._fixed:  # a fixed shape was compared whole above
            self._check_dimensions(array, sizes)
        if self.finite and self._dtype.kind == "f" and not _all_finite(array):
            raise ProtocolError("non_finite", f"{self.name} holds NaN or infinity")

    def _check_dimensions(self, array: np.ndarray, sizes: dict[str, int]) -> None:
        for expected, size in zip(self.shape, array.shape):
            if isinstance(expected, int):
                if size != expected:
                    raise ProtocolError("bad_array", f"{self.name} must be {self.dtype}{list(self.shape)}, got "
                                                     f"{array.dtype.name}{list(array.shape)}")
                continue
            if sizes.setdefault(expected, size) != size:
                raise ProtocolError("bad_array", f"{self.name}: dimension {expected!r} is {size} here and "
                                                 f"{sizes[expected]} in another array")
            limit = self.max_dims.get(expected)
            if size < 1 or (limit is not None and size > limit):
                raise ProtocolError("bad_array", f"{self.name}: dimension {expected!r} must be in [1, {limit}], "
                                                 f"got {size}")


SMALL_ARRAY = 256  # elements; below it the finiteness check runs on a Python list


def _all_finite(array: np.ndarray) -> bool:
    """Whether a float array holds no NaN or infinity. A policy's observation is a handful of numbers, and
    numpy's ufunc machinery costs several times more than the check itself when the core has just woken (measured
    on the serve path, benchmarks/RESULTS.md): small arrays are checked as a list."""
    if array.size <= SMALL_ARRAY:
        return all(map(math.isfinite, array.ravel().tolist()))
    return bool(np.logical_and.reduce(np.isfinite(array), axis=None))  # the ufunc's reduce: no Python wrapper


@dataclass(frozen=True)
class ParamSpec:
    """One request parameter: an integer, number, boolean or string, optional unless `required`, with bounds."""

    kind: str  # "int", "number", "bool", "str"
    low: float | None = None
    high: float | None = None  # inclusive
    required: bool = False
    doc: str = ""

    def check(self, name: str, value) -> None:
        kinds = {"int": (int,), "number": (int, float), "bool": (bool,), "str": (str,)}[self.kind]
        if (isinstance(value, bool) and self.kind != "bool") or not isinstance(value, kinds):
            raise ProtocolError("bad_message", f"param {name} must be of kind {self.kind}, got {type(value).__name__}")
        if self.kind in ("int", "number"):
            if not math.isfinite(value) or (self.low is not None and value < self.low) or (
                    self.high is not None and value > self.high):
                raise ProtocolError("bad_message", f"param {name} must be in [{self.low}, {self.high}], got {value}")
        if self.kind == "str" and self.high is not None and len(value) > self.high:
            raise ProtocolError("bad_message", f"param {name} is longer than {int(self.high)} characters")
        if self.kind == "str" and self.low is not None and len(value) < self.low:
            raise ProtocolError("bad_message", f"param {name} is shorter than {int(self.low)} characters")

    def describe(self) -> dict:
        return {"kind": self.kind, "low": self.low, "high": self.high, "required": self.required, "doc": self.doc}


@runtime_checkable
class Service(Protocol):
    """What a served model is to the server (docs/architecture.md). `inputs`/`params` describe `act`, `stream`
    and a duplex stream's opening request; `chunk_inputs` describe each chunk of a duplex stream."""

    ops: tuple[str, ...]
    inputs: tuple[ArraySpec, ...]
    outputs: tuple[ArraySpec, ...]
    params: dict[str, ParamSpec]
    chunk_inputs: tuple[ArraySpec, ...]

    def info(self) -> dict: ...

    def stats(self) -> dict: ...


class DuplexSession(Protocol):
    def step(self, inputs: deque, ended: bool) -> Output | None: ...


def describe(service) -> dict:
    """The server's `info` for a service: its own description plus the declared contract."""
    return {**service.info(), "ops": list(service.ops),
            "inputs": [spec.describe() for spec in service.inputs],
            "outputs": [spec.describe() for spec in service.outputs],
            "params": {name: spec.describe() for name, spec in service.params.items()},
            **({"chunk_inputs": [spec.describe() for spec in service.chunk_inputs]} if "duplex" in service.ops
               else {}),
            **({"stream_updates": {name: spec.describe() for name, spec in service.stream_updates.items()}}
               if getattr(service, "stream_updates", None) else {})}


def check_arrays(specs: tuple[ArraySpec, ...], arrays: dict[str, np.ndarray]) -> None:
    sizes: dict[str, int] = {}
    for spec in specs:
        array = arrays.get(spec.name)
        if array is None:
            raise _not_the_arrays(specs, arrays)
        spec.check(array, sizes)
    if len(arrays) != len(specs):  # names unique: an array no spec names
        raise _not_the_arrays(specs, arrays)


def _not_the_arrays(specs: tuple[ArraySpec, ...], arrays: dict) -> ProtocolError:
    return ProtocolError("bad_array", f"takes arrays {[spec.name for spec in specs]}, got {sorted(arrays)}")


def check_params(specs: dict[str, ParamSpec], params: dict, ignore: tuple[str, ...] = ()) -> None:
    unknown = [name for name in params if name not in specs and name not in ignore]
    if unknown:
        raise ProtocolError("unsupported", f"unknown params {sorted(unknown)}; this model takes "
                                           f"{sorted(specs) or 'none'}")
    for name, spec in specs.items():
        if name in params:
            spec.check(name, params[name])
        elif spec.required:
            raise ProtocolError("bad_message", f"param {name} is required")


def check_request(service, message: Message, ignore: tuple[str, ...] = ()) -> None:
    """A request (act, stream, or a duplex stream's opening) against the service's declaration."""
    check_arrays(service.inputs, message.arrays)
    check_params(service.params, message.params, ignore)


def make_service(run: RunConfig):
    """The service for `run.checkpoint`, of whatever modality registered its format."""
    fmt, folder = checkpoint_format(run.checkpoint)
    if fmt.service is None:
        raise ValueError(f"checkpoint {folder} ({fmt.name}) cannot be served")
    return fmt.service(folder, run)


def check_service(name: str, service) -> None:
    """Refuse, at start, a service that does not declare the contract."""
    if not isinstance(service, Service):
        raise TypeError(f"model {name!r}: {type(service).__name__} does not implement the service contract "
                        "(ops, inputs, outputs, params, chunk_inputs, info, stats)")
    unknown = set(service.ops) - set(OPS)
    if unknown or not service.ops:
        raise TypeError(f"model {name!r}: ops {sorted(service.ops)}; expected some of {OPS}")
    needs = {"act": "run_batch", "stream": "stream", "duplex": "open_duplex"}
    for op in service.ops:
        if not callable(getattr(service, needs[op], None)):
            raise TypeError(f"model {name!r} declares {op} but has no {needs[op]}()")

