"""Per-request state, through the server: streams and requests interleaved on one served model answer exactly
what each answers alone, for every accelerator and every backend that runs here.

Each request's accelerator (block caches, step counters, SADA's history) is made for it alone, and the hooks
on the model activate a request's cache for one model call at a time. Requests computed in one batch agree
with themselves alone only to float rounding (batched matrix products sum in another order), so the exact
comparison runs with batches of one, and batching is held to the rounding tolerance separately.
"""

import contextlib

import numpy as np
import pytest

from rtdiff.policies.accelerate import calibrate_bac
from rtdiff.policies.service import PolicyService
from rtdiff.runtime.accel import ACCELERATORS
from rtdiff_client.client import Client
from rtdiff_client.protocol import Message
from rtdiff.runtime.run import RunConfig
from rtdiff.sims.tasks import TASKS
from tests.conftest import ServerThread

STEPS = 10


@pytest.fixture(scope="module")
def scheduled_checkpoint(tiny_checkpoint):
    """The tiny checkpoint with a bac and a bac+sada schedule beside it, at DDIM 10."""
    demos = TASKS["pusht"].demos
    calibrate_bac(str(tiny_checkpoint), "ddim", STEPS, 3, demos, observations=4)
    calibrate_bac(str(tiny_checkpoint), "ddim", STEPS, 3, demos, observations=4,
                  sada={"window": (0.1, 0.97), "max_consecutive": 2})
    return tiny_checkpoint


@contextlib.contextmanager
def serving(run: RunConfig, max_batch: int):
    with ServerThread({"m": PolicyService(run)}, max_batch=max_batch) as server:
        yield server.address


def observation(seed):
    return {"obs": np.random.default_rng(seed).uniform(0, 500, (2, 5)).astype(np.float32)}


def stream_alone(client, seed):
    return [reply.arrays["actions"] for reply in client.stream(observation(seed), credits=1, seed=seed)]


def interleaved(client, stream_seeds, act_seeds):
    """Open every stream with one credit, then take one step of each in turn, an `act` between steps."""
    ids = {seed: client.submit("stream", observation(seed), credits=1, seed=seed) for seed in stream_seeds}
    steps = {seed: [] for seed in stream_seeds}
    acts, pending = {}, list(act_seeds)
    while ids:
        for seed, request_id in list(ids.items()):
            reply = client.result(request_id)
            steps[seed].append(reply.arrays["actions"])
            if pending:
                act_seed = pending.pop(0)
                acts[act_seed] = client.call("act", observation(act_seed), seed=act_seed).arrays["actions"]
            if reply.header.get("final"):
                del ids[seed]
            else:
                client.submit("stream", request_id=request_id, grant=1)
    return steps, acts


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
@pytest.mark.parametrize("accel", sorted(ACCELERATORS))
def test_interleaved_streams_and_requests_match_each_alone(accel, backend, scheduled_checkpoint, tmp_path,
                                                           monkeypatch):
    monkeypatch.setenv("RTDIFF_CACHE", str(tmp_path / "cache"))
    run = RunConfig(str(scheduled_checkpoint), "ddim", STEPS, accel=accel, backend=backend)
    with serving(run, max_batch=1) as address, Client(address, model="m") as client:
        alone = {seed: stream_alone(client, seed) for seed in (1, 2, 3)}
        alone_acts = {seed: client.act(observation(seed)["obs"], seed=seed).arrays["actions"] for seed in (7, 8)}
        steps, acts = interleaved(client, (1, 2, 3), (7, 8))
    for seed in (1, 2, 3):
        assert len(steps[seed]) == STEPS
        for k, (mixed, single) in enumerate(zip(steps[seed], alone[seed])):
            assert np.array_equal(mixed, single), f"stream {seed}, step {k}: {np.abs(mixed - single).max()}"
    for seed in (7, 8):
        assert np.array_equal(acts[seed], alone_acts[seed]), seed


def test_a_stream_ends_with_what_act_answers(scheduled_checkpoint):
    run = RunConfig(str(scheduled_checkpoint), "ddpm", STEPS, accel="uniform")
    with serving(run, max_batch=1) as address, Client(address, model="m") as client:
        final = stream_alone(client, 5)[-1]
        act = client.act(observation(5)["obs"], seed=5).arrays["actions"]
    assert np.array_equal(final, act)


@pytest.mark.parametrize("solver", ["ddim", "ddpm"])
def test_batched_requests_agree_with_each_alone_to_rounding(solver, scheduled_checkpoint):
    run = RunConfig(str(scheduled_checkpoint), solver, STEPS, accel="uniform")
    with serving(run, max_batch=16) as address, Client(address, model="m") as client:
        alone = {seed: client.act(observation(seed)["obs"], seed=seed).arrays["actions"] for seed in range(4)}
        ids = {seed: client.submit("act", observation(seed), seed=seed) for seed in range(4)}
        replies = {seed: client.result(request_id) for seed, request_id in ids.items()}
    assert max(reply.timing["batch"] for reply in replies.values()) > 1  # some of them did share a batch
    for seed, reply in replies.items():  # atol: 1e-5 of the 0-500 action range (DDPM's 10 noisy steps amplify
        # a batch's different summation order to 1.7e-3 on this VM's CPU, at 1e-3 before)
        np.testing.assert_allclose(reply.arrays["actions"], alone[seed], rtol=1e-5, atol=5e-3)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
@pytest.mark.parametrize("accel", sorted(ACCELERATORS))
def test_a_batch_put_aside_midway_for_another_answers_what_it_answers_alone(accel, backend, scheduled_checkpoint,
                                                                            tmp_path, monkeypatch):
    """What the server does when a lighter client's request arrives during a batch: the batch's steps stop, the
    other batch runs whole, and the first goes on from where it was."""
    monkeypatch.setenv("RTDIFF_CACHE", str(tmp_path / "cache"))
    service = PolicyService(RunConfig(str(scheduled_checkpoint), "ddim", STEPS, accel=accel, backend=backend))
    first, second = ([Message("act", seed, "m", params={"seed": seed}, arrays=observation(seed))] for seed in (1, 3))
    alone = service.run_batch(first), service.run_batch(second)
    steps = service.act_steps(first)
    assert [next(steps) for _ in range(STEPS // 2)] == [None] * (STEPS // 2)
    *before, put_aside_for = service.act_steps(second)
    *rest, resumed = steps
    assert before == [None] * (STEPS - 1) and rest == [None] * (STEPS // 2 - 1)
    for mixed, single in zip([*resumed, *put_aside_for], [*alone[0], *alone[1]]):
        assert np.array_equal(mixed["actions"], single["actions"])
