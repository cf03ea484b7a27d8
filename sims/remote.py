"""Simulators as clients of an rtdiff server: seeded episodes in real time, several client processes at once.

Each worker process opens its own connection and runs its share of the seeds
through a RemoteController (runtime/loop.py) at the task's control rate. The
report has the keys of `rtdiff eval` plus client- and server-side latency
percentiles and the stalls (ticks with no action ready).
"""

from __future__ import annotations

from pathlib import Path

from rtdiff_client.client import Client
from rtdiff_client.loop import RemoteController
from rtdiff.runtime.stats import percentiles, shard, summarize_episodes


def _run_part(task: str, address: str, model: str, seeds: list[int], rate_hz: float, curve_dir: str | None,
              realtime: bool, video: str | None = None) -> dict:
    from rtdiff.sims.tasks import get_task

    module = get_task(task).load()
    with Client(address, model=model, curve_dir=curve_dir) as client:
        info = client.info()["models"][model]
        controller = RemoteController(client, info["inputs"][0]["shape"][0], rate_hz, realtime=realtime)
        episodes = []
        if video and seeds:  # the first episode rendered and written as a video
            import imageio.v2 as imageio

            env = module.make_env(render=True)
            episodes.append(module.run_episode(env, controller, seeds[0], render=True))
            env.close()
            Path(video).parent.mkdir(parents=True, exist_ok=True)
            imageio.mimsave(video, episodes[0].frames, fps=module.CONTROL_HZ)
            episodes[0].frames.clear()
            seeds = seeds[1:]
        episodes += module.run_episodes(controller, seeds, progress=False)
    return {
        "results": [(e.seed, e.score, bool(e.success), e.steps) for e in episodes],
        "client_ms": controller.client_ms,
        "server_ms": controller.server_ms,
        "stalls": controller.stalls,
        "errors": controller.errors,
        "timeouts": controller.timeouts,
        "info": info,
    }


def run_remote(task: str, address: str, model: str | None, episodes: int, seed: int, rate_hz: float | None = None,
               workers: int = 1, curve_dir: str | None = None, realtime: bool = True, video: str | None = None) -> dict:
    """`episodes` seeded episodes split over `workers` client processes; `video`: the first one, rendered."""
    from rtdiff.sims.tasks import get_task

    rate_hz = rate_hz or get_task(task).load().CONTROL_HZ
    with Client(address, model=model, curve_dir=curve_dir, retries=1) as client:
        served = client.info()["models"]
    if model is None:
        if len(served) != 1:
            raise ValueError(f"the server serves {sorted(served)}; name one with --model")
        model = next(iter(served))
    if model not in served:
        raise ValueError(f"the server does not serve {model!r}; it serves {sorted(served)}")
    if served[model].get("task") != task:
        raise ValueError(f"model {model!r} is a {served[model].get('task')} policy, not {task}")
    seeds = list(range(seed, seed + episodes))
    jobs = [(task, address, model, part, rate_hz, curve_dir, realtime, video if k == 0 else None)
            for k, part in enumerate(shard(seeds, workers))]
    if workers == 1:
        parts = [_run_part(*jobs[0])]
    else:
        from rtdiff.runtime.parallel import starmap_processes

        parts = starmap_processes(_run_part, jobs)
    info = parts[0]["info"]
    return {
        "task": task,
        "checkpoint": info["checkpoint"],
        "model": model,
        "server": address,
        "solver": info["solver"],
        "steps": info["steps"],
        "accel": info["accel"],
        "backend": info.get("backend", "torch"),  # servers before backends existed did not say
        **summarize_episodes(r for part in parts for r in part["results"]),
        "latency_ms": percentiles([ms for part in parts for ms in part["client_ms"]]),
        "server_latency_ms": {key: percentiles([ms for part in parts for ms in part["server_ms"][key]])
                              for key in ("queue_ms", "compute_ms", "total_ms")},
        "stalls": sum(part["stalls"] for part in parts),
        "ticks": sum(steps for part in parts for _, _, _, steps in part["results"]),
        "request_errors": sum(part["errors"] for part in parts),
        "request_timeouts": sum(part["timeouts"] for part in parts),
        "rate_hz": rate_hz,
        "clients": workers,
    }


def format_remote_table(report: dict) -> str:
    latency, server = report["latency_ms"], report["server_latency_ms"]["total_ms"]
    header = (f"{'model':<12} {'episodes':>8} {'score':>6} {'success':>7} {'client p50':>10} {'client p99':>10} "
              f"{'server p50':>10} {'server p99':>10} {'stalls':>6}")
    row = (f"{report['model']:<12} {report['episodes']:>8} {report['score_mean']:>6.3f} {report['success_rate']:>7.2f} "
           f"{latency['p50']:>10.1f} {latency['p99']:>10.1f} {server['p50']:>10.1f} {server['p99']:>10.1f} "
           f"{report['stalls']:>6}")
    return "\n".join([header, row])
