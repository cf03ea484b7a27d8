"""Accelerators on the bundled PushT policies: speed-up, action fidelity and closed-loop score, in one run.

    python benchmarks/accel.py [--quick] --json benchmarks/results/accel.json

For each policy, each solver setting (DDIM 10 steps, DDPM 100 steps) and each
accelerator configuration (uniform intervals, BAC budgets, SADA settings,
BAC+SADA), against `none` measured in the same process:

- speedup: one action-chunk inference at batch 1; every configuration of a
  setting is timed in rotating order, `repeats` times, and medians compared;
- block_evals_fraction and model_calls: what the accelerator counted;
- action_mse: executed actions (normalised units, [-1, 1]) against `none` from
  the same observation and the same initial noise, over held-out observations;
- score_mean and score_delta: closed-loop PushT over the same seeded episodes.

BAC schedules are calibrated here, one per cap on the fraction of block
evaluations (`calibrate_to_fraction`, its candidates from both objectives:
feature similarity and similarity weighted by each step's measured
sensitivity), on the calibration observations (seed 0); fidelity uses other
observations (seed 1). bac+sada gets its own
schedules at the same caps, with refreshes kept off the steps SADA may skip.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rtdiff.policies.accelerate import (
    bac_output_error,
    bac_step_sensitivity,
    calibration_observations,
    policy_accelerator,
    record_calibration,
)
from rtdiff.policies.checkpoint import load_policy
from rtdiff.runtime.accel.hooks import feed_forward_blocks
from rtdiff.runtime.checkpoints import checkpoint_hash
from rtdiff.policies.evaluate import evaluate
from rtdiff.runtime.accel.bac import calibrate_to_fraction
from rtdiff.runtime.accel.composed import skip_lattice
from rtdiff.policies.cli import EVAL_SEED
from rtdiff.runtime.run import RunConfig
from rtdiff.sims.tasks import TASKS

DEMOS_PATH = TASKS["pusht"].demos

POLICIES = ("pusht-transformer", "pusht-unet")
SETTINGS = (("ddim", 10), ("ddpm", 100))


@dataclass
class Config:
    accel: str
    params: dict = field(default_factory=dict)  # what the table shows
    options: dict = field(default_factory=dict)  # what the accelerator is built with (a BAC schedule is large)

    @property
    def label(self) -> str:
        return self.accel + "".join(f" {k}={v}" for k, v in self.params.items())


# SADA settings: (threshold, max_consecutive skips, window, tokenwise). The first is the default. The others skip
# more, which a probe on the transformer (DDPM 100) needed to pass 1.5x, and on this 10-token policy without
# token-wise partial calls: with them the same setting was slower (1.79x against 1.89x) and its action MSE ten
# times larger (4.6e-4 against 4.2e-5), as gathering a few tokens costs about what it saves.
SADA_SETTINGS = (
    (0.0, 1, (0.2, 0.94), True),
    (1e-2, 3, (0.1, 0.97), True),
    (1e-2, 2, (0.1, 0.97), False),
    (1e-2, 3, (0.1, 0.97), False),
)


# bac+sada's SADA: the step-skipping setting (no token-wise calls) whose skips cost the least action error.
COMPOSED_THRESHOLD, COMPOSED_WINDOW = 1e-2, (0.1, 0.97)


def sada_config(accel: str, threshold: float, max_consecutive: int, window: tuple, tokenwise: bool, **extra) -> Config:
    params = {"threshold": threshold, "max_consecutive": max_consecutive, "window": list(window), "tokenwise": tokenwise}
    options = {**extra, "threshold": threshold, "max_consecutive": max_consecutive, "window": window,
               "tokenwise": tokenwise}
    return Config(accel, params, options)


def configurations(policy, checkpoint: str, solver: str, steps: int, quick: bool, accels: set[str]) -> list[Config]:
    # BAC is capped at the block-evaluation fractions uniform caching reaches, so the two compare at equal work.
    if steps <= 10:
        intervals, caps = (2, 3), (0.5, 0.4, 0.3)
    else:
        intervals, caps = (3, 5, 8), (0.34, 0.2, 0.125)
    sada = SADA_SETTINGS
    if quick:
        intervals, caps, sada = intervals[:1], caps[:1], sada[:1]
    configs = [Config("none")]
    configs += [Config("uniform", {"interval": k}, {"interval": k}) for k in intervals]
    configs += [sada_config("sada", *setting) for setting in sada]
    if not accels & {"bac", "bac+sada"}:
        return [c for c in configs if c.accel == "none" or c.accel in accels]
    outputs = record_calibration(policy, solver, steps, DEMOS_PATH)  # once: every cap calibrates on it
    error = bac_output_error(policy, solver, steps, DEMOS_PATH)
    sensitivity = bac_step_sensitivity(policy, solver, steps, DEMOS_PATH)
    feed_forward, weights = feed_forward_blocks(policy.denoiser), checkpoint_hash(checkpoint)
    schedules = {cap: {**calibrate_to_fraction(outputs, cap, feed_forward, error, None, sensitivity),
                       "solver": solver, "checkpoint_sha256": weights} for cap in caps}
    configs += [Config("bac", bac_params(cap, s), {"schedule": s}) for cap, s in schedules.items()]
    # bac+sada: at each cap, a schedule whose refreshes stay off the lattice of steps SADA may skip, in runs of
    # one or two (`skip_lattice`), with the step-skipping SADA threshold and window; quick: one of them.
    for cap in caps:
        for max_consecutive in (1, 2) if not quick else (2,):
            skippable = skip_lattice(steps, COMPOSED_WINDOW, max_consecutive)
            allowed = set(range(steps)) - skippable
            schedule = {**calibrate_to_fraction(outputs, cap, feed_forward, error, allowed, sensitivity),
                        "solver": solver, "checkpoint_sha256": weights, "skippable": sorted(skippable)}
            config = sada_config("bac+sada", COMPOSED_THRESHOLD, max_consecutive, COMPOSED_WINDOW, False,
                                 schedule=schedule)
            config.params = {**bac_params(cap, schedule), **config.params}
            configs.append(config)
    return [c for c in configs if c.accel == "none" or c.accel in accels]  # none: every ratio and delta needs it


def bac_params(cap: float, schedule: dict) -> dict:
    bubble = "joint" if schedule["joint"] else len(schedule["bubbled"])  # joint: every block at the same steps
    objective = "weighted" if schedule.get("objective") == "sensitivity-weighted" else "similarity"
    return {"fraction_cap": cap, "budget": schedule["budget"], "bubble": bubble, "objective": objective}


def action_mse(runners: list, observations: torch.Tensor) -> list[float]:
    """Mean squared error of the executed actions (normalised) against the first runner's (`none`)."""
    def executed(runner, k):
        policy, solver, accelerator = runner
        actions = policy.predict_actions(observations[k : k + 1], solver, torch.Generator().manual_seed(k), accelerator)
        return policy.action_normalizer.normalize(actions)

    reference = [executed(runners[0], k) for k in range(len(observations))]
    return [float(np.mean([((executed(r, k) - reference[k]) ** 2).mean().item() for k in range(len(observations))]))
            for r in runners]


def interleaved_medians_ms(runners: list, observations: torch.Tensor, repeats: int) -> list[float]:
    times = [[] for _ in runners]
    for r in range(repeats):
        obs = observations[r % len(observations)][None]
        shift = r % len(runners)
        for j in list(range(shift, len(runners))) + list(range(shift)):
            policy, solver, accelerator = runners[j]
            start = time.perf_counter()
            policy.predict_actions(obs, solver, torch.Generator().manual_seed(r), accelerator)
            times[j].append((time.perf_counter() - start) * 1e3)
    return [float(np.median(t)) for t in times]


def measure_setting(checkpoint: str, solver_name: str, steps: int, args) -> list[dict]:
    policy = load_policy(checkpoint)
    solver = policy.make_solver(solver_name, steps)
    configs = configurations(policy, checkpoint, solver_name, steps, args.quick, set(args.accels.split(",")))
    # One policy instance per configuration: a model carries one accelerator's hooks at a time.
    runners = [(load_policy(checkpoint), solver, policy_accelerator(c.accel, checkpoint, solver_name, steps, **c.options))
               for c in configs]
    held_out = calibration_observations(DEMOS_PATH, policy, args.samples, seed=1)
    mse = action_mse(runners, held_out)
    counted = [accelerator.stats() for _, _, accelerator in runners]  # from the fidelity runs only
    medians = interleaved_medians_ms(runners, held_out, args.repeats)
    rows = []
    for config, error, stats, median in zip(configs, mse, counted, medians):
        row = {"policy": checkpoint, "solver": solver_name, "steps": steps, "accel": config.accel, "params": config.params,
               "label": config.label, "speedup": medians[0] / median, "p50_ms": median, "none_p50_ms": medians[0],
               "block_evals_fraction": stats["block_evals_fraction"], "model_calls": stats["model_calls"],
               "action_mse": error}
        if args.episodes:
            options = {k: v for k, v in config.options.items() if k != "schedule"}
            run = RunConfig(checkpoint, solver_name, steps, accel=config.accel, accel_options=options,
                            accel_schedule=config.options.get("schedule"))
            report = evaluate(run, args.episodes, EVAL_SEED, workers=args.workers)
            row.update(score_mean=report["score_mean"], success_rate=report["success_rate"], episodes=report["episodes"],
                       scores=report["scores"])
        rows.append(row)
        print(f"  {config.label:<34} speedup {row['speedup']:5.2f}  blocks {row['block_evals_fraction']:.2f}  "
              f"mse {error:.2e}  score {row.get('score_mean', float('nan')):.3f}", flush=True)
    for row in rows:
        row["score_delta"] = row["score_mean"] - rows[0]["score_mean"] if args.episodes else None
        row["score_delta_se"] = paired_standard_error(row["scores"], rows[0]["scores"]) if args.episodes else None
    return rows


def paired_standard_error(scores: list[float], reference: list[float]) -> float:
    """Standard error of the mean score difference over the same seeds: how far a delta is from noise.

    Two configurations whose actions differ by 1e-5 still roll out differently (contact is chaotic), so
    per-episode differences spread widely even when the policies are equally good."""
    differences = np.asarray(scores) - np.asarray(reference)
    return float(differences.std(ddof=1) / np.sqrt(len(differences))) if len(differences) > 1 else float("nan")


def merged(kept: list[dict], new: list[dict]) -> list[dict]:
    """Rows kept from an earlier run, less every accelerator this run measured again for the same policy and
    solver setting (its configurations may have changed), then the new rows."""
    def key(row):
        return row["policy"], row["solver"], row["steps"], row["accel"]

    again = {key(row) for row in new}
    return [row for row in kept if key(row) not in again] + new


ORDER = ("none", "uniform", "bac", "sada", "bac+sada")
SHORT = {"fraction_cap": "cap", "max_consecutive": "run", "threshold": "thr", "tokenwise": "tok", "objective": "obj"}


def markdown_table(rows: list[dict]) -> str:
    """The rows as RESULTS.md shows them: one table per policy, solver setting by setting."""
    def params(row):
        return ", ".join(f"{SHORT.get(k, k)} {v}" for k, v in row["params"].items())

    lines = ["| policy | solver | accel | params | speedup | blocks | model calls | action MSE | score | delta |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    ordered = sorted(rows, key=lambda r: (r["policy"], r["steps"], ORDER.index(r["accel"])))  # stable within accel
    for r in ordered:
        score = "" if r.get("score_mean") is None else f"{r['score_mean']:.3f}"
        delta = "" if r.get("score_delta") is None else f"{r['score_delta']:+.3f}"
        if r.get("score_delta_se") is not None and r["accel"] != "none":
            delta += f" ± {r['score_delta_se']:.3f}"
        lines.append(f"| {r['policy']} | {r['solver']} {r['steps']} | {r['accel']} | {params(r)} | "
                     f"{r['speedup']:.2f}x | {r['block_evals_fraction']:.3f} | {r['model_calls']:.1f} | "
                     f"{r['action_mse']:.1e} | {score} | {delta} |")
    return "\n".join(lines)


def pareto_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["policy"], r["solver"], r["steps"]) for r in rows})
    figure, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.8), squeeze=False)
    markers = {"none": "k*", "uniform": "s", "bac": "o", "sada": "^", "bac+sada": "D"}
    for ax, (policy, solver, steps) in zip(axes[0], groups):
        for accel, marker in markers.items():
            points = [(r["speedup"], r["score_mean"]) for r in rows
                      if (r["policy"], r["solver"], r["steps"], r["accel"]) == (policy, solver, steps, accel)]
            if points:
                ax.plot(*zip(*points), marker, linestyle="", label=accel, markersize=7)
        ax.set_title(f"{policy}, {solver} {steps}", fontsize=9)
        ax.set_xlabel("speedup over none (batch 1)")
        ax.set_ylabel("PushT score")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one configuration per accelerator, few repeats and episodes")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--settings", default=",".join(f"{s}{k}" for s, k in SETTINGS), help="e.g. ddim10,ddpm100")
    parser.add_argument("--accels", default="uniform,bac,sada,bac+sada", help="which accelerators (none always runs)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows already in --json but those of the accelerators this run measures again")
    parser.add_argument("--repeats", type=int, default=40, help="timed chunk inferences per configuration (>= 30)")
    parser.add_argument("--samples", type=int, default=32, help="held-out observations for action MSE")
    parser.add_argument("--episodes", type=int, default=50, help="closed-loop episodes per configuration (0: none)")
    parser.add_argument("--workers", type=int, default=2, help="processes for the closed-loop episodes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for timing")
    parser.add_argument("--json", default="benchmarks/results/accel.json")
    parser.add_argument("--report", action="store_true",
                        help="measure nothing: print --json's rows as a markdown table and redraw its Pareto plot")
    args = parser.parse_args()
    if args.report:
        rows = json.loads(Path(args.json).read_text())["rows"]
        print(markdown_table(rows))
        pareto_plot(rows, Path(args.json).with_suffix(".png"))
        return
    unknown = set(args.accels.split(",")) - set(ORDER[1:])
    if unknown:
        parser.error(f"unknown accelerator(s) in --accels: {', '.join(sorted(unknown))}")
    if args.quick:
        args.repeats, args.samples, args.episodes = min(args.repeats, 10), min(args.samples, 8), min(args.episodes, 4)

    torch.set_num_threads(args.threads)
    settings = [(s.rstrip("0123456789"), int(s[len(s.rstrip("0123456789")):])) for s in args.settings.split(",")]
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": f"{platform.machine()} {platform.processor() or 'cpu'}, {torch.get_num_threads()} torch thread(s), "
                   f"torch {torch.__version__}, python {sys.version.split()[0]}",
        "quick": args.quick, "repeats": args.repeats, "samples": args.samples, "episodes": args.episodes,
        "eval_seed": EVAL_SEED, "rows": [],
    }
    kept = json.loads(out.read_text())["rows"] if args.merge and out.exists() else []
    for checkpoint in args.policies.split(","):
        for solver_name, steps in settings:
            print(f"{checkpoint} {solver_name} {steps}", flush=True)
            result["rows"] += measure_setting(checkpoint, solver_name, steps, args)
            # after every setting: a long run keeps what it has
            out.write_text(json.dumps({**result, "rows": merged(kept, result["rows"])}, indent=1) + "\n")
    result["rows"] = merged(kept, result["rows"])
    if args.episodes:
        pareto_plot(result["rows"], out.with_suffix(".png"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
