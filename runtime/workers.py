"""A served model's compute: on a thread of its own, or inline on the server's loop.

Threaded, the server's loop hands a worker one job at a time (a batch of `act`
requests, stepped until done or until the loop wants the model back, or one
step of a stream) and goes on reading the socket: `info`,
`stats`, `cancel` and other models' requests are answered while a model
computes, and a slow model cannot hold up a fast one. A finished job goes back
through a queue the loop drains, with one byte on an inproc socket to wake the
loop's poll. A model's worker is its only thread, so the model and its hooks
are never entered by two threads at once.

Inline, the job runs on the loop's thread when it is handed over and `submit`
returns its result, which the loop sends at once. A server holding one model
computes it inline unless told otherwise, measured on the 2-core machine
(benchmarks/RESULTS.md, Serving, session 19): on a thread a request pays two
hand-overs between threads, which raise rtdiff's p50 on `null` from about 1.0x
the openpi-style server's to 1.3x; and beside four processes flooding the same
two cores, a 10 Hz client got 85 % of its answers in time against 96 % inline
(each hand-over waits for a contended core). A real-time PushT sim no longer
has the longer tail session 11 measured (0 stalls and client p99 86-89 ms on
threads, 93 and 133 ms inline). A slow model beside a fast one needs threads
(a PushT sim beside a music stream, session 20: 0 stalls and client p99
224-233 ms on threads, 1-2 stalls and 319 ms inline), so a server holding more
than one model uses them (`rtdiff serve --model-threads on|off` overrides
either way).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

import torch
import zmq

log = logging.getLogger("rtdiff.server")


@dataclass
class Done:
    model: str
    job: object  # what the loop handed over (a list of pending requests, or a stream)
    output: object  # the service's answer, or the exception it raised
    start: float
    end: float


class ModelWorker:
    def __init__(self, name: str, service, context: zmq.Context, wake_address: str, done: queue.SimpleQueue,
                 threaded: bool = True):
        self.name, self.service, self.threaded = name, service, threaded
        self.busy = False  # owned by the loop: a job is in flight
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._done, self._context, self._wake_address = done, context, wake_address
        if not threaded:
            return
        # torch's intra-op thread count is per thread under OpenMP: a new thread would compute with one per core
        # (measured: a PushT sim's stalls went from 1 to 94 in 10 episodes), so it takes the server's setting
        self._torch_threads = torch.get_num_threads()
        self._thread = threading.Thread(target=self._run, name=f"rtdiff-model-{name}", daemon=True)
        self._thread.start()

    def submit(self, job, run) -> Done | None:
        """Run `run(service)` for `job`: threaded, on this model's thread (the loop hears of it through `done`
        and returns None now); inline, here, returning what it gave."""
        if not self.threaded:
            return self._execute(job, run)
        self.busy = True
        self._jobs.put((job, run))
        return None

    def stop(self, timeout: float = 30.0) -> None:
        if self.threaded:
            self._jobs.put(None)
            self._thread.join(timeout)

    def _execute(self, job, run) -> Done:
        start = time.monotonic()
        try:
            output = run(self.service)
        except Exception as error:  # reported to the client by the loop; the worker lives on
            log.exception("model %s failed", self.name)
            output = error
        return Done(self.name, job, output, start, time.monotonic())

    def _run(self) -> None:
        torch.set_num_threads(self._torch_threads)
        wake = self._context.socket(zmq.PUSH)
        wake.setsockopt(zmq.LINGER, 0)
        wake.connect(self._wake_address)
        try:
            while (item := self._jobs.get()) is not None:
                self._done.put(self._execute(*item))
                wake.send(b"")
        finally:
            wake.close()
