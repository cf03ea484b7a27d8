"""Serving under abuse, measured: a flood against a 10 Hz client, and a slow stream beside a real-time sim.

    python benchmarks/abuse.py flood --seconds 10 --runs 10 --json benchmarks/results/abuse_flood.json
    python benchmarks/abuse.py slow-stream --episodes 10 --json benchmarks/results/abuse_slow_stream.json

flood: `rtdiff serve --model pusht=pusht-unet`; four client processes send `act` as fast as they can (a new id
each, replies drained and thrown away) while one client asks at 10 Hz with a 200 ms deadline. Reported: the
share of the 10 Hz client's requests answered in time, and what the flood sent and was refused. `--runs`
repeats it with a fresh server each time: a run asks 100 times, too few to tell 99 % from 98 %, so the
totals over the runs are what the 99 % target is read from.

slow-stream: the same server also holds `slow=null:steps=100000:step_ms=300`, a stream whose every step takes
300 ms (sleeping: it stands for a long audio window and uses no CPU); one client keeps such a stream going
while `rtdiff sim pusht` runs its episodes in real time against the policy. Reported: the sim's stalls,
score and latencies, and how many slow steps arrived meanwhile.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import json
import multiprocessing as mp
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import zmq

from rtdiff_client import Client, ServerError
from rtdiff_client.protocol import request


def free_address() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


@contextlib.contextmanager
def serving(*models: str, model_threads: str = "auto", server_nice: int = 0, server_threads: int = 1,
            server_backend: str = "torch"):
    address = free_address()
    command = [*(["nice", "-n", str(server_nice)] if server_nice else []), sys.executable, "-m", "rtdiff.runtime.cli", "serve",
               "--bind", address, "--threads", str(server_threads), "--backend", server_backend,
               "--model-threads", model_threads, *(f"--model={m}" for m in models)]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        if not line.startswith("serving"):
            raise RuntimeError(f"the server did not start: {line}")
        yield address
    finally:
        server.terminate()
        server.wait(timeout=30)


def flooder(address: str, model: str, seconds: float, queue, cpus: tuple[int, ...] | None = None) -> None:
    if cpus:  # confined, standing for clients on other machines: their own spinning is not the server's CPU
        os.sched_setaffinity(0, cpus)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    obs = np.full((2, 5), 100.0, np.float32)
    sent = received = refused = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            sock.send_multipart(request("act", sent, model, {"obs": obs}), flags=zmq.NOBLOCK, copy=False)
            sent += 1
        except zmq.Again:
            pass
        while sock.poll(0):
            header = sock.recv_multipart()[0]
            received += 1
            refused += b"overloaded" in header
    queue.put({"sent": sent, "received": received, "overloaded": refused})
    sock.close()


def measure_flood(seconds: float, flooders: int, model: str = "pusht-unet", model_threads: str = "auto",
                  flooder_cpus: tuple[int, ...] | None = None, server_nice: int = 0, server_threads: int = 1,
                  server_backend: str = "torch") -> dict:
    with serving(f"pusht={model}", model_threads=model_threads, server_nice=server_nice,
                 server_threads=server_threads, server_backend=server_backend) as address:
        with Client(address, model="pusht", timeout_ms=20_000) as client:  # warm: the model has run once
            client.act(np.full((2, 5), 100.0, np.float32))
        results = mp.get_context("spawn").Queue()
        procs = [mp.get_context("spawn").Process(target=flooder,
                                                       args=(address, "pusht", seconds + 1, results, flooder_cpus))
                 for _ in range(flooders)]
        for proc in procs:
            proc.start()
        time.sleep(1.0)  # let the flood start
        in_time, failures, latencies, messages = 0, {}, [], []
        with Client(address, model="pusht", timeout_ms=1000, retries=0) as client:
            asked = int(seconds * 10)
            for _ in range(asked):
                start = time.monotonic()
                try:
                    client.act(np.full((2, 5), 100.0, np.float32), deadline_ms=200)
                    in_time += 1
                    latencies.append((time.monotonic() - start) * 1e3)
                except (ServerError, TimeoutError) as error:
                    key = getattr(error, "code", "timeout")
                    failures[key] = failures.get(key, 0) + 1
                    if len(messages) < 5:
                        messages.append(str(error))
                time.sleep(max(0.0, 0.1 - (time.monotonic() - start)))
        flood = [results.get(timeout=60) for _ in procs]
        for proc in procs:
            proc.join()
        with Client(address, model="pusht", timeout_ms=5000) as client:
            stats = client.stats()
    return {"scenario": "flood", "model": model, "model_threads": model_threads, "flooders": flooders,
            "flooder_cpus": flooder_cpus, "server_nice": server_nice, "server_threads": server_threads,
            "server_backend": server_backend, "seconds": seconds, "asked": asked, "in_time": in_time,
            "in_time_fraction": in_time / asked, "failures": failures,
            "latency_ms_p50": float(np.percentile(latencies, 50)) if latencies else None,
            "latency_ms_p99": float(np.percentile(latencies, 99)) if latencies else None,
            "failure_messages": messages, "flood": flood,
            "server": {"errors": stats["errors"], "mean_batch": stats["mean_batch"], "compute_ms": stats["compute_ms"],
                       "batches_preempted": stats["counts"].get("batches_preempted"),
                       "batch_cap_after": stats["models"]["pusht"].get("batch_cap")}}


def flood_totals(runs: list[dict]) -> dict:
    """The runs and, over all of them, the 10 Hz client's requests asked, answered in time, and failed by code."""
    failures: dict[str, int] = {}
    for run in runs:
        for code, count in run["failures"].items():
            failures[code] = failures.get(code, 0) + count
    asked, in_time = sum(run["asked"] for run in runs), sum(run["in_time"] for run in runs)
    return {"scenario": "flood", "asked": asked, "in_time": in_time, "in_time_fraction": in_time / asked,
            "failures": failures, "runs": runs}


def measure_slow_stream(episodes: int, workers: int, model_threads: str = "auto") -> dict:
    from rtdiff.sims.remote import run_remote

    # two models: by default each on its own thread (a stream's 300 ms steps inline would hold the policy)
    with serving("pusht=pusht-unet", "slow=null:steps=100000:step_ms=300", model_threads=model_threads) as address:
        stop, slow_steps = threading.Event(), []

        def keep_streaming() -> None:
            with Client(address, model="slow", timeout_ms=5000) as client:
                for reply in client.stream({"obs": np.zeros((2, 5), np.float32)}, credits=4):
                    slow_steps.append(reply.header["seq"])
                    if stop.is_set():
                        client.call("cancel", target=reply.header["id"])
                        return

        streamer = threading.Thread(target=keep_streaming, daemon=True)
        streamer.start()
        time.sleep(1.0)
        report = run_remote("pusht", address, "pusht", episodes, 100_000, workers=workers)
        stop.set()
        streamer.join(timeout=10)
    keys = ("score_mean", "success_rate", "stalls", "ticks", "latency_ms", "server_latency_ms", "request_errors",
            "request_timeouts", "episodes", "clients")
    return {"scenario": "slow-stream", "model_threads": model_threads, "slow_steps_during_sim": len(slow_steps),
            **{k: report[k] for k in keys}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", choices=["flood", "slow-stream"])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--runs", type=int, default=1, help="flood: runs, each with a fresh server; totals reported")
    parser.add_argument("--flooders", type=int, default=4)
    parser.add_argument("--model", default="pusht-unet", help="flood: what the server holds (null: no compute)")
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--workers", type=int, default=1, help="sim client processes")
    parser.add_argument("--model-threads", nargs="?", const="on", choices=["on", "off", "auto"], default="auto",
                        help="the server's `--model-threads` (auto: threads when it holds more than one model)")
    parser.add_argument("--flooder-cpus", help="flood: confine the flooding processes to these cores (e.g. 1)")
    parser.add_argument("--server-nice", type=int, default=0,
                        help="flood: start the server under `nice -n N` (negative: a higher priority; needs the right)")
    parser.add_argument("--server-threads", type=int, default=1, help="flood: the server's torch threads (--threads)")
    parser.add_argument("--server-backend", default="torch", help="flood: the server's --backend")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.scenario == "flood":
        cpus = tuple(int(c) for c in args.flooder_cpus.split(",")) if args.flooder_cpus else None
        runs = []
        for run in range(args.runs):
            runs.append(measure_flood(args.seconds, args.flooders, args.model, args.model_threads, cpus,
                                      args.server_nice, args.server_threads, args.server_backend))
            print(f"run {run}: {runs[-1]['in_time']} of {runs[-1]['asked']} in time, failures {runs[-1]['failures']}",
                  flush=True)
        result = flood_totals(runs)
    else:
        result = measure_slow_stream(args.episodes, args.workers, args.model_threads)
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
