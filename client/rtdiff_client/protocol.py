"""The rtdiff wire format (docs/protocol.md): one msgpack header frame, then one raw little-endian frame per array.

Decoding checks everything the header claims (version, op, id, types, array
descriptors against the allow-list and the limits, frame count, byte counts)
before any array buffer is read, and raises `ProtocolError` with a code from
`ERRORS`. msgpack is unpacked with size limits and without extension types, so
a header can only ever become plain maps, lists, strings and numbers.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import msgpack
import numpy as np

VERSION = 1
OPS = ("info", "act", "stream", "duplex", "chunk", "cancel", "stats")
ARRAYLESS_OPS = ("info", "cancel", "stats")
DTYPES = ("float32", "float16", "int32", "int64", "uint8")
# Built once: looking these up beats numpy's dtype constructors and `dtype.name` on the per-message path.
_WIRE_DTYPES = {name: np.dtype(name).newbyteorder("<") for name in DTYPES}
_WIRE_NAMES = {dtype: name for name, dtype in _WIRE_DTYPES.items()}
ERRORS = {
    "bad_message": "the message is not a valid rtdiff message (header, fields or frame count)",
    "unsupported_version": "the header's protocol version is not one this server speaks",
    "unknown_op": "the op is not one of info, act, stream, duplex, chunk, cancel, stats",
    "unknown_model": "no model of that name is served",
    "bad_array": "an array's dtype, shape or byte count is wrong, or it is not what the model takes",
    "too_large": "the message exceeds a limit (header bytes, arrays, array bytes, dimensions)",
    "non_finite": "a floating-point input holds NaN or infinity",
    "unsupported": "the model does not support this op or parameter",
    "overloaded": "the model's queue is full; retry later",
    "no_credit": "a duplex stream's input chunk arrived without input credit (the stream ends)",
    "deadline_exceeded": "the result could not be produced before the request's deadline",
    "lease_expired": "a stream heard no grant (or a duplex stream no chunk) from its client within the lease",
    "cancelled": "the request was cancelled by its client",
    "unavailable": "the server is shutting down",
    "internal": "the server failed while handling a valid request",
}


class ProtocolError(Exception):
    def __init__(self, code: str, message: str, request_id=None, op: str | None = None):
        assert code in ERRORS, code
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.request_id, self.op = code, message, request_id, op


@dataclass(frozen=True)
class Limits:
    max_header_bytes: int = 64 * 1024
    max_arrays: int = 8
    max_array_bytes: int = 16 * 1024 * 1024
    max_dims: int = 8
    max_id_chars: int = 64
    max_message_bytes: int = 32 * 1024 * 1024  # all of a message's arrays together


@dataclass
class Message:
    op: str
    id: int | str
    model: str | None = None
    deadline_ms: float | None = None  # relative: from when the server reads the request
    params: dict = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    deadline_at: float | None = None  # absolute: Unix time in seconds on the client's clock


def encode(header: dict, arrays: dict[str, np.ndarray] | None = None) -> list:
    """Frames for a header (without `arrays`; descriptors are added here) and named arrays."""
    arrays = arrays or {}
    contiguous = {name: np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")) for name, a in arrays.items()}
    descriptors = [{"name": n, "dtype": _wire_name(n, a.dtype), "shape": list(a.shape)} for n, a in contiguous.items()]
    return [msgpack.packb({"v": VERSION, **header, "arrays": descriptors}, use_bin_type=True),
            *(memoryview(a).cast("B") for a in contiguous.values())]


def request(op: str, request_id, model: str | None = None, arrays: dict | None = None, deadline_ms: float | None = None,
            **params) -> list:
    header = {"op": op, "id": request_id, "params": params}
    if model is not None:
        header["model"] = model
    if deadline_ms is not None:
        # both: deadline_ms for the time on the server, deadline_at so that a request that waited out a server
        # restart in a queue is refused as late instead of computed (the clocks must agree: same host or NTP)
        header["deadline_ms"] = deadline_ms
        header["deadline_at"] = time.time() + deadline_ms / 1e3
    return encode(header, arrays)


def reply(op: str, request_id, arrays: dict | None = None, result: dict | None = None, timing: dict | None = None,
          **extra) -> list:
    header = {"op": op, "id": request_id, "ok": True, "result": result or {}, **extra}
    if timing is not None:
        header["timing"] = timing
    return encode(header, arrays)


def error_reply(code: str, message: str, request_id=None, op: str | None = None) -> list:
    assert code in ERRORS, code
    return encode({"op": op, "id": request_id, "ok": False, "error": {"code": code, "message": message}})


def unpack_header(frame: bytes, limits: Limits) -> dict:
    if len(frame) > limits.max_header_bytes:
        raise ProtocolError("too_large", f"header is {len(frame)} bytes, limit {limits.max_header_bytes}")
    try:
        header = msgpack.unpackb(
            frame, raw=False, strict_map_key=True, use_list=True, ext_hook=_refuse_ext,
            max_str_len=limits.max_header_bytes, max_bin_len=0, max_array_len=1024, max_map_len=256,
        )
    except Exception as error:  # msgpack raises several types; all mean "not a header"
        raise ProtocolError("bad_message", f"header is not valid msgpack ({type(error).__name__})") from None
    if not isinstance(header, dict):
        raise ProtocolError("bad_message", "header must be a msgpack map")
    if not _plain(header):
        raise ProtocolError("bad_message", "header holds a msgpack extension type (a Timestamp?); none are allowed")
    return header


def decode(frames: list, limits: Limits = Limits()) -> Message:
    """A validated request from its frames (header first). Raises ProtocolError naming the problem."""
    if not frames:
        raise ProtocolError("bad_message", "empty message")
    header = unpack_header(bytes(frames[0]), limits)
    request_id = _request_id(header.get("id"), limits)
    op = header.get("op")
    version = header.get("v")
    if type(version) is not int or version != VERSION:  # true and 1.0 equal 1 in Python; they are not versions
        raise ProtocolError("unsupported_version", f"protocol version {version!r}; this server speaks {VERSION}",
                            request_id, op if isinstance(op, str) else None)
    if not isinstance(op, str):
        raise ProtocolError("bad_message", f"op must be a string, got {type(op).__name__}", request_id)
    if op not in OPS:
        raise ProtocolError("unknown_op", f"op {op!r}; expected one of {', '.join(OPS)}", request_id)
    model = header.get("model")
    if model is not None and (not isinstance(model, str) or len(model) > 128):
        raise ProtocolError("bad_message", "model must be a string of at most 128 characters", request_id, op)
    deadline = header.get("deadline_ms")
    if deadline is not None and (isinstance(deadline, bool) or not isinstance(deadline, (int, float))
                                 or not math.isfinite(deadline) or deadline <= 0):
        raise ProtocolError("bad_message", "deadline_ms must be a positive finite number", request_id, op)
    deadline_at = header.get("deadline_at")
    if deadline_at is not None and (isinstance(deadline_at, bool) or not isinstance(deadline_at, (int, float))
                                    or not math.isfinite(deadline_at) or deadline_at <= 0):
        raise ProtocolError("bad_message", "deadline_at must be a positive finite number (Unix seconds)",
                            request_id, op)
    params = header.get("params", {})
    if not isinstance(params, dict):
        raise ProtocolError("bad_message", "params must be a map", request_id, op)
    descriptors = _descriptors(header.get("arrays", []), limits, request_id, op)
    if descriptors and op in ARRAYLESS_OPS:
        raise ProtocolError("bad_message", f"{op} carries no arrays", request_id, op)
    total = sum(math.prod(shape) * _WIRE_DTYPES[dtype].itemsize for _, dtype, shape in descriptors)
    if total > limits.max_message_bytes:
        raise ProtocolError("too_large", f"arrays of {total} bytes in one message, limit {limits.max_message_bytes}",
                            request_id, op)
    if len(frames) - 1 != len(descriptors):
        raise ProtocolError("bad_message", f"header describes {len(descriptors)} arrays but {len(frames) - 1} frames "
                                           "follow it", request_id, op)
    arrays = {}
    for (name, dtype, shape), frame in zip(descriptors, frames[1:]):
        expected = math.prod(shape) * _WIRE_DTYPES[dtype].itemsize
        if len(frame) != expected:
            raise ProtocolError("bad_array", f"array {name!r}: {dtype}{list(shape)} needs {expected} bytes, frame has "
                                             f"{len(frame)}", request_id, op)
        arrays[name] = np.frombuffer(frame, dtype=_WIRE_DTYPES[dtype]).reshape(shape)
    return Message(op=op, id=request_id, model=model, deadline_ms=deadline, params=params, arrays=arrays,
                   deadline_at=deadline_at)


def decode_reply(frames: list, limits: Limits = Limits()) -> tuple[dict, dict[str, np.ndarray]]:
    """A reply's header and arrays (the client's side; the same checks as for requests)."""
    header = unpack_header(bytes(frames[0]), limits)
    descriptors = _descriptors(header.get("arrays", []), limits, header.get("id"), header.get("op"))
    if len(frames) - 1 != len(descriptors):
        raise ProtocolError("bad_message", "reply frame count does not match its header")
    arrays = {}
    for (name, dtype, shape), frame in zip(descriptors, frames[1:]):
        if len(frame) != math.prod(shape) * _WIRE_DTYPES[dtype].itemsize:
            raise ProtocolError("bad_array", f"reply array {name!r} has the wrong byte count")
        arrays[name] = np.frombuffer(frame, dtype=_WIRE_DTYPES[dtype]).reshape(shape)
    return header, arrays


def _wire_name(name: str, dtype: np.dtype) -> str:
    try:
        return _WIRE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"array {name!r}: dtype {dtype} cannot be sent; allowed: {', '.join(DTYPES)}") from None


def _refuse_ext(code, data):
    raise ValueError("msgpack extension types are not allowed")


def _plain(value, depth: int = 0) -> bool:
    """Only maps, lists, strings, numbers, booleans and nil: msgpack's Timestamp extension decodes to an object of
    its own without passing the extension hook, so it is looked for here."""
    if isinstance(value, dict):
        return depth < 32 and all(_plain(k, depth + 1) and _plain(v, depth + 1) for k, v in value.items())
    if isinstance(value, list):
        return depth < 32 and all(_plain(v, depth + 1) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))


def _request_id(value, limits: Limits):
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ProtocolError("bad_message", "id must be an integer or a string")
    if isinstance(value, int) and not 0 <= value < 2**64:
        raise ProtocolError("bad_message", "integer id must be in [0, 2^64)")
    if isinstance(value, str) and len(value) > limits.max_id_chars:
        raise ProtocolError("bad_message", f"string id longer than {limits.max_id_chars} characters")
    return value


def _descriptors(value, limits: Limits, request_id, op) -> list[tuple[str, str, tuple[int, ...]]]:
    if not isinstance(value, list):
        raise ProtocolError("bad_message", "arrays must be a list of descriptors", request_id, op)
    if len(value) > limits.max_arrays:
        raise ProtocolError("too_large", f"{len(value)} arrays, limit {limits.max_arrays}", request_id, op)
    descriptors, names = [], set()
    for item in value:
        if not isinstance(item, dict) or set(item) != {"name", "dtype", "shape"}:
            raise ProtocolError("bad_message", "an array descriptor is a map of exactly name, dtype, shape",
                                request_id, op)
        name, dtype, shape = item["name"], item["dtype"], item["shape"]
        if not isinstance(name, str) or not name or len(name) > 64 or name in names:
            raise ProtocolError("bad_message", f"array name {name!r} is empty, too long or repeated", request_id, op)
        if not isinstance(dtype, str) or not isinstance(shape, list):
            raise ProtocolError("bad_message", f"array {name!r}: dtype must be a string and shape a list",
                                request_id, op)
        if dtype not in DTYPES:
            raise ProtocolError("bad_array", f"array {name!r}: dtype {dtype!r} not allowed; allowed: "
                                             f"{', '.join(DTYPES)}", request_id, op)
        if not isinstance(shape, list) or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape):
            raise ProtocolError("bad_array", f"array {name!r}: shape must be a list of non-negative integers",
                                request_id, op)
        if len(shape) > limits.max_dims:
            raise ProtocolError("too_large", f"array {name!r}: {len(shape)} dimensions, limit {limits.max_dims}",
                                request_id, op)
        size = math.prod(shape) * _WIRE_DTYPES[dtype].itemsize
        if size > limits.max_array_bytes:
            raise ProtocolError("too_large", f"array {name!r}: {size} bytes, limit {limits.max_array_bytes}",
                                request_id, op)
        names.add(name)
        descriptors.append((name, dtype, tuple(shape)))
    return descriptors
