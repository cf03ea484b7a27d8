"""Closed-loop evaluation of a policy checkpoint in its task's simulator: scores, success and inference latency."""

from __future__ import annotations

import numpy as np
import torch

from rtdiff.policies.checkpoint import load_policy
from rtdiff.policies.controller import PolicyController
from rtdiff.policies.accelerate import policy_accelerator


def _evaluate_seeds(checkpoint: str, solver_name: str, steps: int, accel: str, accel_options: dict, seeds: list[int],
                    threads: int, backend: str = "torch") -> tuple[list, list, dict]:
    from rtdiff.export.backends import with_backend
    from rtdiff.sims.tasks import get_task

    torch.set_num_threads(threads)
    policy = with_backend(load_policy(checkpoint), checkpoint, backend, solver_name, steps, accel, threads=threads)
    run_episodes = get_task(policy.config.task).load().run_episodes
    accelerator = policy_accelerator(accel, checkpoint, solver_name, steps, **accel_options)
    controller = PolicyController(policy, policy.make_solver(solver_name, steps), accelerator)
    episodes = run_episodes(controller, seeds, progress=len(seeds) > 1)
    results = [(e.seed, e.score, e.success, e.steps) for e in episodes]
    return results, controller.latencies_ms, accelerator.stats()


def evaluate(checkpoint: str, episodes: int, seed: int, solver: str, steps: int, accel: str = "none",
             workers: int = 1, accel_options: dict | None = None, task: str | None = None, backend: str = "torch") -> dict:
    """Runs `episodes` seeded episodes (seeds seed, seed+1, ...); with workers > 1, one torch thread each.

    `accel_options` go to the accelerator (a BAC `schedule`, SADA's `threshold`, ...); `backend` is torch or
    onnxruntime (export/backends.py: the export is built here, once, before any worker starts)."""
    accel_options = accel_options or {}
    policy = load_policy(checkpoint)  # fail here, once, on a bad checkpoint, solver or accelerator
    if task is not None and policy.config.task != task:
        raise ValueError(f"checkpoint {checkpoint} is a {policy.config.task} policy, not {task}")
    policy.make_solver(solver, steps)
    policy_accelerator(accel, checkpoint, solver, steps, **accel_options)
    if backend != "torch":
        from rtdiff.export.backends import with_backend

        with_backend(load_policy(checkpoint), checkpoint, backend, solver, steps, accel)
    seeds = list(range(seed, seed + episodes))
    threads = 2 if workers == 1 else 1
    if workers == 1:
        outputs = [_evaluate_seeds(checkpoint, solver, steps, accel, accel_options, seeds, threads, backend)]
    else:
        from rtdiff.runtime.parallel import starmap_processes

        parts = [seeds[k::workers] for k in range(workers)]
        outputs = starmap_processes(_evaluate_seeds, [(checkpoint, solver, steps, accel, accel_options, part, threads,
                                                       backend) for part in parts])
    results = sorted(r for part, _, _ in outputs for r in part)
    latencies = [ms for _, part, _ in outputs for ms in part]
    chunks = [len(part) for _, part, _ in outputs]
    accel_stats = {  # per-worker figures weighted by the chunks each inferred
        key: float(np.average([stats[key] for _, _, stats in outputs], weights=chunks))
        for key in ("model_calls", "block_evals_fraction")
    }
    scores = [score for _, score, _, _ in results]
    return {
        "task": policy.config.task,
        "checkpoint": str(checkpoint),
        "solver": solver,
        "steps": steps,
        "episodes": len(results),
        "seeds": [s for s, _, _, _ in results],
        "scores": scores,
        "score_mean": float(np.mean(scores)),
        "success_rate": float(np.mean([ok for _, _, ok, _ in results])),
        "latency_ms": {
            "p50": float(np.percentile(latencies, 50)),
            "p99": float(np.percentile(latencies, 99)),
            "chunks": len(latencies),
        },
        "accel": accel,
        "backend": backend,
        **accel_stats,
        "workers": workers,
        "torch_threads": threads,
    }


def format_table(reports: list[dict]) -> str:
    header = (f"{'checkpoint':<22} {'solver':<6} {'steps':>5} {'accel':<8} {'calls':>5} {'episodes':>8} {'score':>6} "
              f"{'success':>7} {'p50 ms':>7} {'p99 ms':>7}")
    rows = [
        f"{r['checkpoint']:<22} {r['solver']:<6} {r['steps']:>5} {r['accel']:<8} {r['model_calls']:>5.1f} "
        f"{r['episodes']:>8} {r['score_mean']:>6.3f} "
        f"{r['success_rate']:>7.2f} {r['latency_ms']['p50']:>7.1f} {r['latency_ms']['p99']:>7.1f}"
        for r in reports
    ]
    return "\n".join([header, *rows])
