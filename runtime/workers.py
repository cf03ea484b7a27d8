"""One compute thread per served model, so the loop that owns the socket never runs a model.

The server's loop hands a worker one job at a time (a batch of `act` requests,
or one step of a stream) and goes on reading the socket: `info`, `stats`,
`cancel` and other models' requests are answered while a model computes. A
finished job goes back through a queue the loop drains, with one byte on an
inproc socket to wake the loop's poll. A model's worker is its only thread,
so the model and its hooks are never entered by two threads at once.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

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
    def __init__(self, name: str, service, context: zmq.Context, wake_address: str, done: queue.SimpleQueue):
        self.name, self.service = name, service
        self.busy = False  # owned by the loop: a job is in flight
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._done, self._context, self._wake_address = done, context, wake_address
        self._thread = threading.Thread(target=self._run, name=f"rtdiff-model-{name}", daemon=True)
        self._thread.start()

    def submit(self, job, run) -> None:
        """Run `run(service)` for `job` on this model's thread; the loop hears of it through `done`."""
        self.busy = True
        self._jobs.put((job, run))

    def stop(self, timeout: float = 30.0) -> None:
        self._jobs.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        wake = self._context.socket(zmq.PUSH)
        wake.setsockopt(zmq.LINGER, 0)
        wake.connect(self._wake_address)
        try:
            while (item := self._jobs.get()) is not None:
                job, run = item
                start = time.monotonic()
                try:
                    output = run(self.service)
                except Exception as error:  # reported to the client by the loop; the worker lives on
                    log.exception("model %s failed", self.name)
                    output = error
                self._done.put(Done(self.name, job, output, start, time.monotonic()))
                wake.send(b"")
        finally:
            wake.close()
