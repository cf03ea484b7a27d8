"""Summaries every report shares: latency percentiles, episode scores, seeds split across workers."""

from __future__ import annotations

import numpy as np


def percentiles(values) -> dict:
    """{"p50", "p99", "count"} of a list of latencies (None for an empty one)."""
    values = list(values)
    if not values:
        return {"p50": None, "p99": None, "count": 0}
    return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99)), "count": len(values)}


def summarize_episodes(results) -> dict:
    """Scores of (seed, score, success, steps) tuples, in seed order."""
    results = sorted(results)
    scores = [float(score) for _, score, _, _ in results]
    return {
        "episodes": len(results),
        "seeds": [seed for seed, _, _, _ in results],
        "scores": scores,
        "score_mean": float(np.mean(scores)) if scores else float("nan"),
        "success_rate": float(np.mean([bool(ok) for _, _, ok, _ in results])) if results else float("nan"),
        "steps_mean": float(np.mean([steps for _, _, _, steps in results])) if results else float("nan"),
    }


def shard(items: list, workers: int) -> list[list]:
    """`items` dealt round-robin to `workers` parts (each worker gets early and late seeds alike)."""
    return [items[k::workers] for k in range(workers)]
