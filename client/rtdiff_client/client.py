"""A client of the rtdiff server (docs/protocol.md): blocking calls, pipelined requests, reconnect with back-off.

    client = Client("tcp://127.0.0.1:5555", model="pusht")
    actions = client.act(obs, deadline_ms=200).arrays["actions"]

    ids = [client.submit("act", {"obs": o}) for o in many]      # several in flight
    replies = [client.result(i) for i in ids]

A blocking call that hears nothing within `timeout_ms` drops its socket (and
whatever was queued on it), waits a growing back-off, reconnects and sends
again, `retries` times: `act` is stateless on the server, so resending is safe.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict, deque
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zmq

from rtdiff_client.protocol import DEFAULT_INLINE_BYTES, decode_reply, recv_frames, request, send_frames

_NOBLOCK, _RCVTIMEO = int(zmq.NOBLOCK), int(zmq.RCVTIMEO)  # plain ints: pyzmq's enums cost on every call


class ServerError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


@dataclass
class Reply:
    header: dict
    arrays: dict[str, np.ndarray]

    @property
    def timing(self) -> dict:
        return self.header.get("timing", {})

    @property
    def result(self) -> dict:
        return self.header.get("result", {})


class Client:
    def __init__(self, address: str, model: str | None = None, timeout_ms: float = 2000, retries: int = 3,
                 backoff_ms: tuple[float, float] = (50, 2000), curve_dir: str | Path | None = None,
                 context: zmq.Context | None = None, inline_bytes: int = DEFAULT_INLINE_BYTES):
        self.address, self.model = address, model
        # arrays up to this many bytes (per message) travel inside the header both ways: a frame fewer each way
        # (protocol.py); 0 puts every array in a frame of its own
        self.inline_bytes = inline_bytes
        self.timeout_ms, self.retries, self.backoff_ms = timeout_ms, retries, backoff_ms
        self.curve_dir = Path(curve_dir) if curve_dir else None
        self.context = context or zmq.Context.instance()
        self._ids = itertools.count(1)
        self._replies: dict[object, deque] = defaultdict(deque)  # replies read while waiting for another id
        self.reconnects = 0
        self.socket = self._connect()

    def _connect(self) -> zmq.Socket:
        socket = self.context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        if self.curve_dir:
            from zmq.auth import load_certificate

            server_public, _ = load_certificate(self.curve_dir / "server.key")
            public, secret = load_certificate(self.curve_dir / "client.key_secret")
            socket.curve_serverkey, socket.curve_publickey, socket.curve_secretkey = server_public, public, secret
        socket.connect(self.address)
        self._receive_timeout_ms = -1  # RCVTIMEO as last set: a blocking receive with a timeout, no poll before it
        return socket

    def _receive(self, timeout_ms: float) -> list | None:
        """The next message's frames, or None if none comes within `timeout_ms` (0: only one already here)."""
        flags = 0
        if timeout_ms <= 0:
            flags = _NOBLOCK
        elif (wanted := max(1, math.ceil(timeout_ms))) != self._receive_timeout_ms:
            self.socket.setsockopt(_RCVTIMEO, wanted)
            self._receive_timeout_ms = wanted
        try:
            return recv_frames(self.socket, flags)
        except zmq.Again:
            return None

    def reconnect(self) -> None:
        self.socket.close(linger=0)
        self._replies.clear()
        self.socket = self._connect()
        self.reconnects += 1

    def close(self) -> None:
        self.socket.close(linger=0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- pipelined ---------------------------------------------------------------------------------------

    def submit(self, op: str, arrays: dict | None = None, model: str | None = None, deadline_ms: float | None = None,
               request_id=None, **params):
        """Send one request without waiting; returns its id for `result`."""
        request_id = next(self._ids) if request_id is None else request_id
        frames = request(op, request_id, model or self.model, arrays, deadline_ms, self.inline_bytes, **params)
        send_frames(self.socket, frames, copy=False)
        return request_id

    def result(self, request_id, timeout_ms: float | None = None) -> Reply:
        """The reply to `request_id`; raises ServerError for an error reply, TimeoutError for none in time
        (timeout_ms=0: only if it has already arrived)."""
        timeout = (self.timeout_ms if timeout_ms is None else timeout_ms) / 1e3
        reply = self._buffered(request_id) if self._replies else None
        end = time.monotonic() + timeout
        while reply is None:
            frames = self._receive((end - time.monotonic()) * 1e3)
            if frames is None:
                raise TimeoutError(f"no reply to request {request_id!r} from {self.address} within {timeout * 1e3:.0f} ms")
            header, arrays = decode_reply(frames)
            if header.get("id") == request_id:
                reply = Reply(header, arrays)
            else:  # another request's (pipelined, or a stream's): kept for its own `result`
                self._replies[header.get("id")].append(Reply(header, arrays))
        if not reply.header.get("ok"):
            error = reply.header.get("error", {})
            raise ServerError(error.get("code", "internal"), error.get("message", ""))
        return reply

    def _buffered(self, request_id) -> Reply | None:
        """A reply to `request_id` read earlier while waiting for another, if there is one."""
        replies = self._replies.get(request_id)
        if not replies:
            return None
        reply = replies.popleft()
        if not replies:
            del self._replies[request_id]
        return reply

    # -- blocking ----------------------------------------------------------------------------------------

    def call(self, op: str, arrays: dict | None = None, model: str | None = None, deadline_ms: float | None = None,
             timeout_ms: float | None = None, **params) -> Reply:
        """One request and its reply, resent on a fresh connection after each timeout (with back-off)."""
        for attempt in range(self.retries + 1):
            request_id = self.submit(op, arrays, model, deadline_ms, **params)
            try:
                return self.result(request_id, timeout_ms)
            except TimeoutError:
                if attempt == self.retries:
                    raise
                low, high = self.backoff_ms
                time.sleep(min(high, low * 2**attempt) * random.uniform(0.5, 1.0) / 1e3)
                self.reconnect()
        raise AssertionError("unreachable")

    def act(self, obs: np.ndarray, deadline_ms: float | None = None, seed: int | None = None, **options) -> Reply:
        params = {} if seed is None else {"seed": seed}
        return self.call("act", {"obs": np.asarray(obs, dtype=np.float32)}, deadline_ms=deadline_ms, **options, **params)

    def info(self, **options) -> dict:
        return self.call("info", **options).result

    def stats(self, **options) -> dict:
        return self.call("stats", **options).result

    def stream(self, arrays: dict, credits: int = 4, timeout_ms: float | None = None, **params):
        """Yields each reply of a stream, granting one credit back per reply read."""
        request_id = self.submit("stream", arrays, credits=credits, **params)
        while True:
            reply = self.result(request_id, timeout_ms)
            yield reply
            if reply.header.get("final"):
                return
            self.submit("stream", request_id=request_id, grant=1)

    def duplex(self, arrays: dict, chunks, credits: int = 4, timeout_ms: float | None = None, **params):
        """Yields each output of a duplex stream while sending `chunks` (an iterable of array dicts, e.g. audio
        as it is recorded) as far as the server's input credit allows; after the last chunk, the end marker.
        One output credit is granted back per output read (docs/protocol.md, `duplex`)."""
        request_id = self.submit("duplex", arrays, credits=credits, **params)
        input_credits = self.result(request_id, timeout_ms).result["input_credits"]
        chunks, ended = iter(chunks), False
        while True:
            while input_credits > 0 and not ended:  # send what the window allows before waiting for output
                chunk = next(chunks, None)
                if chunk is None:
                    self.submit("chunk", request_id=request_id, end=True)
                    ended = True
                else:
                    self.submit("chunk", chunk, request_id=request_id)
                    input_credits -= 1
            reply = self.result(request_id, timeout_ms)
            if "input_grant" in reply.result:
                input_credits += reply.result["input_grant"]
                continue
            yield reply
            if reply.header.get("final"):
                return
            self.submit("duplex", request_id=request_id, grant=1)
