"""Backends: one action-chunk inference on torch eager against the same policy exported to ONNX Runtime.

    python benchmarks/backends.py [--quick] --json benchmarks/results/backends.json

For each bundled policy, solver setting (DDIM 10, DDPM 100), accelerator
(none, and BAC with a schedule calibrated here) and batch size (1, 16): the
export is made with that schedule's segments, both backends infer the same
observations from the same initial noise in alternating order, `repeats`
times, and the rows give p50/p99 per backend, ONNX Runtime's speedup over
torch (ratio of medians, same run) and the parity of the action chunks (max
relative error). Both backends use one thread, the way a 2-core machine runs
one policy per core.

Where CUDA is available, the same chunk on the GPU: torch eager against a
captured CUDA graph (export/cudagraph.py; DDIM only, DDPM cannot be captured)
and torch.compile, rows with device "cuda" and the GPU's name. TensorRT is not
in this benchmark yet. (Not run so far: the machines of this project had no
GPU.)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from rtdiff.export.onnx_export import export_onnx
from rtdiff.policies.backend import use_onnxruntime
from rtdiff.policies.accelerate import calibration_observations, record_calibration
from rtdiff.runtime.accel.hooks import feed_forward_blocks
from rtdiff.policies.checkpoint import load_policy
from rtdiff.runtime.checkpoints import checkpoint_hash
from rtdiff.runtime.accel import make_accelerator
from rtdiff.runtime.accel.bac import calibrate, save_schedule
from rtdiff.sims.tasks import TASKS

DEMOS_PATH = TASKS["pusht"].demos

POLICIES = ("pusht-unet", "pusht-transformer")
SETTINGS = (("ddim", 10, 4), ("ddpm", 100, 15))  # solver, steps, BAC budget


def bac_schedule(checkpoint: str, solver: str, steps: int, budget: int, path: Path) -> dict:
    policy = load_policy(checkpoint)
    outputs = record_calibration(policy, solver, steps, DEMOS_PATH)
    schedule = {**calibrate(outputs, budget, feed_forward_blocks(policy.denoiser)), "solver": solver,
                "checkpoint_sha256": checkpoint_hash(checkpoint)}
    save_schedule(schedule, path)
    return schedule


def timed_interleaved(runners: list, observations: torch.Tensor, repeats: int) -> tuple[list[list[float]], list]:
    """Milliseconds per chunk for each runner, interleaved; and each runner's first chunk (noise seed 0)."""
    times, first = [[] for _ in runners], [None] * len(runners)
    for r in range(repeats):
        order = range(len(runners)) if r % 2 == 0 else reversed(range(len(runners)))
        for j in order:
            policy, solver, accelerator = runners[j]
            start = time.perf_counter()
            chunk = policy.predict_chunk(observations, solver, torch.Generator().manual_seed(r), accelerator)
            times[j].append((time.perf_counter() - start) * 1e3)
            if r == 0:
                first[j] = chunk
    return times, first


def measure(checkpoint: str, solver_name: str, steps: int, budget: int, batch_sizes: tuple[int, ...], repeats: int,
            workdir: Path) -> list[dict]:
    schedule = bac_schedule(checkpoint, solver_name, steps, budget, workdir / "schedule.json")
    rows = []
    for accel in ("none", "bac"):
        folder = workdir / f"onnx-{accel}"
        export_onnx(checkpoint, folder, workdir / "schedule.json" if accel == "bac" else None, batch_sizes)
        torch_policy = load_policy(checkpoint)
        ort_policy = use_onnxruntime(load_policy(checkpoint), folder)
        solver = torch_policy.make_solver(solver_name, steps)
        options = {"schedule": schedule, "solver": solver_name, "steps": steps} if accel == "bac" else {}
        # one accelerator per policy: it binds to that policy's blocks (hooks, or the export's own cache)
        torch_accel, ort_accel = make_accelerator(accel, **options), make_accelerator(accel, **options)
        for batch in batch_sizes:
            observations = calibration_observations(DEMOS_PATH, torch_policy, batch, seed=1)
            times, chunks = timed_interleaved([(torch_policy, solver, torch_accel), (ort_policy, solver, ort_accel)],
                                       observations, repeats)
            parity = float((chunks[1] - chunks[0]).abs().max() / chunks[0].abs().max())
            torch_p50 = float(np.median(times[0]))
            for backend, samples in zip(("torch", "onnxruntime"), times):
                p50 = float(np.median(samples))
                rows.append({"policy": checkpoint, "backend": backend, "device": "cpu", "solver": solver_name,
                             "steps": steps, "accel": accel, "batch": batch, "p50_ms": p50,
                             "p99_ms": float(np.percentile(samples, 99)), "speedup_vs_torch": torch_p50 / p50,
                             "max_rel_error_vs_torch": 0.0 if backend == "torch" else parity,
                             "segments": None if accel == "none" else len(json.loads(
                                 (folder / "manifest.json").read_text())["pieces"])})
                print(f"  {checkpoint:<18} {solver_name}{steps:<4} {accel:<5} b{batch:<3} {backend:<12} "
                      f"p50 {p50:8.2f} ms  x{torch_p50 / p50:5.2f}  rel err {rows[-1]['max_rel_error_vs_torch']:.1e}",
                      flush=True)
    return rows


def measure_gpu(checkpoint: str, solver_name: str, steps: int, budget: int, batch_sizes: tuple[int, ...],
                repeats: int, workdir: Path) -> list[dict]:
    from rtdiff.export.cudagraph import use_cudagraph

    schedule = bac_schedule(checkpoint, solver_name, steps, budget, workdir / "schedule.json")
    device = torch.cuda.get_device_name()
    rows = []
    for accel in ("none", "bac"):
        options = {"schedule": schedule, "solver": solver_name, "steps": steps} if accel == "bac" else {}
        eager = load_policy(checkpoint).to("cuda")
        compiled = load_policy(checkpoint).to("cuda")
        compiled.denoiser.forward = torch.compile(compiled.denoiser.forward)
        backends = {"torch": eager, "torch.compile": compiled}
        if solver_name != "ddpm":
            backends["cudagraph"] = use_cudagraph(load_policy(checkpoint))
        solver = eager.make_solver(solver_name, steps)
        runners = [(policy, solver, make_accelerator(accel, **options)) for policy in backends.values()]
        for batch in batch_sizes:
            observations = calibration_observations(DEMOS_PATH, eager, batch, seed=1)
            timed_interleaved(runners, observations, 3)  # compile and capture happen here, untimed
            times, chunks = timed_interleaved(runners, observations, repeats)
            eager_p50 = float(np.median(times[0]))
            for (backend, _), samples, chunk in zip(backends.items(), times, chunks):
                p50 = float(np.median(samples))
                rows.append({"policy": checkpoint, "backend": backend, "device": f"cuda ({device})",
                             "solver": solver_name, "steps": steps, "accel": accel, "batch": batch, "p50_ms": p50,
                             "p99_ms": float(np.percentile(samples, 99)), "speedup_vs_torch": eager_p50 / p50,
                             "max_rel_error_vs_torch": float((chunk - chunks[0]).abs().max() / chunks[0].abs().max())})
                print(f"  {checkpoint:<18} {solver_name}{steps:<4} {accel:<5} b{batch:<3} {backend:<13} cuda "
                      f"p50 {p50:8.2f} ms  x{eager_p50 / p50:5.2f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="DDIM 10 only, batch 1, few repeats")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--repeats", type=int, default=40, help="timed chunks per backend and configuration (>= 30)")
    parser.add_argument("--json", default="benchmarks/results/backends.json")
    args = parser.parse_args()
    settings, batch_sizes = SETTINGS, (1, 16)
    if args.quick:
        settings, batch_sizes, args.repeats = SETTINGS[:1], (1,), min(args.repeats, 10)
    torch.set_num_threads(1)
    import onnxruntime

    rows = []
    for checkpoint in args.policies.split(","):
        for solver_name, steps, budget in settings:
            with tempfile.TemporaryDirectory() as workdir:
                rows += measure(checkpoint, solver_name, steps, budget, batch_sizes, args.repeats, Path(workdir))
                if torch.cuda.is_available():
                    rows += measure_gpu(checkpoint, solver_name, steps, budget, batch_sizes, args.repeats,
                                        Path(workdir))
    result = {
        "machine": f"{platform.machine()} {platform.processor() or 'cpu'}, 1 thread per backend, torch {torch.__version__}, "
                   f"onnxruntime {onnxruntime.__version__}, python {sys.version.split()[0]}",
        "quick": args.quick, "repeats": args.repeats, "rows": rows,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
