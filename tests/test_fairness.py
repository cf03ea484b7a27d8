"""Serving under abuse, bounded in time: a flood against a 10 Hz client, stream hoarding, vanished clients,
a slow model beside a fast one, requests already late on arrival. Fake services only."""

import contextlib
import time

import msgpack
import numpy as np
import pytest

from rtdiff.runtime.service import ArraySpec
from rtdiff_client import Client, ServerError
from rtdiff_client.protocol import request
from tests.conftest import ServerThread
from tests.test_contract import Scale


class Ticker:
    """stream: `steps` outputs, each after `step_s` of (sleeping) compute."""

    ops = ("stream",)
    inputs = (ArraySpec("x", "float32", (1,)),)
    outputs = (ArraySpec("k", "float32", (1,)),)
    params = {}
    chunk_inputs = ()

    def __init__(self, step_s: float = 0.0, steps: int = 50, events: list | None = None):
        self.step_s, self.steps, self.events = step_s, steps, events

    def info(self):
        return {"kind": "test"}

    def stats(self):
        return {}

    def stream(self, message):
        for k in range(self.steps):
            self._log("slow starts")
            time.sleep(self.step_s)
            self._log("slow ends")
            yield {"k": np.array([k], np.float32)}, {}, k == self.steps - 1

    def _log(self, event: str) -> None:
        if self.events is not None:
            self.events.append(event)


class LoggedScale(Scale):
    def __init__(self, events: list):
        super().__init__()
        self.events = events

    def run_batch(self, messages):
        self.events.append("act")
        return super().run_batch(messages)


class Stepper(Scale):
    """`Scale` computed in `steps` steps of `step_s` each (sleeping), offered step by step as a policy does; it
    records the steps it computed and, per finished batch, the scales of its requests."""

    def __init__(self, step_s: float, steps: int):
        super().__init__()
        self.step_s, self.steps = step_s, steps
        self.steps_computed, self.finished = 0, []

    def act_steps(self, messages):
        for k in range(self.steps):
            time.sleep(self.step_s)
            self.steps_computed += 1
            if k < self.steps - 1:
                yield None
        self.finished.append([m.params["scale"] for m in messages])
        yield self.run_batch(messages)


X, IDS = np.ones((1, 3), np.float32), np.zeros(1, np.int64)


FLOOD = """
import sys, time
import numpy as np, zmq
from rtdiff_client.protocol import request
address, seconds = sys.argv[1], float(sys.argv[2])
sock = zmq.Context.instance().socket(zmq.DEALER)
sock.setsockopt(zmq.LINGER, 0)
sock.connect(address)
x, ids = np.ones((1, 3), np.float32), np.zeros(1, np.int64)
sent = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    try:  # a new id each time: a repeated id in flight is refused as such (bad_message), not queued
        sock.send_multipart(request("act", sent, "scale", {"x": x, "ids": ids}, scale=1.0), flags=zmq.NOBLOCK)
        sent += 1
    except zmq.Again:
        pass
    while sock.poll(0):  # replies (mostly `overloaded`) drained, so the server never sees a full queue
        sock.recv_multipart()
print(sent)
"""


def test_a_flood_does_not_starve_a_client_at_10_hz():
    import subprocess
    import sys

    with ServerThread({"scale": Scale()}) as server:
        flooders = [subprocess.Popen([sys.executable, "-c", FLOOD, server.address, "5"], stdout=subprocess.PIPE,
                                     text=True) for _ in range(3)]
        time.sleep(0.5)
        answered, late = 0, []
        with Client(server.address, model="scale", timeout_ms=1000, retries=0) as client:
            for _ in range(40):  # 4 s at 10 Hz, each with a 200 ms deadline
                start = time.monotonic()
                try:
                    reply = client.call("act", {"x": X, "ids": IDS}, deadline_ms=200, scale=2.0)
                    answered += reply.arrays["y"][0, 0] == 2.0
                except (ServerError, TimeoutError) as error:
                    late.append(str(error))
                time.sleep(max(0.0, 0.1 - (time.monotonic() - start)))
        sent = [int(flooder.communicate(timeout=30)[0]) for flooder in flooders]
    # the flood was real; what the server does not read in time waits in ZeroMQ's queues (8 reads a turn), where
    # it costs the server nothing, so it may never fill its per-client queue (capped: the test below)
    assert sum(sent) > 1000
    assert answered >= 40 * 0.99, late  # (before per-client queues and bounded reads: 0 of 47)


@contextlib.contextmanager
def heavy_and_light(service, **config):
    """Two clients of one served model, `step`."""
    with ServerThread({"step": service}, **config) as server:
        with Client(server.address, model="step", timeout_ms=5000, retries=0) as heavy, \
                Client(server.address, model="step", timeout_ms=5000, retries=0) as light:
            yield heavy, light


def test_a_client_s_queue_is_capped_and_requests_beyond_it_refused_without_refusing_others():
    with heavy_and_light(Stepper(step_s=0.05, steps=4), max_queue_per_client=4) as (heavy, light):
        ids = [heavy.submit("act", {"x": X, "ids": IDS}, scale=1.0) for _ in range(12)]
        assert light.call("act", {"x": X, "ids": IDS}, scale=2.0).arrays["y"][0, 0] == 2.0
        answered, refused = 0, 0
        for request_id in ids:
            try:
                answered += heavy.result(request_id).arrays["y"][0, 0] == 1.0
            except ServerError as error:
                assert "overloaded: this client has 4 requests queued" in str(error)
                refused += 1
    assert refused > 0 and answered + refused == 12 and answered >= 4


# on a worker thread a stepped batch runs step after step until the loop asks for the model: the same order results
threads = pytest.mark.parametrize("model_threads", [False, True], ids=["inline", "threaded"])


@threads
def test_a_lighter_client_s_request_goes_first_at_the_next_step_of_a_batch(model_threads):
    stepper = Stepper(step_s=0.1, steps=5)
    with heavy_and_light(stepper, max_wait_ms=50, model_threads=model_threads) as (heavy, light):
        heavy_ids = [heavy.submit("act", {"x": X, "ids": IDS}, scale=1.0) for _ in range(8)]
        time.sleep(0.2)  # the heavy client's batch is at its second or third step
        assert light.call("act", {"x": X, "ids": IDS}, scale=2.0).arrays["y"][0, 0] == 2.0
        assert all(heavy.result(request_id).arrays["y"][0, 0] == 1.0 for request_id in heavy_ids)
        preempted = light.stats()["counts"]["batches_preempted"]
    assert stepper.finished[0] == [2.0] and sum(stepper.finished[1:], []) == [1.0] * 8
    assert preempted == 1
    assert stepper.steps_computed == 5 * len(stepper.finished)  # the heavy batch resumed, not restarted


@threads
def test_a_batch_whose_deadlines_have_all_passed_stops_computing(model_threads):
    stepper = Stepper(step_s=0.1, steps=10)
    with ServerThread({"step": stepper}, model_threads=model_threads) as server:
        with Client(server.address, model="step", timeout_ms=5000, retries=0) as client:
            ids = [client.submit("act", {"x": X, "ids": IDS}, deadline_ms=250, scale=1.0) for _ in range(3)]
            for request_id in ids:
                with pytest.raises(ServerError, match="deadline_exceeded"):
                    client.result(request_id)
            time.sleep(0.3)
    assert stepper.finished == [] and stepper.steps_computed <= 5  # of the 10 a finished batch takes


@threads
def test_a_flood_of_long_batches_delays_a_10_hz_client_by_one_step_not_one_batch(model_threads):
    """Each batch takes 120 ms: a 10 Hz client with a 200 ms deadline that waited for a whole batch and then
    computed its own would miss about a third of its requests."""
    import subprocess
    import sys

    with ServerThread({"scale": Stepper(step_s=0.012, steps=10)}, model_threads=model_threads) as server:
        flooders = [subprocess.Popen([sys.executable, "-c", FLOOD, server.address, "5"], stdout=subprocess.PIPE,
                                     text=True) for _ in range(3)]
        time.sleep(0.5)
        answered, late = 0, []
        with Client(server.address, model="scale", timeout_ms=1000, retries=0) as client:
            for _ in range(40):
                start = time.monotonic()
                try:
                    answered += client.call("act", {"x": X, "ids": IDS}, deadline_ms=200,
                                            scale=2.0).arrays["y"][0, 0] == 2.0
                except (ServerError, TimeoutError) as error:
                    late.append(str(error))
                time.sleep(max(0.0, 0.1 - (time.monotonic() - start)))
            preempted = client.stats()["counts"]["batches_preempted"]
        for flooder in flooders:
            flooder.communicate(timeout=30)
    assert answered >= 40 * 0.99, late
    assert preempted > 0


def open_streams(client, model, count, credits=1):
    return [client.submit("stream", {"x": np.zeros(1, np.float32)}, model=model, credits=credits)
            for _ in range(count)]


def test_a_hoarder_cannot_keep_others_from_streaming_and_its_streams_are_freed_at_the_lease():
    with ServerThread({"tick": Ticker()}, stream_lease_s=0.5, max_streams_per_client=4) as server:
        with Client(server.address, model="tick", timeout_ms=5000, retries=0) as hoarder, \
                Client(server.address, model="tick", timeout_ms=5000, retries=0) as other:
            hoarded = open_streams(hoarder, "tick", 4)  # credits 1 each, never granted
            for request_id in hoarded:
                assert hoarder.result(request_id).header["seq"] == 0
            with pytest.raises(ServerError, match="overloaded: this client has 4 streams open"):
                hoarder.result(open_streams(hoarder, "tick", 1)[0])
            replies = list(other.stream({"x": np.zeros(1, np.float32)}, credits=8))  # the others still stream
            assert len(replies) == 50 and replies[-1].header["final"]
            for request_id in hoarded:  # the lease runs out: each ends with its own error
                with pytest.raises(ServerError, match="lease_expired"):
                    hoarder.result(request_id)
            assert other.stats()["streams"] == 0


def test_a_vanished_client_s_streams_are_freed():
    with ServerThread({"tick": Ticker()}, stream_lease_s=0.5) as server:
        gone = Client(server.address, model="tick", timeout_ms=5000, retries=0)
        for request_id in open_streams(gone, "tick", 3, credits=2):
            gone.result(request_id)
        gone.close()  # no cancel, no goodbye
        with Client(server.address, model="tick", timeout_ms=5000) as watcher:
            deadline = time.monotonic() + 5
            while watcher.stats()["streams"] and time.monotonic() < deadline:
                time.sleep(0.1)
            assert watcher.stats()["streams"] == 0


@pytest.mark.parametrize("config", [{"model_threads": True}, {}], ids=["threads", "default"])
def test_a_slow_model_does_not_hold_up_a_fast_one_or_the_loop(config):
    # by default a server holding more than one model computes each on its own thread (computed on the loop, every
    # act would wait for the slow step: "slow ends" would come second)
    events = []
    with ServerThread({"slow": Ticker(step_s=0.3, steps=3, events=events), "scale": LoggedScale(events)},
                      **config) as server:
        with Client(server.address, timeout_ms=5000, retries=0) as client:
            stream = client.submit("stream", {"x": np.zeros(1, np.float32)}, model="slow", credits=3)
            deadline = time.monotonic() + 5
            while not events and time.monotonic() < deadline:
                time.sleep(0.005)
            for _ in range(5):  # while the slow model computes its first step
                client.result(client.submit("act", {"x": X, "ids": IDS}, model="scale", scale=1.0))
            client.info()
            events.append("info answered")
            client.result(stream)
    assert events[:8] == ["slow starts"] + ["act"] * 5 + ["info answered", "slow ends"]


def test_a_lone_model_computes_on_the_loop_unless_told_otherwise():
    from rtdiff.runtime.server import Server, ServerConfig

    cases = [({"scale": Scale()}, {}, False), ({"scale": Scale()}, {"model_threads": True}, True),
             ({"a": Scale(), "b": Scale()}, {"model_threads": False}, False)]
    for services, config, threaded in cases:
        server = Server(services, ServerConfig(bind="tcp://127.0.0.1:0", **config))
        try:
            assert [worker.threaded for worker in server.workers.values()] == [threaded] * len(services)
        finally:
            server.close()


def test_serve_s_model_threads_flag_defaults_to_auto_and_alone_means_on():
    from rtdiff.runtime.cli import build_parser

    def parsed(*flags):
        return build_parser().parse_args(["serve", "--model", "a=null", *flags]).model_threads

    assert (parsed(), parsed("--model-threads"), parsed("--model-threads", "off")) == ("auto", "on", "off")
    with pytest.raises(SystemExit):
        parsed("--model-threads", "sometimes")


def test_a_request_late_on_arrival_is_refused_and_never_computed():
    scale = Scale()
    with ServerThread({"scale": scale}) as server:
        with Client(server.address, model="scale", timeout_ms=5000, retries=0) as client:
            socket = client.socket
            header_frames = request("act", "stale", "scale", {"x": X, "ids": IDS}, scale=1.0)
            header = msgpack.unpackb(header_frames[0])
            header["deadline_at"] = time.time() - 1.0  # it waited out a restart in some queue
            socket.send_multipart([msgpack.packb(header), *header_frames[1:]])
            with pytest.raises(ServerError, match="deadline_exceeded: the deadline passed"):
                client.result("stale")
            assert scale.seen == 0
            assert client.call("act", {"x": X, "ids": IDS}, deadline_ms=1000, scale=1.0).arrays["y"].shape == (1, 3)
    assert scale.seen == 1
