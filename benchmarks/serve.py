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
(b) Peers (`--peers`). The same PushT payload (obs float32 (2, 5), reply
float32 (16, 2)) through the raw pyzmq echo (of the frames rtdiff's client
sends: with its default `inline_bytes`, one frame, the arrays inline), rtdiff serving the `null` model
(no compute, every validation kept) over tcp and over ipc (same host), and an
openpi-style websocket server (benchmarks/openpi_style.py) over tcp and over a
Unix socket (so each transport has a like-for-like pair), all in one client
process with their round trips interleaved (each round in a fresh random
order: with a fixed rotation each peer always follows the same one, whose code
and data have just filled the caches, and two copies of one server measured
4 % apart), back to back and with 1 ms between
requests, p50 and p99, `--runs` times with fresh servers; CPU per request of
the client (its thread time around each round trip) and of each server process
(/proc), that also split by thread (the application's against ZeroMQ's I/O
thread). The issue's target: rtdiff's p50 at most openpi's in both conditions,
its p99 back to back at most 1 ms. `--model-threads`: rtdiff computes `null` on a
worker thread, as it would a model under `rtdiff serve --model-threads on`.
`--server-cpus 1 --client-cpus 0`: every thread of every server process (all
peers alike, their I/O threads included) on the server CPUs, the client's on
its own, as a deployment that pins its processes would run.
(c) Throughput. 1, 4, 16, 64 client processes, each sending `act` requests one
after another for a fixed time, against a server with batching on (max batch
64) and off (max batch 1): completed requests per second and client-side p99.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import random
import socket
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


# rtdiff_ipc: the same server's model over ipc://; openpi_unix: the openpi-style server over a Unix socket
PEERS = ("echo", "rtdiff", "openpi", "rtdiff_ipc", "openpi_unix")


def thread_cpu_s(pid: int) -> dict[str, float]:
    """User + system CPU seconds of each of a process's threads, summed by thread name (the application's
    `python`, ZeroMQ's `ZMQbg/IO/0`), from /proc (Linux)."""
    seconds: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = (task / "stat").read_text().rpartition(")")[2].split()
        name = (task / "comm").read_text().strip()
        seconds[name] = seconds.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return seconds


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def pin_process(pid: int, cpus: set[int]) -> None:
    """Every thread the process has now (ZeroMQ's I/O thread starts with its context) onto `cpus`."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), cpus)


def start_peers(workdir: str, model_threads: bool = False) -> tuple[dict, dict]:
    """The servers, each in a process of its own: {name: pid}, {name: what to stop}."""
    def started(*args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def rtdiff_server(address: str) -> subprocess.Popen:
        return started("-m", "rtdiff.runtime.cli", "serve", "--model", "bench=null:obs=2x5:actions=16x2",
                       "--bind", address, "--threads", "1", "--model-threads", "on" if model_threads else "off")

    openpi_style = str(Path(__file__).with_name("openpi_style.py"))
    rtdiff_address, echo_address, ws_port = (f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}",
                                             free_port())
    rtdiff_ipc_address, openpi_unix_path = f"ipc://{workdir}/rtdiff.ipc", f"{workdir}/openpi.sock"
    rtdiff, rtdiff_ipc = rtdiff_server(rtdiff_address), rtdiff_server(rtdiff_ipc_address)
    openpi = started(openpi_style, "serve", "--port", str(ws_port))
    openpi_unix = started(openpi_style, "serve", "--unix", openpi_unix_path)
    for name, process in (("rtdiff", rtdiff), ("openpi", openpi), ("rtdiff_ipc", rtdiff_ipc),
                          ("openpi_unix", openpi_unix)):
        line = process.stdout.readline()
        if not line.startswith("serving"):
            raise RuntimeError(f"{name} server did not start: {line!r}")
    ready = mp.get_context("spawn").Event()
    echo = mp.get_context("spawn").Process(target=echo_server, args=(echo_address, ready), daemon=True)
    echo.start()
    ready.wait(30)
    pids = {"echo": echo.pid, "rtdiff": rtdiff.pid, "openpi": openpi.pid, "rtdiff_ipc": rtdiff_ipc.pid,
            "openpi_unix": openpi_unix.pid}
    return pids, {"addresses": (echo_address, rtdiff_address, f"ws://127.0.0.1:{ws_port}", rtdiff_ipc_address,
                                f"unix:{openpi_unix_path}"),
                  "processes": (echo, rtdiff, openpi, rtdiff_ipc, openpi_unix)}


def measure_peers_run(count: int, gap_s: float, model_threads: bool = False, server_cpus: set[int] | None = None,
                      client_cpus: set[int] | None = None, seed: int = 0) -> dict:
    from openpi_style import OpenpiStyleClient

    workdir = tempfile.mkdtemp(prefix="rtdiff-peers-")
    pids, handles = start_peers(workdir, model_threads)
    for pid in pids.values() if server_cpus else ():
        pin_process(pid, server_cpus)
    echo_address, rtdiff_address, ws_uri, rtdiff_ipc_address, unix_uri = handles["addresses"]
    obs = np.full((2, 5), 100.0, np.float32)
    echo_socket = zmq.Context.instance().socket(zmq.DEALER)
    echo_socket.connect(echo_address)
    rtdiff = Client(rtdiff_address, model="bench", timeout_ms=10_000)
    echo_frames = [bytes(f) for f in request("act", 0, "bench", {"obs": obs}, inline_bytes=rtdiff.inline_bytes)]
    rtdiff_ipc = Client(rtdiff_ipc_address, model="bench", timeout_ms=10_000)
    openpi = OpenpiStyleClient(ws_uri)
    openpi_unix = OpenpiStyleClient(unix_uri)
    if client_cpus:  # after the clients' sockets exist: their context's I/O thread goes along
        pin_process(os.getpid(), client_cpus)

    def echo_trip():
        echo_socket.send_multipart(echo_frames)
        echo_socket.recv_multipart()

    trips = {"echo": echo_trip, "rtdiff": lambda: rtdiff.act(obs),
             "openpi": lambda: openpi.infer({"obs": obs}), "rtdiff_ipc": lambda: rtdiff_ipc.act(obs),
             "openpi_unix": lambda: openpi_unix.infer({"obs": obs})}
    wall = {name: [] for name in PEERS}
    rng = random.Random(seed)
    client_cpu = {name: 0.0 for name in PEERS}
    server_cpu = {}
    try:
        warmup = 200
        for k in range(count + warmup):
            if k == warmup:
                server_cpu = {name: thread_cpu_s(pids[name]) for name in PEERS}
            order = rng.sample(PEERS, len(PEERS))
            for name in order:
                if gap_s:
                    time.sleep(gap_s)
                cpu, start = time.thread_time(), time.perf_counter()
                trips[name]()
                elapsed = time.perf_counter() - start
                if k >= warmup:
                    wall[name].append(elapsed)
                    client_cpu[name] += time.thread_time() - cpu
        server_cpu = {name: {thread: seconds - server_cpu[name].get(thread, 0.0)
                             for thread, seconds in thread_cpu_s(pids[name]).items()} for name in PEERS}
    finally:
        rtdiff.close()
        rtdiff_ipc.close()
        openpi.close()
        openpi_unix.close()
        echo_socket.send_multipart([b"stop"])
        echo_socket.close(linger=100)
        echo, *servers = handles["processes"]
        for process in servers:
            stop(process)
        echo.join(timeout=10)
        if echo.is_alive():
            echo.kill()
    return {name: {"p50_us": percentile_us(wall[name], 50), "p99_us": percentile_us(wall[name], 99),
                   "over_1ms": float(np.mean(np.array(wall[name]) > 1e-3)),
                   "client_cpu_us": client_cpu[name] / count * 1e6,
                   "server_cpu_us": sum(server_cpu[name].values()) / count * 1e6,
                   # the application thread against ZeroMQ's I/O thread: whose work grows after an idle millisecond
                   "server_thread_cpu_us": {thread: seconds / count * 1e6 for thread, seconds in server_cpu[name].items()
                                            if seconds > 0}}
            for name in PEERS}


def measure_peers(count: int, runs: int, model_threads: bool = False, server_cpus: set[int] | None = None,
                  client_cpus: set[int] | None = None) -> list[dict]:
    rows = []
    for run in range(runs):
        for condition, gap in (("back_to_back", 0.0), ("gap_1ms", 1e-3)):
            result = measure_peers_run(count, gap, model_threads, server_cpus, client_cpus, seed=run)
            rows.append({"run": run, "condition": condition, "count": count, "model_threads": model_threads,
                         "server_cpus": sorted(server_cpus or ()), "client_cpus": sorted(client_cpus or ()),
                         **result})
            print(f"run {run} {condition:>12}: " + "; ".join(
                f"{name} p50 {result[name]['p50_us']:.0f} p99 {result[name]['p99_us']:.0f} us "
                f"(cpu {result[name]['client_cpu_us']:.0f}/{result[name]['server_cpu_us']:.0f})" for name in PEERS),
                flush=True)
    return rows


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
    parser.add_argument("--peers", action="store_true", help="only (b): rtdiff on null against the echo and openpi")
    parser.add_argument("--runs", type=int, default=3, help="peers: runs, each with fresh servers")
    parser.add_argument("--model-threads", action="store_true", help="peers: rtdiff serves `null` on a worker thread")
    parser.add_argument("--server-cpus", type=cpu_set, help="peers: pin every server process here, e.g. 1")
    parser.add_argument("--client-cpus", type=cpu_set, help="peers: pin the client here, e.g. 0")
    parser.add_argument("--json", default="benchmarks/results/serve.json")
    args = parser.parse_args()
    client_counts = (1, 4, 16, 64)
    if args.quick:
        args.count, args.seconds, client_counts = 200, 3.0, (1, 4)
    if args.overhead_only:
        client_counts = ()
    machine = (f"{platform.machine()} {platform.processor() or 'cpu'}, {os.cpu_count()} cores, python "
               f"{sys.version.split()[0]}, pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}")
    if args.peers:
        rows = measure_peers(args.count, args.runs, args.model_threads, args.server_cpus, args.client_cpus)
        write_result(args.json, {"machine": machine, "peers": rows})
        return

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
    write_result(args.json, {
        "machine": machine,
        "checkpoint": args.checkpoint, "steps": args.steps, "quick": args.quick,
        "overhead": overhead[0], "overhead_by_transport": overhead,
        "protocol_path_p50_us": protocol_path, "throughput": throughput,
    })


def cpu_set(text: str) -> set[int]:
    try:
        cpus = {int(part) for part in text.split(",")}
    except ValueError:
        raise argparse.ArgumentTypeError(f"CPUs are integers joined by commas, got {text!r}") from None
    if not cpus <= os.sched_getaffinity(0):
        raise argparse.ArgumentTypeError(f"CPUs {sorted(cpus)} are not all available here")
    return cpus


def write_result(path: str, result: dict) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
