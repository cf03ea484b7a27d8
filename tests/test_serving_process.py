"""`rtdiff serve` as a real process: a client written from docs/protocol.md alone, clean shutdown, a server
killed and restarted under a running episode, and CURVE keeping strangers out."""

import signal
import socket
import subprocess
import sys
import threading
import time

import msgpack
import numpy as np
import pytest
import zmq



def free_address() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


def start_server(checkpoint, address, *extra) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "rtdiff.runtime.cli", "serve", "--model", f"tiny={checkpoint}", "--bind", address,
         "--steps", "4", "--threads", "1", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = process.stdout.readline()  # the server prints one line once it is bound
    assert line.startswith("serving"), line
    return process


def test_a_client_written_from_the_protocol_doc_gets_actions(tiny_checkpoint):
    address = free_address()
    server = start_server(tiny_checkpoint, address)
    try:
        # Only pyzmq, msgpack and numpy below, exactly as docs/protocol.md describes the exchange.
        dealer = zmq.Context.instance().socket(zmq.DEALER)
        dealer.setsockopt(zmq.RCVTIMEO, 20_000)
        dealer.connect(address)
        dealer.send_multipart([msgpack.packb({"v": 1, "op": "info", "id": "hello"})])
        info = msgpack.unpackb(dealer.recv_multipart()[0])
        assert info["ok"] and info["id"] == "hello"
        (obs_spec,) = info["result"]["models"]["tiny"]["inputs"]
        obs = np.full(obs_spec["shape"], 100.0, dtype="<f4")
        header = {"v": 1, "op": "act", "id": 1, "model": "tiny", "deadline_ms": 5000,
                  "arrays": [{"name": "obs", "dtype": "float32", "shape": list(obs.shape)}], "params": {"seed": 0}}
        dealer.send_multipart([msgpack.packb(header), obs.tobytes()])
        reply_header, *frames = dealer.recv_multipart()
        reply = msgpack.unpackb(reply_header)
        assert reply["ok"], reply
        (descriptor,) = reply["arrays"]
        actions = np.frombuffer(frames[0], dtype=descriptor["dtype"]).reshape(descriptor["shape"])
        assert actions.shape == (4, 2) and np.isfinite(actions).all()
        assert set(reply["timing"]) >= {"queue_ms", "compute_ms", "total_ms", "batch"}
        # A REQ socket works too: the server answers with the delimiter REQ expects.
        req = zmq.Context.instance().socket(zmq.REQ)
        req.setsockopt(zmq.RCVTIMEO, 20_000)
        req.connect(address)
        req.send_multipart([msgpack.packb({"v": 1, "op": "stats", "id": 2})])
        assert msgpack.unpackb(req.recv_multipart()[0])["ok"]
        dealer.close(linger=0)
        req.close(linger=0)
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=20) == 0
        assert "server stopped" in server.stdout.read()
    finally:
        server.kill()


def test_a_server_killed_and_restarted_mid_episode_does_not_end_the_episode(tiny_checkpoint):
    from rtdiff_client.client import Client
    from rtdiff_client.loop import RemoteController
    from rtdiff.sims.pusht import make_env, run_episode

    address = free_address()
    server = start_server(tiny_checkpoint, address)
    result = {}
    try:
        client = Client(address, model="tiny", timeout_ms=500)
        controller = RemoteController(client, n_obs_steps=2, rate_hz=50, request_timeout_ms=500)

        def episode():
            env = make_env()
            result["episode"] = run_episode(env, controller, seed=1)
            env.close()

        runner = threading.Thread(target=episode)
        runner.start()
        time.sleep(2.0)
        assert runner.is_alive()
        server.kill()  # SIGKILL: no goodbye
        server.wait()
        server = start_server(tiny_checkpoint, address)
        runner.join(timeout=60)
        assert not runner.is_alive()
        client.close()
    finally:
        server.kill()
    assert result["episode"].steps == 300  # the episode ran to its end
    assert controller.timeouts >= 1 and client.reconnects >= 1
    assert controller.stalls > 0  # the outage showed as held actions, and was counted


def test_curve_admits_only_clients_with_the_keys(tiny_checkpoint, tmp_path):
    from rtdiff.runtime.cli import main
    from rtdiff_client.client import Client

    main(["keys", str(tmp_path / "keys")])
    address = free_address()
    server = start_server(tiny_checkpoint, address, "--curve", str(tmp_path / "keys"))
    try:
        stranger = Client(address, model="tiny", timeout_ms=1000, retries=0)  # no keys at all
        with pytest.raises(TimeoutError):
            stranger.info()
        stranger.close()
        (tmp_path / "other").mkdir()
        from zmq.auth import create_certificates

        create_certificates(tmp_path / "other", "client")  # a key pair the server does not list
        (tmp_path / "other" / "server.key").write_bytes((tmp_path / "keys" / "server.key").read_bytes())
        impostor = Client(address, model="tiny", timeout_ms=1000, retries=0, curve_dir=tmp_path / "other")
        with pytest.raises(TimeoutError):
            impostor.info()
        impostor.close()
        with Client(address, model="tiny", timeout_ms=20_000, curve_dir=tmp_path / "keys") as friend:
            assert friend.act(np.full((2, 5), 100.0, np.float32)).arrays["actions"].shape == (4, 2)
            assert friend.stats()["counts"]["received"] == 2  # the strangers' messages never reached it
    finally:
        server.kill()


def test_served_accelerator_takes_its_options_from_the_command_line(tiny_checkpoint):
    from rtdiff_client.client import Client

    address = free_address()
    server = start_server(tiny_checkpoint, address, "--accel", "uniform", "--accel-option", "interval=4")
    try:
        with Client(address, model="tiny", timeout_ms=20_000) as client:
            assert client.info()["models"]["tiny"]["accel_options"] == {"interval": 4}
            client.act(np.full((2, 5), 100.0, np.float32))
            # 4 steps, blocks computed at step 0 only (the default interval, 2, would give 0.5)
            assert client.stats()["models"]["tiny"]["block_evals_fraction"] == pytest.approx(0.25)
    finally:
        server.kill()
    refused = subprocess.run([sys.executable, "-m", "rtdiff.runtime.cli", "serve", "--model", f"tiny={tiny_checkpoint}",
                              "--accel", "uniform", "--accel-option", "interval=0"], capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode == 2 and refused.stderr.strip() == \
        "rtdiff: error: uniform cache interval must be an integer >= 1, got 0"


def test_keys_are_private_and_new_clients_are_admitted_without_a_restart(tiny_checkpoint, tmp_path):
    from zmq.auth import create_certificates

    from rtdiff_client.client import Client

    keys = tmp_path / "keys"
    assert subprocess.run([sys.executable, "-m", "rtdiff.runtime.cli", "keys", str(keys)],
                          capture_output=True, timeout=60).returncode == 0
    assert keys.stat().st_mode & 0o777 == 0o700
    assert {p.name: p.stat().st_mode & 0o777 for p in keys.glob("*.key_secret")} == \
        {"server.key_secret": 0o600, "client.key_secret": 0o600}

    newcomer = tmp_path / "newcomer"
    newcomer.mkdir()
    create_certificates(newcomer, "client")
    (newcomer / "server.key").write_bytes((keys / "server.key").read_bytes())
    address = free_address()
    server = start_server(tiny_checkpoint, address, "--curve", str(keys))
    try:
        stranger = Client(address, model="tiny", timeout_ms=1000, retries=0, curve_dir=newcomer)
        with pytest.raises(TimeoutError):
            stranger.info()
        stranger.close()
        (keys / "clients" / "newcomer.key").write_bytes((newcomer / "client.key").read_bytes())
        time.sleep(2.5)  # the folder is looked at once a second
        with Client(address, model="tiny", timeout_ms=10_000, retries=0, curve_dir=newcomer) as admitted:
            assert "tiny" in admitted.info()["models"]
    finally:
        server.kill()


def test_the_null_model_answers_zeros_of_its_declared_shapes_and_validates_like_any_model():
    from rtdiff_client.client import Client, ServerError

    address = free_address()
    process = subprocess.Popen([sys.executable, "-m", "rtdiff.runtime.cli", "serve", "--model", "bench=null:actions=16x2",
                                "--bind", address], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert process.stdout.readline().startswith("serving")
        with Client(address, model="bench", timeout_ms=10_000, retries=0) as client:
            reply = client.act(np.ones((2, 5), np.float32))
            assert reply.arrays["actions"].shape == (16, 2) and not reply.arrays["actions"].any()
            with pytest.raises(ServerError, match="bad_array"):
                client.act(np.ones((3, 5), np.float32))
            assert client.info()["models"]["bench"]["outputs"][0]["shape"] == [16, 2]
    finally:
        process.kill()
    refused = subprocess.run([sys.executable, "-m", "rtdiff.runtime.cli", "serve", "--model", "bench=null:obs=2y5"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "dimensions are integers" in refused.stderr


def test_requests_queued_during_an_outage_are_refused_as_late_never_computed():
    """A client keeps sending while the server is down (kill -9); ZeroMQ delivers what it queued once the server
    is back on the same port. Requests whose deadline passed meanwhile get `deadline_exceeded`, never actions."""
    from rtdiff_client.protocol import decode_reply, request

    address = free_address()
    command = [sys.executable, "-m", "rtdiff.runtime.cli", "serve", "--model", "bench=null", "--bind", address]

    def start():
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert process.stdout.readline().startswith("serving")
        return process

    server = start()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    obs = {"obs": np.ones((2, 5), np.float32)}
    try:
        sock.send_multipart(request("act", "before", "bench", obs, deadline_ms=5000))
        assert sock.poll(10_000)
        assert decode_reply(sock.recv_multipart())[0]["ok"]
        server.kill()
        server.wait()
        for k in range(8):  # queued in the client's socket while nobody listens
            sock.send_multipart(request("act", f"outage-{k}", "bench", obs, deadline_ms=300))
        time.sleep(0.5)  # every one of them is late now
        server = start()
        replies = {}
        end = time.monotonic() + 15
        while len(replies) < 8 and time.monotonic() < end:
            if sock.poll(500):
                header, _ = decode_reply(sock.recv_multipart())
                replies[header["id"]] = header
        assert sorted(replies) == [f"outage-{k}" for k in range(8)]  # all delivered after the restart
        for header in replies.values():
            assert not header["ok"] and header["error"]["code"] == "deadline_exceeded"
            assert "not computed" in header["error"]["message"]
        sock.send_multipart(request("act", "after", "bench", obs, deadline_ms=5000))
        assert sock.poll(10_000) and decode_reply(sock.recv_multipart())[0]["ok"]
    finally:
        sock.close()
        server.kill()
