"""The rtdiff wire format (docs/protocol.md): one msgpack header frame, then one raw little-endian frame per array
that is not inline.

An array travels in a frame of its own after the header or, when small,
inline: its descriptor's `data` holds its bytes, and the message has one
frame fewer. Each frame costs a Python call on every end it passes (measured:
10-40 us a round trip per frame, benchmarks/RESULTS.md, Serving), which is
most of what separates a policy's round trip from a single-message
transport's; pyzmq copies frames under 64 KiB anyway, so inlining small
arrays costs no zero-copy. A request's `inline_bytes` says how much of its
replies' arrays may come back inline (0, the default: every array in a frame).

A request header is decoded straight into a typed structure (`RequestHeader`,
msgspec, in C): every key's type, the version, the op, the array descriptors'
dtypes and dimensions are checked in that one call, unknown keys, binary
values outside a descriptor's `data` and extension types (the Timestamp too) are refused. What a type cannot
say (unique array names, byte counts against the limits and the frames) is
checked after it, before any array buffer is read. Every refusal is a
`ProtocolError` with a code from `ERRORS`: that of the header's first fault
in the documented order of checks (`CHECK_ORDER`, `_refusal`), whatever the
order of its keys.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Annotated, Literal, Union

import msgspec
import numpy as np
import zmq
from msgspec import Meta

VERSION = 1
OPS = ("info", "act", "stream", "duplex", "chunk", "cancel", "stats")
ARRAYLESS_OPS = ("info", "cancel", "stats")
DTYPES = ("float32", "float16", "int32", "int64", "uint8")
# The most a request may ask to get back inline (`inline_bytes`): with the rest of a reply header, well under the
# header limit a reader applies (Limits.max_header_bytes).
MAX_INLINE_BYTES = 32 * 1024
# What `Client` inlines each way unless told otherwise: a policy's observations and action chunks, not an audio
# chunk or a video frame (those keep a frame of their own, zero-copy above pyzmq's 64 KiB copy threshold).
DEFAULT_INLINE_BYTES = 16 * 1024
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
    "overloaded": "a queue or stream limit is reached (the message says which); retry after replies arrive",
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

    @functools.cached_property
    def request_decoder(self) -> msgspec.msgpack.Decoder:
        """The request header's typed decoder under these limits, built once per Limits (an attribute read on
        the per-message path, where an lru_cache would hash the dataclass every call)."""
        return msgspec.msgpack.Decoder(_header_types(self))


@dataclass
class Message:
    op: str
    id: int | str
    model: str | None = None
    deadline_ms: float | None = None  # relative: from when the server reads the request
    params: dict = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    deadline_at: float | None = None  # absolute: Unix time in seconds on the client's clock
    inline_bytes: int = 0  # how many bytes of a reply's arrays may travel inside its header


# -- the header as types ------------------------------------------------------------------------------------

Scalar = Union[None, bool, int, float, str]
# a deadline: positive and finite (the bound refuses infinity in the typed decode, where the documented order of
# checks is kept; NaN fails `gt`)
Deadline = Union[Annotated[float, Meta(gt=0, le=sys.float_info.max)], None]
# The order docs/protocol.md gives a request header's checks: a header with several faults is refused for the first
# in this order. msgspec stops at the first bad key in the map's own order, which is the client's choice, so a
# refused header is decoded again with its keys in this order (`_refusal`).
CHECK_ORDER = ("v", "id", "op", "model", "deadline_ms", "deadline_at", "inline_bytes", "params", "arrays")


def _header_types(limits: Limits):
    """The request header's structure under `limits` (msgspec checks the bounds while decoding). Built with
    defstruct: the bounds are values, which string annotations could not see."""
    descriptor = msgspec.defstruct("ArrayDescriptor", [
        ("name", Annotated[str, Meta(min_length=1, max_length=64)]),
        ("dtype", Literal[DTYPES]),
        ("shape", Annotated[list[Annotated[int, Meta(ge=0)]], Meta(max_length=limits.max_dims)]),
        ("data", Union[bytes, None], None),  # inline: the array's bytes; without it, the array is in a frame
    ], forbid_unknown_fields=True)
    return msgspec.defstruct("RequestHeader", [
        ("v", Literal[VERSION]),
        ("op", Literal[OPS]),
        ("id", Union[Annotated[int, Meta(ge=0)], Annotated[str, Meta(max_length=limits.max_id_chars)]]),
        ("model", Union[Annotated[str, Meta(max_length=128)], None], None),
        ("deadline_ms", Deadline, None),
        ("deadline_at", Deadline, None),
        ("inline_bytes", Annotated[int, Meta(ge=0, le=MAX_INLINE_BYTES)], 0),
        ("params", Annotated[dict[Annotated[str, Meta(max_length=64)], Scalar], Meta(max_length=256)], {}),
        ("arrays", Annotated[list[descriptor], Meta(max_length=limits.max_arrays)], []),
    ], forbid_unknown_fields=True)


_any_decoder = msgspec.msgpack.Decoder()
_encoder = msgspec.msgpack.Encoder()


def encode(header: dict, arrays: dict[str, np.ndarray] | None = None, inline_bytes: int = 0) -> list:
    """Frames for a header (without `arrays`; descriptors are added here) and named arrays. Arrays go inline, in
    their descriptors' `data`, while their bytes together stay within `inline_bytes`; the rest in frames."""
    descriptors, frames = [], [b""]
    for name, array in (arrays or {}).items():
        data, wire = array.data, _WIRE_NAMES.get(array.dtype)
        if wire is None or not data.c_contiguous:  # a little-endian C-order copy (or the dtype's error)
            array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
            data, wire = array.data, _wire_name(name, array.dtype)
        descriptor = {"name": name, "dtype": wire, "shape": array.shape}
        if array.nbytes <= inline_bytes:
            descriptor["data"] = data
            inline_bytes -= array.nbytes
        else:
            frames.append(data.cast("B") if array.ndim else memoryview(array.tobytes()))
        descriptors.append(descriptor)
    frames[0] = _encoder.encode({"v": VERSION, **header, "arrays": descriptors})
    return frames


def request(op: str, request_id, model: str | None = None, arrays: dict | None = None, deadline_ms: float | None = None,
            inline_bytes: int = 0, **params) -> list:
    """A request's frames. `inline_bytes`: how many bytes of arrays travel inside the header, this request's and
    (asked of the server) its replies'; 0 sends every array in a frame of its own."""
    header = {"op": op, "id": request_id, "params": params}
    if model is not None:
        header["model"] = model
    if deadline_ms is not None:
        # both: deadline_ms for the time on the server, deadline_at so that a request that waited out a server
        # restart in a queue is refused as late instead of computed (the clocks must agree: same host or NTP)
        header["deadline_ms"] = deadline_ms
        header["deadline_at"] = time.time() + deadline_ms / 1e3
    inline_bytes = min(inline_bytes, MAX_INLINE_BYTES)  # inline arrays make the header: keep it under its limit
    if inline_bytes:
        header["inline_bytes"] = inline_bytes
    return encode(header, arrays, inline_bytes)


def reply(op: str, request_id, arrays: dict | None = None, result: dict | None = None, timing: dict | None = None,
          inline_bytes: int = 0, **extra) -> list:
    header = {"op": op, "id": request_id, "ok": True, "result": result or {}, **extra}
    if timing is not None:
        header["timing"] = timing
    return encode(header, arrays, inline_bytes)


def error_reply(code: str, message: str, request_id=None, op: str | None = None) -> list:
    assert code in ERRORS, code
    return encode({"op": op, "id": request_id, "ok": False, "error": {"code": code, "message": message}})


def decode(frames: list, limits: Limits = Limits()) -> Message:
    """A validated request from its frames (header first; bytes, or anything with the buffer protocol, as
    pyzmq's zero-copy frames are). Raises ProtocolError naming the problem."""
    if not frames:
        raise ProtocolError("bad_message", "empty message")
    frame = frames[0]
    raw = _buffer_of(frame)
    if len(raw) > limits.max_header_bytes:
        raise ProtocolError("too_large", f"header is {len(raw)} bytes, limit {limits.max_header_bytes}")
    try:
        header = limits.request_decoder.decode(raw)
    except msgspec.ValidationError as error:
        raise _refusal(str(error), raw, limits) from None
    except msgspec.DecodeError as error:
        raise ProtocolError("bad_message", f"header is not valid msgpack ({error})") from None
    request_id, op = header.id, header.op
    if header.arrays and op in ARRAYLESS_OPS:
        raise _arrays_on_arrayless(request_id, op)
    framed = sum(descriptor.data is None for descriptor in header.arrays)
    if len(frames) - 1 != framed:
        raise ProtocolError("bad_message", f"header describes {framed} arrays in frames but {len(frames) - 1} "
                                           "frames follow it", request_id, op)
    arrays, total, following = {}, 0, iter(frames[1:])
    for descriptor in header.arrays:
        name, dtype = descriptor.name, _WIRE_DTYPES[descriptor.dtype]
        size = math.prod(descriptor.shape) * dtype.itemsize
        if name in arrays:
            raise ProtocolError("bad_message", f"array name {name!r} is repeated", request_id, op)
        if size > limits.max_array_bytes:
            raise ProtocolError("too_large", f"array {name!r}: {size} bytes, limit {limits.max_array_bytes}",
                                request_id, op)
        total += size
        if total > limits.max_message_bytes:
            raise ProtocolError("too_large", f"arrays of more than {limits.max_message_bytes} bytes in one message",
                                request_id, op)
        if descriptor.data is not None:
            buffer, where = descriptor.data, "inline data"
        else:
            buffer, where = _buffer_of(next(following)), "frame"
        if len(buffer) != size:
            raise ProtocolError("bad_array", f"array {name!r}: {descriptor.dtype}{descriptor.shape} needs {size} bytes, "
                                             f"{where} has {len(buffer)}", request_id, op)
        arrays[name] = np.ndarray(descriptor.shape, dtype, buffer)  # a view: no copy
    return Message(op, request_id, header.model, header.deadline_ms, header.params, arrays, header.deadline_at,
                   header.inline_bytes)


def _buffer_of(frame):
    """A frame's bytes: a zmq.Frame's buffer (no copy), or the bytes-like it already is."""
    return frame.buffer if hasattr(frame, "buffer") else frame


def _refusal(text: str, raw, limits: Limits) -> ProtocolError:
    """The documented code for a header the typed decode refused (`text`: where it stopped), judged by the first
    fault in `CHECK_ORDER`, whatever order the header's keys came in: a version other than 1 is
    `unsupported_version` (another version's header need not parse as this one's), a missing `id` or `op` and
    arrays on an op that takes none `bad_message`; then an op of the right type but unknown `unknown_op`, too many
    arrays or dimensions `too_large`, a dtype not allowed or a bad dimension `bad_array`, anything else (wrong
    types, unknown keys, extensions, binary) `bad_message`."""
    try:  # the typed decode may stop at a wrong type before it reads to the end
        fields = _any_decoder.decode(raw)
    except msgspec.DecodeError as error:
        return ProtocolError("bad_message", f"header is not valid msgpack ({error})")
    if not isinstance(fields, dict):
        return ProtocolError("bad_message", f"header refused: {text}")
    request_id, op = _readable_id_and_op(fields, limits)
    version = fields.get("v")
    if type(version) is not int or version != VERSION:
        return ProtocolError("unsupported_version", f"header version {version!r}; this server speaks {VERSION}",
                             request_id, op)
    for key in ("id", "op"):
        if key not in fields:
            return ProtocolError("bad_message", f"header has no {key!r}", request_id, op)
    ordered = {key: fields[key] for key in CHECK_ORDER if key in fields}
    ordered.update((key, value) for key, value in fields.items() if key not in ordered)  # keys v1 lacks: last
    try:
        limits.request_decoder.decode(_encoder.encode(ordered))
    except msgspec.ValidationError as error:  # (should the reordered header pass, the first text stands)
        text = str(error)
    where = text.rpartition(" - at `")[2].rstrip("`") if " - at `" in text else "$"
    if where.startswith("$.arrays") and op in ARRAYLESS_OPS and fields.get("arrays"):
        return _arrays_on_arrayless(request_id, op)
    if where == "$.op" and text.startswith("Invalid enum value"):
        code = "unknown_op"
    elif where.startswith("$.arrays") and where.endswith(("arrays", "shape")) and "of length <=" in text:
        code = "too_large"
    elif where.startswith("$.arrays[") and (".shape[" in where or (where.endswith(".dtype") and
                                                                    text.startswith("Invalid enum value"))):
        code = "bad_array"
    else:
        code = "bad_message"
    return ProtocolError(code, f"header refused: {text}", request_id, op)


def _arrays_on_arrayless(request_id, op: str) -> ProtocolError:
    return ProtocolError("bad_message", f"{op} carries no arrays", request_id, op)


def _readable_id_and_op(fields: dict, limits: Limits) -> tuple:
    """The id and op of a refused header, where they are readable, so that the error reaches its request."""
    request_id, op = fields.get("id"), fields.get("op")
    try:
        request_id = _request_id(request_id, limits)
    except ProtocolError:
        request_id = None
    return request_id, op if isinstance(op, str) and op in OPS else None


def decode_reply(frames: list, limits: Limits = Limits()) -> tuple[dict, dict[str, np.ndarray]]:
    """A reply's header (a map) and arrays, the client's side: the descriptors and frames are checked as for
    requests; the rest of the header is the server's and read as it is."""
    frame = frames[0]
    raw = _buffer_of(frame)
    if len(raw) > limits.max_header_bytes:
        raise ProtocolError("too_large", f"reply header is {len(raw)} bytes, limit {limits.max_header_bytes}")
    try:
        header = _any_decoder.decode(raw)
    except msgspec.DecodeError as error:
        raise ProtocolError("bad_message", f"reply header is not valid msgpack ({error})") from None
    if not isinstance(header, dict):
        raise ProtocolError("bad_message", "reply header must be a msgpack map")
    arrays, framed = {}, 0
    for descriptor in header.get("arrays", ()):
        try:
            name, dtype, shape = descriptor["name"], _WIRE_DTYPES[descriptor["dtype"]], tuple(descriptor["shape"])
            size, data = math.prod(shape) * dtype.itemsize, descriptor.get("data")
        except (KeyError, TypeError, AttributeError) as error:
            raise ProtocolError("bad_message", f"reply array descriptor {descriptor!r} is malformed") from error
        if data is None:  # the next frame
            framed += 1
            if framed >= len(frames):
                raise ProtocolError("bad_message", "reply frame count does not match its header")
            data = _buffer_of(frames[framed])
        elif not isinstance(data, bytes):
            raise ProtocolError("bad_message", f"reply array {name!r}: inline data must be binary")
        if len(data) != size:
            raise ProtocolError("bad_array", f"reply array {name!r} has the wrong byte count")
        arrays[name] = np.ndarray(shape, dtype, data)
    if framed != len(frames) - 1:
        raise ProtocolError("bad_message", "reply frame count does not match its header")
    return header, arrays


# -- frames on a socket ----------------------------------------------------------------------------------

# pyzmq's send_multipart/recv_multipart combine its flag enums on every frame, and its getsockopt turns each
# option into an enum: microseconds a message on the hot path. These use plain ints, the Cython send (the sugar
# layer above it only adds draft-API arguments) and the more-flag a received frame already carries.
_SNDMORE = int(zmq.SNDMORE)
_send = zmq.backend.Socket.send


def send_frames(socket: zmq.Socket, frames: list, flags: int = 0, copy: bool = True) -> None:
    """`socket.send_multipart(frames, flags, copy=copy)`, without the enum arithmetic. For a plain zmq.Socket: an
    asyncio or gevent socket's own `send` is bypassed."""
    for frame in frames[:-1]:
        _send(socket, frame, flags | _SNDMORE, copy)
    _send(socket, frames[-1], flags, copy)


def recv_frames(socket: zmq.Socket, flags: int = 0) -> list:
    """`socket.recv_multipart(flags, copy=False)`: zmq.Frames (their `.buffer` is the data, no copy)."""
    frame = socket.recv(flags, False)
    frames = [frame]
    while frame.more:
        frame = socket.recv(flags, False)
        frames.append(frame)
    return frames


def _wire_name(name: str, dtype: np.dtype) -> str:
    try:
        return _WIRE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"array {name!r}: dtype {dtype} cannot be sent; allowed: {', '.join(DTYPES)}") from None


def _request_id(value, limits: Limits):
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ProtocolError("bad_message", "id must be an integer or a string")
    if isinstance(value, int) and not 0 <= value < 2**64:
        raise ProtocolError("bad_message", "integer id must be in [0, 2^64)")
    if isinstance(value, str) and len(value) > limits.max_id_chars:
        raise ProtocolError("bad_message", f"string id longer than {limits.max_id_chars} characters")
    return value
