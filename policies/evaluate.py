"""Closed-loop evaluation of a policy checkpoint in its task's simulator: scores, success and inference latency."""

from __future__ import annotations

import numpy as np
import torch

from rtdiff.policies.accelerate import accelerator_spec
from rtdiff.policies.checkpoint import load_policy
from rtdiff.policies.controller import PolicyController
from rtdiff.runtime.run import RunConfig
from rtdiff.runtime.stats import percentiles, shard, summarize_episodes


def _evaluate_seeds(run: RunConfig, seeds: list[int], threads: int) -> tuple[list, list, dict]:
    from rtdiff.policies.backend import with_backend
    from rtdiff.sims.tasks import get_task

    torch.set_num_threads(threads)
    policy = with_backend(load_policy(run.checkpoint), run.checkpoint, run.backend, run.solver, run.steps, run.accel,
                          threads=threads)
    run_episodes = get_task(policy.config.task).load().run_episodes
    # one controller, one trajectory at a time: its accelerator is each chunk's context in turn
    accelerator = accelerator_spec(run.accel, run.checkpoint, run.solver, run.steps, run.accel_options,
                                   run.accel_schedule)()
    controller = PolicyController(policy, policy.make_solver(run.solver, run.steps), accelerator)
    episodes = run_episodes(controller, seeds, progress=len(seeds) > 1)
    results = [(e.seed, e.score, e.success, e.steps) for e in episodes]
    return results, controller.latencies_ms, accelerator.stats()


def evaluate(run: RunConfig, episodes: int, seed: int, workers: int = 1, task: str | None = None) -> dict:
    """Runs `episodes` seeded episodes (seeds seed, seed+1, ...); with workers > 1, one torch thread each.

    The solver is the checkpoint's own where `run` names none; an exported backend is built here, once, before
    any worker starts (export/backends.py)."""
    policy = load_policy(run.checkpoint)  # fail here, once, on a bad checkpoint, solver or accelerator
    if task is not None and policy.config.task != task:
        raise ValueError(f"checkpoint {run.checkpoint} is a {policy.config.task} policy, not {task}")
    run = run.with_solver(*policy.solver_settings())
    policy.make_solver(run.solver, run.steps)
    accelerator_spec(run.accel, run.checkpoint, run.solver, run.steps, run.accel_options, run.accel_schedule)
    if run.backend != "torch":
        from rtdiff.policies.backend import with_backend

        with_backend(policy, run.checkpoint, run.backend, run.solver, run.steps, run.accel)
    seeds = list(range(seed, seed + episodes))
    threads = 2 if workers == 1 else 1
    if workers == 1:
        outputs = [_evaluate_seeds(run, seeds, threads)]
    else:
        from rtdiff.runtime.parallel import starmap_processes

        outputs = starmap_processes(_evaluate_seeds, [(run, part, threads) for part in shard(seeds, workers)])
    chunks = [len(part) for _, part, _ in outputs]
    accel_stats = {  # per-worker figures weighted by the chunks each inferred
        key: float(np.average([stats[key] for _, _, stats in outputs], weights=chunks))
        for key in ("model_calls", "block_evals_fraction")
    }
    return {
        "task": policy.config.task,
        "checkpoint": str(run.checkpoint),
        "solver": run.solver,
        "steps": run.steps,
        **summarize_episodes(r for part, _, _ in outputs for r in part),
        "latency_ms": percentiles(ms for _, part, _ in outputs for ms in part),
        "accel": run.accel,
        "accel_options": run.accel_options,
        "backend": run.backend,
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
