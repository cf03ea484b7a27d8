"""The service contract through the server, with small fake services: generic validation against declared specs,
and the duplex stream (input chunks in, outputs out, credits both ways)."""

import threading
from collections import deque

import numpy as np
import pytest

from rtdiff.runtime.server import DUPLEX_INPUT_CREDITS, Server, ServerConfig
from rtdiff.runtime.service import ArraySpec, ParamSpec
from rtdiff_client import Client, ServerError


class Scale:
    """act: y = x * scale, per row; x and ids share their variable dimension n."""

    ops = ("act",)
    inputs = (ArraySpec("x", "float32", ("n", 3), max_dims={"n": 16}), ArraySpec("ids", "int64", ("n",)))
    outputs = (ArraySpec("y", "float32", ("n", 3)),)
    params = {"scale": ParamSpec("number", 0, 10, required=True), "label": ParamSpec("str", high=8)}
    chunk_inputs = ()

    def __init__(self):
        self.seen = 0

    def info(self):
        return {"kind": "test"}

    def stats(self):
        return {"seen": self.seen}

    def run_batch(self, messages):
        self.seen += len(messages)
        return [{"y": m.arrays["x"] * np.float32(m.params["scale"])} for m in messages]


class PairSums:
    """duplex: a reference vector opens the stream; each output is the sum of two audio chunks plus the
    reference's sum; after the last chunk, a final output with the number of chunks taken."""

    ops = ("duplex",)
    inputs = (ArraySpec("ref", "float32", (4,)),)
    outputs = (ArraySpec("out", "float32", ("samples",)),)
    params = {}
    chunk_inputs = (ArraySpec("audio", "float32", ("samples",), max_dims={"samples": 1024}),)

    def info(self):
        return {"kind": "test"}

    def stats(self):
        return {}

    def open_duplex(self, message):
        return PairSession(float(message.arrays["ref"].sum()))


class PairSession:
    def __init__(self, offset: float):
        self.offset, self.taken = offset, 0

    def step(self, inputs: deque, ended: bool):
        if len(inputs) >= 2:
            a, b = inputs.popleft()["audio"], inputs.popleft()["audio"]
            self.taken += 2
            return {"out": a + b + np.float32(self.offset)}, {"taken": self.taken}, False
        if ended:
            inputs.clear()
            return {"out": np.zeros(1, np.float32)}, {"taken": self.taken}, True
        return None


@pytest.fixture
def address():
    server = Server({"scale": Scale(), "pairs": PairSums()}, ServerConfig(bind="tcp://127.0.0.1:0"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.address
    server.stop()
    thread.join(timeout=10)


def act(client, x, ids, **params):
    return client.call("act", {"x": x, "ids": ids}, model="scale", **params)


def test_the_server_checks_what_the_service_declares(address):
    x, ids = np.ones((5, 3), np.float32), np.arange(5)
    with Client(address, retries=0) as client:
        np.testing.assert_array_equal(act(client, x, ids, scale=2.5).arrays["y"], x * 2.5)
        cases = [
            (dict(x=x[:, :2], ids=ids), {"scale": 1}, "bad_array"),  # a fixed dimension
            (dict(x=x, ids=ids[:4]), {"scale": 1}, "bad_array"),  # n differs between the arrays
            (dict(x=np.ones((17, 3), np.float32), ids=np.arange(17)), {"scale": 1}, "bad_array"),  # over max n
            (dict(x=x.astype(np.float16), ids=ids), {"scale": 1}, "bad_array"),
            (dict(x=np.full((5, 3), np.nan, np.float32), ids=ids), {"scale": 1}, "non_finite"),
            (dict(x=x), {"scale": 1}, "bad_array"),  # a missing array
            (dict(x=x, ids=ids), {}, "bad_message"),  # a required param missing
            (dict(x=x, ids=ids), {"scale": 11}, "bad_message"),  # out of bounds
            (dict(x=x, ids=ids), {"scale": True}, "bad_message"),  # a bool is not a number
            (dict(x=x, ids=ids), {"scale": 1, "label": "far too long"}, "bad_message"),
            (dict(x=x, ids=ids), {"scale": 1, "colour": "red"}, "unsupported"),
        ]
        for arrays, params, code in cases:
            with pytest.raises(ServerError) as error:
                client.call("act", arrays, model="scale", **params)
            assert error.value.code == code, (sorted(arrays), params, error.value)
        with pytest.raises(ServerError, match="unsupported"):  # an op the service does not declare
            client.call("stream", {"x": x, "ids": ids}, model="scale", scale=1)
        assert act(client, x, ids, scale=1).arrays["y"].shape == (5, 3)  # and it still serves
        description = client.info()["models"]
    assert description["scale"]["inputs"][0] == {"name": "x", "dtype": "float32", "shape": ["n", 3]}
    assert description["scale"]["params"]["scale"]["required"] is True
    assert description["pairs"]["chunk_inputs"] == [{"name": "audio", "dtype": "float32", "shape": ["samples"]}]


def test_duplex_stream_takes_chunks_and_returns_credit_both_ways(address):
    ref = np.arange(4, dtype=np.float32)
    chunks = [np.full(6, k, np.float32) for k in range(6)]
    with Client(address, model="pairs", retries=0) as client:
        stream = client.submit("duplex", {"ref": ref}, credits=1)
        opened = client.result(stream)
        assert opened.result == {"opened": True, "input_credits": DUPLEX_INPUT_CREDITS}
        outputs, grants = [], 0
        for chunk in chunks:
            client.submit("chunk", {"audio": chunk}, request_id=stream)
        client.submit("chunk", request_id=stream, end=True)
        while True:
            reply = client.result(stream)
            if "input_grant" in reply.result:
                grants += reply.result["input_grant"]
                continue
            outputs.append(reply)
            if reply.header["final"]:
                break
            client.submit("duplex", request_id=stream, grant=1)  # one output at a time: credit is respected
    assert [r.header["seq"] for r in outputs] == [0, 1, 2, 3]
    for k, reply in enumerate(outputs[:3]):
        np.testing.assert_array_equal(reply.arrays["out"], chunks[2 * k] + chunks[2 * k + 1] + ref.sum())
    assert outputs[-1].result == {"taken": 6} and grants == 6


def test_a_chunk_beyond_its_credit_or_its_spec_ends_only_that_stream(address):
    with Client(address, model="pairs", retries=0) as client:
        stream = client.submit("duplex", {"ref": np.zeros(4, np.float32)}, credits=1)
        client.result(stream)  # opened
        # eight chunks fit the input window; the session takes two for its one output credit, then no more
        for _ in range(DUPLEX_INPUT_CREDITS + 3):
            client.submit("chunk", {"audio": np.ones(3, np.float32)}, request_id=stream)
        with pytest.raises(ServerError, match="no_credit"):
            while True:
                client.result(stream)
        with pytest.raises(ServerError, match="bad_message"):  # the stream is gone
            client.call("chunk", {"audio": np.ones(3, np.float32)}, request_id=stream)

        other = client.submit("duplex", {"ref": np.zeros(4, np.float32)})
        client.result(other)
        client.submit("chunk", {"audio": np.ones((2, 2), np.float32)}, request_id=other)  # breaks the spec
        with pytest.raises(ServerError, match="bad_array"):
            while True:
                client.result(other)
        # the server serves on
        reply = act(client, np.ones((1, 3), np.float32), np.zeros(1, np.int64), scale=3)
    np.testing.assert_array_equal(reply.arrays["y"], np.full((1, 3), 3, np.float32))


def test_a_service_without_the_contract_is_refused_at_start():
    class Bare:
        def run_batch(self, messages):
            return []

    with pytest.raises(TypeError, match="service contract"):
        Server({"bare": Bare()}, ServerConfig(bind="tcp://127.0.0.1:0"))


def test_ids_in_flight_are_unique_and_bad_grants_or_cancels_are_refused(address):
    x, ids = np.ones((2, 3), np.float32), np.arange(2)
    with Client(address, retries=0) as client:
        first = client.submit("duplex", {"ref": np.zeros(4, np.float32)}, model="pairs", request_id="s")
        assert client.result(first).result["opened"]
        with pytest.raises(ServerError, match="bad_message: id 's' is already in flight"):
            client.call("act", {"x": x, "ids": ids}, model="scale", request_id="s", scale=1.0)
        with pytest.raises(ServerError, match="bad_message: a grant carries only"):  # and it ends the stream
            client.call("duplex", model="pairs", request_id="s", grant=0)
        assert client.stats()["streams"] == 0
        with pytest.raises(ServerError, match="bad_message: cancel needs params.target"):
            client.call("cancel", target=-1)
        counts = client.stats()["counts"]
    assert counts["leases_expired"] == 0 and counts["stale_grants"] == 0  # zero counts are reported


def test_the_client_s_duplex_helper_keeps_to_both_credits(address):
    chunks = [{"audio": np.full(5, k, np.float32)} for k in range(20)]  # more than the input window
    with Client(address, model="pairs", retries=0) as client:
        outputs = list(client.duplex({"ref": np.ones(4, np.float32)}, chunks, credits=2))
    assert [r.header["seq"] for r in outputs] == list(range(11)) and outputs[-1].result == {"taken": 20}
    for k, reply in enumerate(outputs[:10]):
        np.testing.assert_array_equal(reply.arrays["out"], np.full(5, 4 * k + 1 + 4, np.float32))
