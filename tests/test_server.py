"""The server: batching, deadlines, streams, cancel and stats; and that no malformed input disturbs it."""

import time
import tracemalloc

import msgpack
import numpy as np
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rtdiff.policies.service import PolicyService
from rtdiff.runtime.run import RunConfig
from rtdiff_client.client import Client, ServerError
from tests.conftest import ServerThread

OBS_SHAPE = (2, 5)


def Running(checkpoint, **config) -> ServerThread:
    """The tiny policy served on a thread."""
    return ServerThread({"tiny": PolicyService(RunConfig(str(checkpoint), "ddim", 4))}, **config)


@pytest.fixture
def server(tiny_checkpoint):
    with Running(tiny_checkpoint) as server:
        yield server


def obs(seed=0):
    return np.random.default_rng(seed).uniform(0, 500, OBS_SHAPE).astype(np.float32)


def test_act_answers_with_the_same_actions_as_the_policy_in_process(server, tiny_checkpoint):
    with Client(server.address, model="tiny") as client:
        reply = client.act(obs(), seed=11)
    service = PolicyService(RunConfig(str(tiny_checkpoint), "ddim", 4))
    expected = service.policy.predict_actions(torch.from_numpy(obs())[None], service.solver,
                                              noise=service.policy.initial_noise(1, torch.Generator().manual_seed(11)))
    np.testing.assert_allclose(reply.arrays["actions"], expected[0].numpy(), rtol=1e-5, atol=1e-4)
    assert reply.timing["batch"] == 1 and reply.timing["total_ms"] >= reply.timing["compute_ms"]


def test_replies_are_inline_only_for_a_client_that_asked(server):
    """A client of the original layout (no `inline_bytes`) keeps getting one frame per array; one that asks gets
    the same actions inside the header."""
    from rtdiff_client.protocol import decode_reply, request

    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.connect(server.address)
    try:
        answers = {}
        for inline_bytes in (0, 1024):
            socket.send_multipart([bytes(f) for f in request("act", inline_bytes, "tiny", {"obs": obs()},
                                                             inline_bytes=inline_bytes, seed=3)])
            frames = socket.recv_multipart()
            header, arrays = decode_reply(frames)
            assert header["ok"] and len(frames) == (2 if inline_bytes == 0 else 1)
            answers[inline_bytes] = arrays["actions"]
        np.testing.assert_array_equal(answers[0], answers[1024])
    finally:
        socket.close(linger=0)


def test_pipelined_requests_are_batched_and_each_keeps_its_own_answer(tiny_checkpoint):
    with Running(tiny_checkpoint, max_wait_ms=100) as server, Client(server.address, model="tiny") as client:
        alone = {k: client.act(obs(k), seed=k).arrays["actions"] for k in range(6)}
        ids = {client.submit("act", {"obs": obs(k)}, seed=k): k for k in range(6)}
        replies = {k: client.result(i) for i, k in ids.items()}
    assert max(r.timing["batch"] for r in replies.values()) > 1
    for k, reply in replies.items():  # batching does not change a request's answer (beyond float rounding)
        np.testing.assert_allclose(reply.arrays["actions"], alone[k], rtol=1e-4, atol=1e-3)


def test_info_describes_the_model_and_stats_count(server):
    with Client(server.address, model="tiny") as client:
        info = client.info()
        client.act(obs())
        with pytest.raises(ServerError, match="bad_array"):
            client.act(np.zeros((3, 5), np.float32))
        stats = client.stats()
    model = info["models"]["tiny"]
    assert model["inputs"] == [{"name": "obs", "dtype": "float32", "shape": [2, 5]}]
    assert model["outputs"] == [{"name": "actions", "dtype": "float32", "shape": [4, 2]}]
    assert stats["counts"]["replies_ok"] == 1 and stats["errors"] == {"bad_array": 1}
    assert stats["total_ms"]["count"] == 1 and stats["total_ms"]["p50"] > 0


@pytest.mark.parametrize("bad,code", [
    (np.full(OBS_SHAPE, np.nan, np.float32), "non_finite"),
    (np.full(OBS_SHAPE, np.inf, np.float32), "non_finite"),
    (np.zeros(OBS_SHAPE, np.float16), "bad_array"),
    (np.zeros((2, 4), np.float32), "bad_array"),
])
def test_bad_observations_get_error_codes(server, bad, code):
    with Client(server.address, model="tiny") as client:
        with pytest.raises(ServerError, match=code):
            client.call("act", {"obs": bad})
        with pytest.raises(ServerError, match="unknown_model"):
            client.act(obs(), model="nope")
        with pytest.raises(ServerError, match="unsupported"):
            client.call("act", {"obs": obs()}, temperature=1)
        assert client.act(obs()).arrays["actions"].shape == (4, 2)


def test_deadline_passed_in_the_queue_is_an_error_never_a_late_result(tiny_checkpoint):
    # Batching waits up to 200 ms; a request with a 20 ms budget must be dropped, with an error.
    with Running(tiny_checkpoint, max_wait_ms=200, max_batch=64) as server, Client(server.address, model="tiny") as client:
        late = client.submit("act", {"obs": obs()}, deadline_ms=1e-3)
        with pytest.raises(ServerError, match="deadline_exceeded"):
            client.result(late)
        on_time = client.submit("act", {"obs": obs()}, deadline_ms=5000)
        assert client.result(on_time).timing["queue_ms"] < 5000


def test_stream_sends_one_reply_per_step_under_credit_and_ends_with_the_act_answer(server):
    with Client(server.address, model="tiny") as client:
        replies = list(client.stream({"obs": obs()}, credits=1, seed=5))
        final = client.act(obs(), seed=5).arrays["actions"]
    assert [r.header["seq"] for r in replies] == [0, 1, 2, 3]
    assert [r.header["final"] for r in replies] == [False, False, False, True]
    np.testing.assert_array_equal(replies[-1].arrays["actions"], final)


def test_stream_without_credit_pauses_and_cancel_ends_it(server):
    with Client(server.address, model="tiny") as client:
        stream_id = client.submit("stream", {"obs": obs()}, credits=2)
        first, second = client.result(stream_id), client.result(stream_id)
        assert (first.header["seq"], second.header["seq"]) == (0, 1)
        with pytest.raises(TimeoutError):  # out of credit: nothing more comes
            client.result(stream_id, timeout_ms=300)
        cancel = client.submit("cancel", target=stream_id)
        with pytest.raises(ServerError, match="cancelled"):
            client.result(stream_id)
        assert client.result(cancel).result == {"cancelled": True}
        assert client.stats()["streams"] == 0


def test_a_vanished_client_and_a_client_that_never_reads_do_not_stall_others(tiny_checkpoint):
    # Batching holds requests up to 300 ms, so the vanished client is gone before its replies are sent.
    with Running(tiny_checkpoint, max_wait_ms=300, max_batch=64) as server:
        context = zmq.Context.instance()
        silent, vanished = context.socket(zmq.DEALER), context.socket(zmq.DEALER)
        silent.connect(server.address)
        vanished.connect(server.address)
        for k in range(30):  # each within its per-client queue cap (32), each with its own id
            silent.send_multipart([bytes(f) for f in _act_frames(request_id=k)])
            vanished.send_multipart([bytes(f) for f in _act_frames(request_id=k)])
        vanished.close(linger=2000)  # returns once its requests are on the wire
        with Client(server.address, model="tiny") as client:
            for k in range(5):
                assert client.act(obs(k), deadline_ms=10_000).arrays["actions"].shape == (4, 2)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:  # until the server has answered everyone's requests
                stats = client.stats()
                model = stats["models"]["tiny"]
                if model["queued"] == model["batches_computing"] == 0 and stats["counts"]["replies_ok"] >= 35:
                    break
                time.sleep(0.05)
        silent.close(linger=0)
    assert stats["models"]["tiny"]["queued"] == 0
    assert stats["counts"]["replies_unroutable"] == 30  # counted, not silently lost


def _act_frames(model="tiny", request_id=1):
    from rtdiff_client.protocol import request

    return request("act", request_id, model, {"obs": obs()})


garbage = st.one_of(
    st.lists(st.binary(max_size=100), min_size=1, max_size=5),
    st.builds(lambda h, extra: [msgpack.packb(h), *extra],
              st.fixed_dictionaries({"v": st.sampled_from([1, 2, "1"]),
                                     "op": st.sampled_from(["act", "stream", "cancel", "info", "stats", "x"]),
                                     "id": st.one_of(st.integers(-5, 2**64 - 1), st.text(max_size=70))},
                                    optional={"model": st.sampled_from(["tiny", "nope", 3]),
                                              "deadline_ms": st.one_of(st.floats(), st.integers(-1, 10)),
                                              "params": st.dictionaries(
                                                  st.sampled_from(["seed", "credits", "grant", "target"]),
                                                  st.one_of(st.integers(-3, 2**64 - 1), st.text(max_size=4),
                                                            st.lists(st.integers(-(2**63), 2**64 - 1), max_size=2))),
                                              "arrays": st.lists(st.fixed_dictionaries({
                                                  "name": st.sampled_from(["obs", "x"]),
                                                  "dtype": st.sampled_from(["float32", "float64", "uint8", "int64"]),
                                                  "shape": st.lists(st.integers(-1, 6), max_size=3)},
                                                  optional={"data": st.one_of(st.binary(max_size=48), st.text(max_size=4))}),
                                                  max_size=2),
                                              "inline_bytes": st.one_of(st.integers(-1, 70_000), st.booleans())}),
              st.lists(st.binary(max_size=80), max_size=3)),
    st.builds(lambda values: request_frames_with(values), st.lists(st.floats(width=32), min_size=10, max_size=10)),
)


def request_frames_with(values):
    return [bytes(f) for f in _act_frames()[:1]] + [np.asarray(values, np.float32).tobytes()]


def drain_until_sync(socket) -> list[tuple[bool, str | None]]:
    """Every reply the fuzzer has coming: ZeroMQ keeps one peer's messages in order, so once the reply to a
    final `info` arrives, every earlier message has been handled."""
    from rtdiff_client.protocol import decode_reply, request

    socket.send_multipart(request("info", "sync"))
    replies = []
    while True:
        frames = socket.recv_multipart()
        if frames[0] == b"":  # the fuzzer sent an empty first frame: answered like a REQ socket, delimiter first
            frames = frames[1:]
        header, _ = decode_reply(frames)
        if header["id"] == "sync":
            return replies
        replies.append((header["ok"], None if header["ok"] else header["error"]["code"]))


def test_fuzzed_messages_get_replies_and_the_server_keeps_serving(tiny_checkpoint):
    from rtdiff_client.protocol import ERRORS

    with Running(tiny_checkpoint, max_wait_ms=1) as server, Client(server.address, model="tiny") as good:
        fuzzer = zmq.Context.instance().socket(zmq.DEALER)
        fuzzer.connect(server.address)
        fuzzer.setsockopt(zmq.RCVTIMEO, 10_000)
        counts = {"sent": 0, "may_drop": 0}

        @settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        @given(garbage)
        def one_message(frames):
            fuzzer.send_multipart(frames)
            counts["sent"] += 1
            counts["may_drop"] += b"grant" in frames[0]  # a grant for no open stream is a documented drop
            if counts["sent"] % 25 == 0:  # the well-behaved client is served throughout
                assert good.act(obs(counts["sent"]), deadline_ms=10_000).arrays["actions"].shape == (4, 2)

        one_message()
        replies = drain_until_sync(fuzzer)
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        one_message()  # the same messages again must not grow what the server holds
        replies += drain_until_sync(fuzzer)
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        server_code = [tracemalloc.Filter(True, f"*{part}*") for part in ("runtime/", "policies/", "zmq/")]
        growth = after.filter_traces(server_code).compare_to(before.filter_traces(server_code), "filename")
        grown = sum(stat.size_diff for stat in growth)
        assert good.act(obs(), deadline_ms=10_000).arrays["actions"].shape == (4, 2)
        fuzzer.close(linger=0)
        open_streams, queued = len(server.streams), sum(map(len, server.queues.values()))
    assert len(replies) >= counts["sent"] - counts["may_drop"]
    assert all(ok or code in ERRORS for ok, code in replies)
    assert not [code for _, code in replies if code == "internal"]  # malformed input is never a server fault
    assert any(not ok for ok, _ in replies) and queued == 0
    assert open_streams <= 64
    assert grown < 100_000, [str(stat) for stat in growth[:5]]
