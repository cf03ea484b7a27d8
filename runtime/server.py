"""The rtdiff server: one ROUTER socket, any number of named models, dynamic batching, deadlines, streams.

One thread owns the socket. With `model_threads` (the default wherever more
than one model is served), it never runs a model: each served model computes
on a worker thread of its own, and while one computes the loop reads a flood
at a bounded share of the time; without (the default for a lone model, for
latency: runtime/workers.py), the same jobs run inline on the loop. Each turn of the loop reads
every waiting message (validating it completely before a model sees it),
takes back what the workers finished and sends it, drops queued work whose
deadline has passed and streams whose lease ran out, and gives each idle
worker its next job: a batch of `act` requests, or one step of a stream (the
two alternate when both wait). A batch is due when it is full (its cap:
`max_batch`, less under tight deadlines), when its oldest request has waited
`max_wait_ms`, or when waiting longer would finish it after the earliest
deadline in it (judged by the model's recent compute time).

Fairness: each client has its own queue per model, and a batch takes each
request from the client with the fewest queued, then the one served least of
late (runtime/fairness.py), so a client flooding one model fills only its own
queue (`max_queue_per_client`) and is refused beyond it while a light client's
request goes into the next batch. When requests carry deadlines, batches are
kept short enough that one arriving while a batch computes can still make its
deadline. A service that offers `act_steps` (a policy) computes a batch one
denoising step per job, and a request from a client much lighter than any in
that batch (at most half as many queued) starts its own batch at the next
step, the interrupted one resuming after it: a control loop beside a flood
waits one step, not a batch. A client may hold at most
`max_streams_per_client` open streams.

Every failure is a reply with an error code (runtime/protocol.py); a reply that
cannot be delivered (client gone, its queue full) is counted, never waited on:
the socket is ROUTER_MANDATORY and every send is non-blocking.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import queue
import signal
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zmq

from rtdiff.runtime.fairness import FairBatcher
from rtdiff.runtime.service import check_arrays, check_params, check_request, check_service, describe
from rtdiff.runtime.stats import percentiles
from rtdiff.runtime.workers import Done, ModelWorker
from rtdiff_client.protocol import (ERRORS, OPS, Limits, Message, ProtocolError, _request_id, decode, error_reply,
                                    recv_frames, reply, send_frames)

log = logging.getLogger("rtdiff.server")

DEFAULT_CREDITS, MAX_CREDITS = 4, 64
# messages read per turn of the loop. Few: the loop turns between two steps of a batch, where each read delays the
# step, and under a flood every message read costs CPU the models compute on. ZeroMQ fair-queues its peers, so a
# light client's request is still among the first few read.
READS_PER_TURN = 8
# With models on worker threads, a loop that reads a flood as fast as it comes holds the GIL most of the time, and a
# model's thread waits for it between every two torch ops (measured: a 10 Hz client beside four flooders got 52-57
# of 100 answers in time, inline 90-97). So while a model computes and messages keep coming, the loop reads at
# most this share of the time, pausing after each turn of reads; the workers' results still wake it at once.
BUSY_READ_SHARE = 0.03
BUSY_READ_PAUSE_MAX_S = 0.02
# plain ints: pyzmq's flag enums cost microseconds per operation on the per-message path
_NOBLOCK, _EVENTS, _POLLIN = int(zmq.NOBLOCK), int(zmq.EVENTS), int(zmq.POLLIN)
IDLE_WAKE_S = 0.1  # the loop wakes this often with nothing to do: to notice a stop, run out leases, read keys
CLIENTS_CHECK_S = 1.0  # how often the allowed-clients folder is looked at for changes
DUPLEX_INPUT_CREDITS = 8  # chunks a duplex client may send ahead of what the session has taken


@dataclass
class ServerConfig:
    bind: str = "tcp://127.0.0.1:5555"
    max_batch: int = 16  # 1 turns batching off
    # 0: run whatever is queued as soon as the model is free. Requests that arrive while it computes form
    # the next batch, so batches grow with load and a lone request never waits for company.
    max_wait_ms: float = 0.0
    max_queue: int = 256  # per model; beyond it requests are refused with `overloaded`
    max_queue_per_client: int = 32  # per model and client
    max_streams: int = 64
    max_streams_per_client: int = 8
    # a stream that has no credit left (or a duplex stream waiting for input) and hears nothing from its client
    # for this long ends with `lease_expired`; its state is freed
    stream_lease_s: float = 10.0
    # ZeroMQ heartbeats (0: off). Off by default: libzmq 4.3 aborts the whole process ("Assertion failed:
    # !_io_error", libzmq issues 3937 and 4767) when a heartbeat times out a peer whose queue is full, which a
    # flood produces within seconds here. Vanished clients are found by leases and undeliverable replies instead.
    heartbeat_ivl_ms: int = 0
    heartbeat_timeout_ms: int = 0
    # each model computes on a thread of its own (the loop stays free) or inline on the loop (runtime/workers.py);
    # None: on threads when more than one model is served, so that none can hold up another
    model_threads: bool | None = None
    limits: Limits = field(default_factory=Limits)
    curve_dir: str | None = None  # keys from `rtdiff keys`; None: no encryption
    send_hwm: int = 1000


@dataclass
class Pending:
    envelope: list  # routing frames to reply with
    message: Message
    arrival: float
    deadline: float | None  # absolute, time.monotonic()


@dataclass
class SteppedBatch:
    """A batch computing one denoising step per job (the service's `act_steps`), so the loop can put a lighter
    client's batch before the rest of it."""

    batch: list[Pending]
    steps: object  # the service's iterator: None after each step but the last, then the replies' arrays
    lightest: int  # the fewest requests any of its clients had queued when it was taken
    started: float | None = None
    compute_s: float = 0.0  # its own steps' time, without the batches that went before it meanwhile
    # on a worker thread the job runs step after step until the loop sets this (a lighter client or a stream waits
    # for the model) or every deadline in it has passed: a hand-over between threads per step costs milliseconds
    # when the cores are contended
    yield_requested: bool = False

    @property
    def preempted_at(self) -> int:
        """A client with at most this many requests queued starts its own batch before this one's next step."""
        return self.lightest // 2

    def expired(self, now: float) -> bool:
        """Every request in it has passed its deadline: computing on is for no one."""
        return all(p.deadline is not None and p.deadline <= now for p in self.batch)

    def run_steps(self):
        """On the model's worker: steps until the replies' arrays (returned) or until the loop asks for the
        model, or no request in it can still make its deadline (None)."""
        while True:
            output = next(self.steps)
            if output is not None or self.yield_requested or self.expired(time.monotonic()):
                return output


@dataclass
class Stream:
    envelope: list
    message: Message
    steps: object  # the service's iterator; for a duplex stream, its session
    credits: int  # replies the server may still send
    arrival: float
    deadline: float | None
    seq: int = 0
    duplex: bool = False
    arrivals: deque = field(default_factory=deque)  # duplex: chunks received (the loop's)
    inputs: deque = field(default_factory=deque)  # duplex: chunks handed to the session (the worker's, in a step)
    input_credits: int = 0  # duplex: chunks the client may still send
    ended: bool = False  # duplex: the client sent its last chunk
    waiting: bool = False  # duplex: the session asked for more input than has arrived
    in_flight: bool = False  # a step is on the model's worker
    closed: bool = False  # ended by the loop (cancel, deadline, lease) while a step may still be in flight
    last_heard: float = 0.0  # the last grant, chunk or reply: what the lease counts from
    last_step: float = 0.0
    queued_inputs: int = 0  # duplex: chunks handed to the step in flight
    updates: dict = field(default_factory=dict)  # params changed by grants, handed to the next step

    @property
    def key(self) -> tuple:
        return (self.envelope[0], self.message.id)

    def ready(self) -> bool:
        return self.credits > 0 and not self.waiting and not self.in_flight

    def next_output(self, service, updates: dict | None = None):
        """The next (arrays, result, final), or None while a duplex session waits for input or a step finished
        no reply (on the worker). `updates`: params a grant changed, handed to the stream first."""
        if updates:
            self.steps.update(updates)
        if not self.duplex:
            return next(self.steps)
        return self.steps.step(self.inputs, self.ended)


class Stats:
    """Counts and latency windows (the last `window` requests), all bounded."""

    COUNTS = ("received", "replies_ok", "batches", "replies_unroutable", "replies_dropped_full", "stale_grants",
              "streams_done", "streams_client_gone", "leases_expired", "batches_preempted")

    def __init__(self, window: int = 10_000):
        self.counts: dict[str, int] = defaultdict(int, {key: 0 for key in self.COUNTS})  # zeros are reported too
        self.errors: dict[str, int] = defaultdict(int)
        self.latency = {key: deque(maxlen=window) for key in ("queue_ms", "compute_ms", "total_ms")}
        self.batch_sizes: deque[int] = deque(maxlen=window)

    def record(self, queue_ms: float, compute_ms: float, total_ms: float) -> None:
        for key, value in (("queue_ms", queue_ms), ("compute_ms", compute_ms), ("total_ms", total_ms)):
            self.latency[key].append(value)

    def report(self) -> dict:
        return {
            "counts": dict(self.counts),
            "errors": dict(self.errors),
            **{key: percentiles(values) for key, values in self.latency.items()},
            "mean_batch": float(np.mean(self.batch_sizes)) if self.batch_sizes else None,
        }


class Server:
    def __init__(self, services: dict, config: ServerConfig | None = None, context: zmq.Context | None = None):
        if not services:
            raise ValueError("a server needs at least one model")
        for name, service in services.items():
            check_service(name, service)
        self.services = services
        self.config = config or ServerConfig()
        self.context = context or zmq.Context.instance()
        self.stats = Stats()
        # per model, per client (its routing identity), the client's queued `act` requests in arrival order
        self.queues: dict[str, dict[bytes, deque[Pending]]] = {name: {} for name in services}
        self.queued: dict[str, int] = {name: 0 for name in services}
        self.compute_ms: dict[str, float] = {name: 0.0 for name in services}  # recent batch time, for deadlines
        self.fair = {name: FairBatcher(self.config.max_batch) for name in services}
        self.streams: dict[tuple, Stream] = {}
        # per model, the stepped batches begun and not finished: the last is computing, each under it was put
        # aside for it at a step boundary
        self.running: dict[str, list[SteppedBatch]] = {name: [] for name in services}
        self._ops = {op: getattr(self, f"_op_{op}") for op in OPS}
        self._more_waiting = False  # another message is waiting on the socket (set per message read)
        self._prefer_stream: dict[str, bool] = {name: False for name in services}
        self.stop_event = threading.Event()
        self._authenticator = None
        self._clients_dir: Path | None = None
        self._clients_seen: tuple = ()
        self._next_clients_check = 0.0
        self._reload_requested = False
        self.socket = self._open_socket()
        self.address = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = self.context.socket(zmq.PULL)
        self._wake.setsockopt(zmq.LINGER, 0)
        self._wake.bind(f"inproc://rtdiff-done-{id(self)}")
        self.threaded = self.config.model_threads if self.config.model_threads is not None else len(services) > 1
        self.workers = {name: ModelWorker(name, service, self.context, f"inproc://rtdiff-done-{id(self)}", self._done,
                                          threaded=self.threaded)
                        for name, service in services.items()}

    # -- socket ------------------------------------------------------------------------------------------

    def _open_socket(self) -> zmq.Socket:
        socket = self.context.socket(zmq.ROUTER)
        socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an undeliverable reply raises instead of vanishing
        socket.setsockopt(zmq.SNDHWM, self.config.send_hwm)
        socket.setsockopt(zmq.LINGER, 0)
        if self.config.heartbeat_ivl_ms:
            socket.setsockopt(zmq.HEARTBEAT_IVL, self.config.heartbeat_ivl_ms)
            socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, self.config.heartbeat_timeout_ms)
        # ZeroMQ drops a bigger message and closes its connection; below it, decode answers `too_large`
        socket.setsockopt(zmq.MAXMSGSIZE, self.config.limits.max_header_bytes + self.config.limits.max_message_bytes)
        if self.config.curve_dir:
            self._enable_curve(socket, Path(self.config.curve_dir))
        socket.bind(self.config.bind)
        return socket

    def _enable_curve(self, socket: zmq.Socket, keys: Path) -> None:
        from zmq.auth import load_certificate
        from zmq.auth.thread import ThreadAuthenticator

        public, secret = load_certificate(keys / "server.key_secret")
        if secret is None:
            raise ValueError(f"{keys / 'server.key_secret'} holds no secret key")
        clients = keys / "clients"
        if clients.is_dir():  # only the clients whose public certificates are listed there
            self._authenticator = ThreadAuthenticator(self.context)
            self._authenticator.start()
            self._clients_dir = clients
            self.reload_clients()
        socket.curve_secretkey, socket.curve_publickey, socket.curve_server = secret, public, True

    def _clients_stamp(self) -> tuple:
        try:
            return tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in self._clients_dir.iterdir()))
        except OSError:
            return ()

    def reload_clients(self) -> None:
        """Read the allowed-clients folder again: keys added there are admitted, keys removed are refused from
        the next handshake on (connections already made stay). Called when the folder changes and on SIGHUP."""
        self._clients_seen = self._clients_stamp()
        self._authenticator.configure_curve(domain="*", location=str(self._clients_dir))
        self._reload_requested = False

    def _watch_clients(self, now: float) -> None:
        if self._authenticator is None or (now < self._next_clients_check and not self._reload_requested):
            return
        self._next_clients_check = now + CLIENTS_CHECK_S
        if self._reload_requested or self._clients_stamp() != self._clients_seen:
            log.info("reloading the allowed clients from %s", self._clients_dir)
            self.reload_clients()

    def close(self) -> None:
        for worker in self.workers.values():
            worker.stop()
        self._wake.close(linger=0)
        self.socket.close(linger=0)
        if self._authenticator is not None:
            self._authenticator.stop()

    def _send(self, envelope: list, frames: list) -> bool:
        try:
            send_frames(self.socket, [*envelope, *frames], _NOBLOCK, copy=False)
            return True
        except zmq.Again:  # the client's queue is full: it is not reading
            self.stats.counts["replies_dropped_full"] += 1
        except zmq.ZMQError as error:  # EHOSTUNREACH: the client is gone
            self.stats.counts["replies_unroutable"] += 1
            log.debug("reply not delivered: %s", error)
        return False

    def _send_error(self, envelope: list, code: str, message: str, request_id=None, op=None) -> None:
        self.stats.errors[code] += 1
        self._send(envelope, error_reply(code, message, request_id, op))

    # -- loop --------------------------------------------------------------------------------------------

    def serve_forever(self, handle_signals: bool = False) -> None:
        if handle_signals:
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, lambda *_: self.stop_event.set())
            signal.signal(signal.SIGHUP, lambda *_: setattr(self, "_reload_requested", True))
        # finished jobs of threaded workers come back through the wake socket; inline ones are sent as they finish
        threaded = self.threaded  # a local: read several times every turn
        items = [(self.socket, _POLLIN), *([(self._wake, _POLLIN)] if threaded else [])]
        pause_s = 0.0  # how long the socket is left unread while a model computes (see BUSY_READ_SHARE)
        try:
            while not self.stop_event.is_set():
                timeout_ms = self._poll_timeout_ms()
                if pause_s:  # only the workers' results wake the loop until the pause is over
                    events = zmq.zmq_poll(items[1:], min(timeout_ms, math.ceil(pause_s * 1e3)))
                else:
                    events = zmq.zmq_poll(items, timeout_ms)  # the backend call: no Poller objects
                read_s, pause_s = 0.0, 0.0
                for socket, _ in events:
                    if socket is self.socket:
                        started = time.monotonic() if threaded else 0.0  # inline, no pause: nothing to time
                        self._read_all()
                        read_s = time.monotonic() - started if threaded else 0.0
                    else:
                        self._take_done()
                if threaded:
                    self._ask_yields()
                    if self._more_waiting and any(worker.busy for worker in self.workers.values()):
                        pause_s = min(BUSY_READ_PAUSE_MAX_S, read_s * (1 / BUSY_READ_SHARE - 1))
                now = time.monotonic()
                self._watch_clients(now)
                if self._has_work():  # else nothing can expire or be dispatched
                    self._expire(now)
                    for name, worker in self.workers.items():
                        if not worker.busy:
                            self._dispatch(name, now)
        finally:
            self._refuse_remaining()
            self.close()

    def stop(self) -> None:
        self.stop_event.set()

    def _has_work(self) -> bool:
        return bool(self.streams) or any(self.queued.values()) or any(self.running.values())

    def _poll_timeout_ms(self) -> int:
        if not self._has_work():
            return math.ceil(IDLE_WAKE_S * 1e3)
        if any(s.ready() and not self.workers[s.message.model].busy for s in self.streams.values()):
            return 0
        if any(batches and not self.workers[name].busy for name, batches in self.running.items()):
            return 0  # a stepped batch's next step
        now = time.monotonic()
        wake = now + IDLE_WAKE_S
        for name in self.queues:
            if self.queued[name]:
                deadlines = [p.deadline for p in self._pending(name) if p.deadline is not None]
                # a busy model's next batch waits for its worker, whose result wakes the poll: no spinning meanwhile
                due = self._due_time(name) if not self.workers[name].busy else wake
                wake = min(wake, due, *deadlines)
        return max(0, math.ceil((wake - now) * 1e3))

    def _pending(self, name: str):
        for client_queue in self.queues[name].values():
            yield from client_queue

    def _read_all(self) -> None:
        # EVENTS says whether a message is waiting; cheaper than a non-blocking read that ends in zmq.Again.
        # At most READS_PER_TURN: under a flood the loop must still send replies and give workers their jobs
        # (ZeroMQ fair-queues the peers, so every client's next message is among the next few reads).
        for _ in range(READS_PER_TURN):
            try:
                frames = recv_frames(self.socket, _NOBLOCK)
            except zmq.Again:
                break
            # asked once per message: whether the loop reads on, and whether `_idle` may compute a request now
            self._more_waiting = bool(self.socket.getsockopt(_EVENTS) & _POLLIN)
            self.stats.counts["received"] += 1
            try:
                self._handle(frames)
            except Exception as error:  # a bug must not take the server down; the client hears of it
                log.exception("handling a message failed")
                self._send_error([frames[0].bytes], "internal", f"{type(error).__name__}: {error}")
            if not self._more_waiting:
                break

    def _handle(self, frames: list) -> None:
        # ROUTER gives [identity, body...]; REQ clients put an empty delimiter before the body.
        identity = frames[0].bytes  # a dict key: the client's queues and streams are keyed by it
        envelope, body = ([identity, b""], frames[2:]) if len(frames) > 1 and not len(frames[1]) else ([identity], frames[1:])
        arrival = time.monotonic()
        try:
            message = decode(body, self.config.limits)
        except ProtocolError as error:
            self._send_error(envelope, error.code, error.message, error.request_id, error.op)
            return
        try:
            deadline = _deadline(message, arrival)
            self._ops[message.op](envelope, message, arrival, deadline)
        except ProtocolError as error:
            self._send_error(envelope, error.code, error.message, message.id, message.op)

    def _service(self, message: Message):
        if message.model not in self.services:
            raise ProtocolError("unknown_model", f"model {message.model!r}; served: {sorted(self.services)}")
        return self.services[message.model]

    # -- ops ---------------------------------------------------------------------------------------------

    def _op_info(self, envelope, message, arrival, deadline) -> None:
        limits = self.config.limits
        result = {
            "server": "rtdiff",
            "models": {name: describe(service) for name, service in self.services.items()},
            "limits": {"max_header_bytes": limits.max_header_bytes, "max_arrays": limits.max_arrays,
                       "max_array_bytes": limits.max_array_bytes, "max_dims": limits.max_dims},
            "batching": {"max_batch": self.config.max_batch, "max_wait_ms": self.config.max_wait_ms},
            "errors": ERRORS,
        }
        if message.model is not None:
            result["models"] = {message.model: describe(self._service(message))}
        self._send(envelope, reply("info", message.id, result=result))

    def _op_stats(self, envelope, message, arrival, deadline) -> None:
        report = self.stats.report()
        report["models"] = {name: {"queued": self.queued[name], "busy": self.workers[name].busy,
                                   "batches_computing": len(self.running[name]),
                                   "batch_cap": self.fair[name].cap, **service.stats()}
                            for name, service in self.services.items()}
        report["streams"] = len(self.streams)
        self._send(envelope, reply("stats", message.id, result=report))

    def _in_flight(self, client: bytes, request_id) -> bool:
        """Whether this client has a request or stream with this id queued or open (ids are unique in flight)."""
        if (client, request_id) in self.streams:
            return True
        for clients in self.queues.values():  # loops, not any(generator): this runs for every request
            for pending in clients.get(client, ()):
                if pending.message.id == request_id:
                    return True
        for batches in self.running.values():
            for job in batches:
                for pending in job.batch:
                    if pending.envelope[0] == client and pending.message.id == request_id:
                        return True
        return False

    def _op_act(self, envelope, message, arrival, deadline) -> None:
        if self._in_flight(envelope[0], message.id):
            raise ProtocolError("bad_message", f"id {message.id!r} is already in flight for this client")
        service = self._service(message)
        if "act" not in service.ops:
            raise ProtocolError("unsupported", f"model {message.model!r} does not answer act")
        check_request(service, message)
        name, client = message.model, envelope[0]
        mine = self.queues[name].get(client)
        if mine is not None and len(mine) >= self.config.max_queue_per_client:
            raise ProtocolError("overloaded", f"this client has {len(mine)} requests queued for model {name!r}, the "
                                              f"most one client may (max_queue_per_client); wait for replies first")
        if self.queued[name] >= self.config.max_queue:
            raise ProtocolError("overloaded", f"model {name!r} has {self.queued[name]} requests queued; retry "
                                              "after replies arrive")
        pending = Pending(envelope, message, arrival, deadline)
        if deadline is not None:
            self.fair[name].saw_deadline((deadline - arrival) * 1e3, arrival)
        if self._idle(name):  # nothing to wait for and nothing to batch with: computed now, never queued
            self._run_batch(name, [pending], lightest=1)
            self.fair[name].charge(client, arrival)  # after the reply went out: bookkeeping is not on its clock
            return
        self.queues[name].setdefault(client, deque()).append(pending)
        self.queued[name] += 1

    def _idle(self, name: str) -> bool:
        """Whether a new request for `name` would be the whole of its next batch: the model is free, nothing is
        queued for it, no stream of it is waiting for a step, batches do not wait (max_wait_ms 0), and no other
        message is waiting on the socket (a burst of requests is still read whole and batched)."""
        return (not self.queued[name] and self.config.max_wait_ms <= 0 and not self.workers[name].busy
                and not self._more_waiting and not self.running[name]
                and not (self.streams and any(s.message.model == name and s.ready() for s in self.streams.values())))

    def _op_stream(self, envelope, message, arrival, deadline) -> None:
        key = (envelope[0], message.id)
        if "grant" in message.params:  # more credit for an open stream
            self._grant(key, message)
            return
        service, request, credits = self._open(key, message)
        self.streams[key] = Stream(envelope, request, iter(service.stream(request)), credits, arrival, deadline,
                                   last_heard=arrival)

    def _op_duplex(self, envelope, message, arrival, deadline) -> None:
        key = (envelope[0], message.id)
        if "grant" in message.params:
            self._grant(key, message)
            return
        service, request, credits = self._open(key, message)
        session = service.open_duplex(request)
        self.streams[key] = Stream(envelope, request, session, credits, arrival, deadline, duplex=True,
                                   input_credits=DUPLEX_INPUT_CREDITS, last_heard=arrival)
        # the client learns its input window from this first reply (no arrays, no seq)
        self._send(envelope, reply("duplex", message.id, result={"opened": True, "input_credits": DUPLEX_INPUT_CREDITS}))

    def _op_chunk(self, envelope, message, arrival, deadline) -> None:
        """One input chunk of an open duplex stream, `id` the stream's; `params.end: true` marks the last. An
        accepted chunk gets no reply of its own; a bad one ends the stream with the error."""
        stream = self.streams.get((envelope[0], message.id))
        if stream is None or not stream.duplex:
            raise ProtocolError("bad_message", f"no open duplex stream {message.id!r} for this chunk")
        try:
            end = message.params.get("end", False)
            if not isinstance(end, bool) or set(message.params) - {"end"}:
                raise ProtocolError("bad_message", "a chunk's params are only end (a boolean)")
            if stream.ended:
                raise ProtocolError("bad_message", "a chunk after the stream's last (end: true) chunk")
            if message.arrays or not end:
                if stream.input_credits <= 0:
                    raise ProtocolError("no_credit", "chunk sent without input credit")
                check_arrays(self.services[stream.message.model].chunk_inputs, message.arrays)
                stream.input_credits -= 1
                stream.arrivals.append(message.arrays)
            stream.ended = end
            stream.waiting = False
            stream.last_heard = arrival
        except ProtocolError as error:
            self._close_stream(stream)
            raise ProtocolError(error.code, f"{error.message}; the duplex stream is closed") from None

    def _grant(self, key, message: Message) -> None:
        """More credit for an open stream; with it, new values of the params the service lets a stream change
        while it runs (`stream_updates`: a music stream's prompt), taken at its next step. A grant gets no
        reply; a malformed one ends the stream with its error."""
        grant, stream = message.params["grant"], self.streams.get(key)
        updates = {name: value for name, value in message.params.items() if name != "grant"}
        changeable = getattr(self.services[stream.message.model], "stream_updates", {}) if stream is not None else {}
        try:
            if message.arrays or not _credit_count(grant) or any(name not in changeable for name in updates):
                also = f" and any of {sorted(changeable)}" if changeable else ""
                raise ProtocolError("bad_message", f"a grant carries only params.grant, an integer in "
                                                   f"[1, {MAX_CREDITS}]{also}")
            check_params(changeable, updates)
        except ProtocolError as error:
            if stream is not None:
                self._close_stream(stream)
            raise ProtocolError(error.code, f"{error.message}{'; the stream is closed' if stream is not None else ''}"
                                ) from None
        if stream is not None:
            stream.credits = min(stream.credits + grant, MAX_CREDITS)
            stream.updates.update(updates)
            stream.last_heard = time.monotonic()
        else:  # the stream ended (or was cancelled) while the grant was on its way: documented drop
            self.stats.counts["stale_grants"] += 1

    def _open(self, key, message: Message):
        """The service and the validated request (params without `credits`) for a new stream or duplex stream."""
        credits = message.params.get("credits", DEFAULT_CREDITS)
        if not _credit_count(credits):
            raise ProtocolError("bad_message", f"credits must be an integer in [1, {MAX_CREDITS}]")
        if self._in_flight(*key):
            raise ProtocolError("bad_message", f"id {message.id!r} is already in flight for this client")
        service = self._service(message)
        if message.op not in service.ops:
            raise ProtocolError("unsupported", f"model {message.model!r} does not answer {message.op}")
        mine = sum(1 for client, _ in self.streams if client == key[0])
        if mine >= self.config.max_streams_per_client:
            raise ProtocolError("overloaded", f"this client has {mine} streams open, the most one client may "
                                              "(max_streams_per_client); end or cancel one first")
        if len(self.streams) >= self.config.max_streams:
            raise ProtocolError("overloaded", f"{len(self.streams)} streams open on the server; retry later")
        request = dataclasses.replace(message, params={k: v for k, v in message.params.items() if k != "credits"})
        check_request(service, request)
        return service, request, credits

    def _op_cancel(self, envelope, message, arrival, deadline) -> None:
        target = message.params.get("target")
        try:
            _request_id(target, self.config.limits)
        except ProtocolError:
            raise ProtocolError("bad_message", "cancel needs params.target, a request id (an integer in [0, 2^64) "
                                               "or a string of at most 64 characters)") from None
        cancelled = False
        for name, clients in self.queues.items():
            mine = clients.get(envelope[0], ())
            for pending in [p for p in mine if p.message.id == target]:
                mine.remove(pending)
                self.queued[name] -= 1
                cancelled = True
        stream = self.streams.get((envelope[0], target))
        if stream is not None:
            self._close_stream(stream)
            cancelled = True
        if cancelled:
            self._send_error(envelope, "cancelled", f"request {target!r} cancelled", target)
        self._send(envelope, reply("cancel", message.id, result={"cancelled": cancelled}))

    # -- work --------------------------------------------------------------------------------------------

    def _due_time(self, name: str) -> float:
        pending = list(self._pending(name))
        due = min(p.arrival for p in pending) + self.config.max_wait_ms / 1e3
        deadlines = [p.deadline for p in pending if p.deadline is not None]
        if deadlines:  # start early enough that the batch finishes before its earliest deadline
            due = min(due, min(deadlines) - self.compute_ms[name] / 1e3)
        return due

    def _batch_due(self, name: str, now: float) -> bool:
        return bool(self.queued[name]) and (self.queued[name] >= self.fair[name].cap or now >= self._due_time(name))

    def _expire(self, now: float) -> None:
        for name, clients in self.queues.items():
            for client, mine in list(clients.items()):
                for pending in [p for p in mine if p.deadline is not None and p.deadline <= now]:
                    mine.remove(pending)
                    self.queued[name] -= 1
                    self._send_error(pending.envelope, "deadline_exceeded", "deadline passed while queued",
                                     pending.message.id, "act")
                if not mine:
                    del clients[client]
        lease = self.config.stream_lease_s
        for stream in list(self.streams.values()):
            if stream.deadline is not None and stream.deadline <= now:
                self._close_stream(stream)
                self._send_error(stream.envelope, "deadline_exceeded", "stream deadline passed", stream.message.id,
                                 stream.message.op)
            elif not stream.in_flight and (stream.credits <= 0 or stream.waiting) and now - stream.last_heard > lease:
                self._close_stream(stream)
                self.stats.counts["leases_expired"] += 1
                self._send_error(stream.envelope, "lease_expired", f"no grant or chunk for {lease:g} s",
                                 stream.message.id, stream.message.op)

    def _close_stream(self, stream: Stream) -> None:
        stream.closed = True
        self.streams.pop(stream.key, None)

    # -- work: the loop hands jobs to the models' workers and sends what comes back ----------------------------

    def _dispatch(self, name: str, now: float) -> None:
        """Give an idle model its next job: a due batch or a stream step, alternating when both wait. A stepped
        batch counts as one job: it goes on step by step until it is done, except that a lighter client's
        requests, arriving meanwhile, go first."""
        if self.running[name]:
            self._continue_batches(name, now)
            return
        batch_due = self._batch_due(name, now)
        streams = [s for s in self.streams.values() if s.message.model == name and s.ready()]
        if streams and (not batch_due or self._prefer_stream[name]):
            stream = min(streams, key=lambda s: s.last_step)  # the one served longest ago
            self._prefer_stream[name] = False
            self._step(stream, now)
        elif batch_due:
            self._prefer_stream[name] = True
            self._run_batch(name)

    def _continue_batches(self, name: str, now: float) -> None:
        """The next step of the model's stepped batches: a new batch of the clients much lighter than the current
        one's (at most half as many queued as any of its clients had), put before it; or the current one's next
        step, unless every request in it has passed its deadline (then it is dropped, uncomputed further)."""
        running = self.running[name]
        current = running[-1]
        if self.queued[name]:
            lighter, lightest = self._take_batch(name, at_most=current.preempted_at)
            if lighter:
                self.stats.counts["batches_preempted"] += 1
                self._run_batch(name, lighter, lightest)
                return
        if current.expired(now):
            running.pop()
            for pending in current.batch:
                self._send_error(pending.envelope, "deadline_exceeded", "deadline passed while computing",
                                 pending.message.id, "act")
            if running:
                self._continue_batches(name, now)
            return
        self._step_batch(name, current)

    def _take_batch(self, name: str, at_most: int | None = None) -> tuple[list[Pending], int]:
        """Up to the model's batch cap of requests, each from the client whose turn it is (runtime/fairness.py:
        fewest queued, then least served of late): a light client's request goes into the next batch ahead of a
        flood, and clients that ask equally much alternate. With `at_most`, only from clients with at most that
        many requests queued (half: flooders whose queues differ by a request do not interrupt each other). Also
        returns how many the first (the lightest) had queued."""
        clients, fair, now = self.queues[name], self.fair[name], time.monotonic()
        batch, lightest = [], 0
        while clients and len(batch) < fair.cap:
            client = fair.next_client(clients, now)
            mine = clients[client]
            if at_most is not None and len(mine) > at_most:
                break  # the client picked has the fewest queued: no one left is lighter
            if not batch:
                lightest = len(mine)
            batch.append(mine.popleft())
            fair.charge(client, now)
            if not mine:
                del clients[client]
        self.queued[name] -= len(batch)
        return batch, lightest

    def _run_batch(self, name: str, batch: list[Pending] | None = None, lightest: int = 1) -> None:
        if batch is None:
            batch, lightest = self._take_batch(name)
        service = self.services[name]
        messages = [p.message for p in batch]
        if hasattr(service, "act_steps"):
            job = SteppedBatch(batch, service.act_steps(messages), lightest)
            self.running[name].append(job)
            self._step_batch(name, job)
            return
        done = self.workers[name].submit(batch, lambda service: service.run_batch(messages))
        if done is not None:  # computed inline
            self._finish_batch(done)

    def _step_batch(self, name: str, job: SteppedBatch) -> None:
        worker = self.workers[name]
        job.yield_requested = False
        done = worker.submit(job, (lambda service: job.run_steps()) if worker.threaded else
                             (lambda service: next(job.steps)))  # inline, the loop turns between steps
        if done is not None:
            self._finish_batch_step(done)

    def _step(self, stream: Stream, now: float) -> None:
        stream.in_flight, stream.last_step = True, now
        stream.inputs.extend(stream.arrivals)  # the worker's own queue for this step; the loop keeps receiving
        stream.arrivals.clear()
        stream.queued_inputs = len(stream.inputs)
        updates, stream.updates = stream.updates, {}
        done = self.workers[stream.message.model].submit(stream, lambda service: stream.next_output(service, updates))
        if done is not None:
            self._finish_step(done)

    def _ask_yields(self) -> None:
        """Ask a worker running a stepped batch for its model back at the next step when `_dispatch` may have
        something else to give it: a request from a client lighter than the batch's, or a stream step."""
        for name, running in self.running.items():
            if not running or not self.workers[name].busy or running[-1].yield_requested:
                continue
            current = running[-1]
            lighter = self.queued[name] and min(map(len, self.queues[name].values())) <= current.preempted_at
            if lighter or any(s.message.model == name and s.ready() for s in self.streams.values()):
                current.yield_requested = True

    def _take_done(self) -> None:
        while True:
            try:
                self._wake.recv(_NOBLOCK)
            except zmq.Again:
                break
        while not self._done.empty():
            done = self._done.get()
            self.workers[done.model].busy = False
            if isinstance(done.job, Stream):
                self._finish_step(done)
            elif isinstance(done.job, SteppedBatch):
                self._finish_batch_step(done)
            else:
                self._finish_batch(done)

    def _finish_batch_step(self, done) -> None:
        job = done.job
        job.started = done.start if job.started is None else job.started
        job.compute_s += done.end - done.start
        if done.output is None:  # more steps to go: `_dispatch` gives the next
            return
        self.running[done.model].remove(job)
        self._finish_batch(Done(done.model, job.batch, done.output, job.started, done.end), job.compute_s * 1e3)

    def _finish_batch(self, done, compute_ms: float | None = None) -> None:
        """Reply to a finished batch. `compute_ms`: its own compute time, where other work ran between its steps."""
        batch, name = done.job, done.model
        if isinstance(done.output, Exception):
            for pending in batch:
                self._send_error(pending.envelope, "internal", f"model failed: {type(done.output).__name__}",
                                 pending.message.id, "act")
            return
        if compute_ms is None:
            compute_ms = (done.end - done.start) * 1e3
        delivered = []
        for pending, arrays in zip(batch, done.output):  # replies first: the bookkeeping below is not on their clock
            if pending.deadline is not None and done.end > pending.deadline:
                self._send_error(pending.envelope, "deadline_exceeded",
                                 f"finished {(done.end - pending.deadline) * 1e3:.1f} ms after the deadline",
                                 pending.message.id, "act")
                continue
            timing = {"queue_ms": (done.start - pending.arrival) * 1e3, "compute_ms": compute_ms,
                      "total_ms": (done.end - pending.arrival) * 1e3, "batch": len(batch)}
            self._send(pending.envelope, reply("act", pending.message.id, arrays, timing=timing,
                                               inline_bytes=pending.message.inline_bytes))
            delivered.append(timing)
        self.fair[name].finished(len(batch), compute_ms, done.end)
        for timing in delivered:
            self.stats.record(timing["queue_ms"], compute_ms, timing["total_ms"])
        self.stats.counts["replies_ok"] += len(delivered)
        self.stats.batch_sizes.append(len(batch))
        self.stats.counts["batches"] += 1
        self.compute_ms[name] = 0.8 * self.compute_ms[name] + 0.2 * compute_ms if self.compute_ms[name] else compute_ms

    def _finish_step(self, done) -> None:
        stream, output = done.job, done.output
        stream.in_flight = False
        op, message = stream.message.op, stream.message
        if stream.closed:  # cancelled, expired or failed while the step ran: nothing more goes out
            return
        if isinstance(output, Exception):
            self._close_stream(stream)
            self._send_error(stream.envelope, "internal", f"stream failed: {type(output).__name__}", message.id, op)
            return
        taken = stream.queued_inputs - len(stream.inputs)
        if taken:  # input credit back for the chunks the session took
            stream.input_credits += taken
            self._send(stream.envelope, reply(op, message.id, result={"input_grant": taken}))
        if output is None:
            if stream.duplex:  # a session waiting for input: not stepped again until a chunk arrives
                stream.waiting = not stream.arrivals
            return  # a stream's step that finished no reply (one denoising step of a window): stepped again
        arrays, result, final = output
        timing = {"compute_ms": (done.end - done.start) * 1e3, "total_ms": (done.end - stream.arrival) * 1e3}
        stream.credits -= 1
        stream.last_heard = done.end
        sent = self._send(stream.envelope, reply(op, message.id, arrays, result=result, timing=timing,
                                                 inline_bytes=message.inline_bytes, seq=stream.seq, final=final))
        stream.seq += 1
        if final:
            self._close_stream(stream)
            self.stats.counts["streams_done"] += 1
        elif not sent:  # the client is gone (or not reading at all): free the stream now, not at its lease
            self._close_stream(stream)
            self.stats.counts["streams_client_gone"] += 1

    def _refuse_remaining(self) -> None:
        for name in self.queues:
            for pending in list(self._pending(name)):
                self._send_error(pending.envelope, "unavailable", "server shutting down", pending.message.id, "act")
            self.queues[name].clear()
            self.queued[name] = 0
            for job in self.running[name]:
                for pending in job.batch:
                    self._send_error(pending.envelope, "unavailable", "server shutting down", pending.message.id,
                                     "act")
            self.running[name].clear()
        for stream in self.streams.values():
            self._send_error(stream.envelope, "unavailable", "server shutting down", stream.message.id, stream.message.op)
        self.streams.clear()


def _deadline(message: Message, arrival: float) -> float | None:
    """The request's deadline on the server's monotonic clock: `deadline_ms` counts from arrival, `deadline_at` is
    a wall-clock time (Unix seconds, the client's clock: same host or synchronised clocks); the earlier wins. A
    request already late when it arrives is refused, never computed."""
    if message.deadline_ms is None and message.deadline_at is None:
        return None
    deadlines = []
    if message.deadline_ms is not None:
        deadlines.append(arrival + message.deadline_ms / 1e3)
    if message.deadline_at is not None:
        left = message.deadline_at - time.time()
        if left <= 0:
            raise ProtocolError("deadline_exceeded", f"the deadline passed {-left * 1e3:.0f} ms before the request "
                                                     "arrived; it was not computed")
        deadlines.append(arrival + left)
    return min(deadlines) if deadlines else None


def _credit_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_CREDITS
