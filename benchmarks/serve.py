"""Serving: protocol overhead against a raw ZeroMQ echo, and throughput against the number of clients.

    python benchmarks/serve.py [--quick] --json benchmarks/results/serve.json

(a) Overhead. One `rtdiff serve` process and one raw ROUTER echo process (it
sends back the frames it gets), both on tcp and on ipc. The client alternates
an `act` round trip with an echo round trip of the same request frames;
rtdiff's overhead is its round trip minus the server-measured compute time.
A third round trip, `echo_idle`, echoes after the client has slept as long as
that compute took, as an `act` reply's threads have: if it is slower than the
back-to-back echo, waking idle threads and cores is part of the overhead. (On
an idle 2-core machine it was not: 234 against 224 us.)
`protocol_path` times, in this process, the Python work one `act` costs both
ends (request encode, decode and check, reply encode, reply decode) run
back to back, right after a 5 ms sleep, and right after one policy step: the
echo's Python is a few microseconds, rtdiff's is tens, and how much slower it
runs when the core has just idled or just run torch decides the ratio.
(b) Throughput. 1, 4, 16, 64 client processes, each sending `act` requests one
after another for a fixed time, against a server with batching on (max batch
64) and off (max batch 1): completed requests per second and client-side p99.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq

from rtdiff_client.client import Client, ServerError
from rtdiff_client.protocol import request


def start_server(address: str, checkpoint: str, steps: int, max_batch: int) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "rtdiff.runtime.cli", "serve", "--model", f"policy={checkpoint}", "--bind", address,
         "--steps", str(steps), "--max-batch", str(max_batch), "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = process.stdout.readline()
    if not line.startswith("serving"):
        process.kill()
        raise RuntimeError(f"server did not start: {line!r}")
    return process


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


def echo_server(address: str, ready) -> None:
    socket = zmq.Context.instance().socket(zmq.ROUTER)
    socket.bind(address)
    ready.set()
    while True:
        frames = socket.recv_multipart(copy=False)
        if frames[1].bytes == b"stop":
            return
        socket.send_multipart(frames, copy=False)


def percentile_us(values: list[float], q: float) -> float:
    return float(np.percentile(values, q) * 1e6)


def measure_overhead(transport: str, checkpoint: str, count: int, workdir: Path) -> dict:
    if transport == "tcp":
        rtdiff_address, echo_address = "tcp://127.0.0.1:5611", "tcp://127.0.0.1:5612"
    else:
        rtdiff_address, echo_address = f"ipc://{workdir}/rtdiff.ipc", f"ipc://{workdir}/echo.ipc"
    server = start_server(rtdiff_address, checkpoint, steps=1, max_batch=16)
    ready = mp.get_context("spawn").Event()
    echo = mp.get_context("spawn").Process(target=echo_server, args=(echo_address, ready))
    echo.start()
    ready.wait(30)
    try:
        client = Client(rtdiff_address, model="policy", timeout_ms=10_000)
        echo_socket = zmq.Context.instance().socket(zmq.DEALER)
        echo_socket.connect(echo_address)
        obs = np.full((2, 5), 100.0, np.float32)
        frames = [bytes(f) for f in request("act", 0, "policy", {"obs": obs})]
        def echo_round_trip() -> float:
            start = time.perf_counter()
            echo_socket.send_multipart(frames)
            echo_socket.recv_multipart()
            return time.perf_counter() - start

        overhead, echo_rtt, echo_idle_rtt, rtdiff_rtt = [], [], [], []
        for k in range(count + 50):  # the first 50 of each warm up connections and caches
            start = time.perf_counter()
            reply = client.act(obs)
            rtt = time.perf_counter() - start
            echo_time = echo_round_trip()
            time.sleep(reply.timing["compute_ms"] / 1e3)
            echo_idle_time = echo_round_trip()
            if k >= 50:
                rtdiff_rtt.append(rtt)
                overhead.append(rtt - reply.timing["compute_ms"] / 1e3)
                echo_rtt.append(echo_time)
                echo_idle_rtt.append(echo_idle_time)
        echo_socket.send_multipart([b"stop"])
        echo_socket.close(linger=100)
        client.close()
    finally:
        stop(server)
        echo.join(timeout=10)
        if echo.is_alive():
            echo.kill()
    return {
        "transport": transport, "count": count,
        "p50_us": percentile_us(overhead, 50), "p99_us": percentile_us(overhead, 99),
        "round_trip_p50_us": percentile_us(rtdiff_rtt, 50),
        "echo_p50_us": percentile_us(echo_rtt, 50), "echo_p99_us": percentile_us(echo_rtt, 99),
        "ratio_p50": float(np.percentile(overhead, 50) / np.percentile(echo_rtt, 50)),
        "echo_idle_p50_us": percentile_us(echo_idle_rtt, 50), "echo_idle_p99_us": percentile_us(echo_idle_rtt, 99),
        "ratio_idle_p50": float(np.percentile(overhead, 50) / np.percentile(echo_idle_rtt, 50)),
    }


def measure_protocol_path(checkpoint: str, count: int) -> dict:
    import torch

    from rtdiff.policies.service import PolicyService
    from rtdiff.runtime.run import RunConfig
    from rtdiff.runtime.service import check_request
    from rtdiff_client.protocol import decode, decode_reply, reply

    torch.set_num_threads(1)
    service = PolicyService(RunConfig(str(checkpoint), "ddim", 1))
    obs = np.full((2, 5), 100.0, np.float32)
    actions = np.zeros(service.outputs[0].shape, np.float32)
    timing = {"queue_ms": 0.1, "compute_ms": 5.0, "total_ms": 5.2, "batch": 1}

    def protocol_work() -> None:
        message = decode([bytes(f) for f in request("act", 7, "policy", {"obs": obs})])
        check_request(service, message)
        decode_reply([bytes(f) for f in reply("act", message.id, {"actions": actions}, timing=timing)])

    def timed(before) -> list[float]:
        times = []
        for _ in range(count):
            before()
            start = time.perf_counter()
            protocol_work()
            times.append(time.perf_counter() - start)
        return times

    message = decode([bytes(f) for f in request("act", 7, "policy", {"obs": obs})])
    conditions = {"back_to_back": lambda: None, "after_sleep_5ms": lambda: time.sleep(0.005),
                  "after_policy_step": lambda: service.run_batch([message])}
    return {name: percentile_us(timed(before), 50) for name, before in conditions.items()}


def closed_loop_client(address: str, seconds: float, deadline_ms: float, start_at: float, results) -> None:
    client = Client(address, model="policy", timeout_ms=30_000, retries=0)
    obs = np.full((2, 5), 100.0, np.float32)
    latencies, errors = [], 0
    while time.time() < start_at:
        time.sleep(0.001)
    end = time.time() + seconds
    while time.time() < end:
        start = time.perf_counter()
        try:
            client.act(obs, deadline_ms=deadline_ms)
            latencies.append((time.perf_counter() - start) * 1e3)
        except ServerError:
            errors += 1
    client.close()
    results.put((latencies, errors))


def measure_throughput(clients: int, batching: bool, checkpoint: str, steps: int, seconds: float,
                       deadline_ms: float) -> dict:
    address = "tcp://127.0.0.1:5621"
    server = start_server(address, checkpoint, steps=steps, max_batch=64 if batching else 1)
    context = mp.get_context("spawn")
    results = context.Queue()
    start_at = time.time() + 3.0 + 0.05 * clients  # every process imported and connected before the clock starts
    processes = [context.Process(target=closed_loop_client, args=(address, seconds, deadline_ms, start_at, results))
                 for _ in range(clients)]
    try:
        for process in processes:
            process.start()
        gathered = [results.get(timeout=seconds + 120) for _ in processes]
        for process in processes:
            process.join(timeout=30)
        with Client(address, model="policy") as client:
            batch = client.stats()["mean_batch"]
    finally:
        stop(server)
    latencies = [ms for part, _ in gathered for ms in part]
    errors = sum(e for _, e in gathered)
    return {
        "clients": clients, "batching": batching, "seconds": seconds, "completed": len(latencies),
        "errors": errors, "req_per_s": len(latencies) / seconds,
        "p50_ms": float(np.percentile(latencies, 50)) if latencies else None,
        "p99_ms": float(np.percentile(latencies, 99)) if latencies else None,
        "deadline_ms": deadline_ms, "mean_batch": batch,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer round trips, clients and seconds")
    parser.add_argument("--checkpoint", default="pusht-unet")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps of the served policy (throughput)")
    parser.add_argument("--count", type=int, default=2000, help="round trips per transport (overhead)")
    parser.add_argument("--seconds", type=float, default=10.0, help="per throughput configuration")
    parser.add_argument("--deadline-ms", type=float, default=1000.0)
    parser.add_argument("--overhead-only", action="store_true", help="skip the throughput part")
    parser.add_argument("--json", default="benchmarks/results/serve.json")
    args = parser.parse_args()
    client_counts = (1, 4, 16, 64)
    if args.quick:
        args.count, args.seconds, client_counts = 200, 3.0, (1, 4)
    if args.overhead_only:
        client_counts = ()

    with tempfile.TemporaryDirectory() as workdir:
        overhead = [measure_overhead(t, args.checkpoint, args.count, Path(workdir)) for t in ("tcp", "ipc")]
    for row in overhead:
        print(f"overhead {row['transport']}: p50 {row['p50_us']:.0f} us, p99 {row['p99_us']:.0f} us; raw echo p50 "
              f"{row['echo_p50_us']:.0f} us, p99 {row['echo_p99_us']:.0f} us; ratio p50 {row['ratio_p50']:.2f}; "
              f"echo after idling p50 {row['echo_idle_p50_us']:.0f} us, ratio {row['ratio_idle_p50']:.2f}",
              flush=True)
    protocol_path = measure_protocol_path(args.checkpoint, min(args.count, 500))
    print("protocol path p50: " + ", ".join(f"{k} {v:.0f} us" for k, v in protocol_path.items()), flush=True)
    throughput = []
    for clients in client_counts:
        for batching in (False, True):
            row = measure_throughput(clients, batching, args.checkpoint, args.steps, args.seconds, args.deadline_ms)
            throughput.append(row)
            print(f"{clients:>3} clients, batching {'on ' if batching else 'off'}: {row['req_per_s']:7.1f} req/s, "
                  f"p99 {row['p99_ms']:.1f} ms, mean batch {row['mean_batch']:.1f}, errors {row['errors']}", flush=True)
    result = {
        "machine": f"{platform.machine()} {platform.processor() or 'cpu'}, python {sys.version.split()[0]}, "
                   f"pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}",
        "checkpoint": args.checkpoint, "steps": args.steps, "quick": args.quick,
        "overhead": overhead[0], "overhead_by_transport": overhead,
        "protocol_path_p50_us": protocol_path, "throughput": throughput,
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
