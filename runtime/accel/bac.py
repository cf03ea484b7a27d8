"""Block-wise Adaptive Caching (BAC; Ji et al., arXiv 2506.13456).

Offline, per checkpoint and solver: record every cacheable block's output at
every step of full trajectories (`record_block_outputs`), then choose for each
block the update steps that keep its cached output most similar to the fresh
ones it stands in for (`optimal_update_steps`, exact dynamic programming), and
finally add upstream refreshes where a feed-forward block would otherwise
amplify stale inputs (`bubbling_union`). The schedule is data: JSON beside the
checkpoint, tied to the weights' hash, loaded by `BACache` at run time.

Similarity variant (NOTES.md: paper and code differ): we score the cached
step against every step that reuses it, as the official code does, since
that is the error the cache actually makes; the paper scores adjacent steps.

rtdiff's addition (`calibrate_to_fraction` with a `step_sensitivity`): feature
similarity says nothing about how far a stale feature at step k reaches the
action. On the PushT policies almost all of it comes from the last steps
(DDPM 100, UNet: reusing every block at step 99 alone costs 3.1e-4 action MSE,
at step 50 3.5e-9), because no later model call can correct them. The
programme can weight each step's dissimilarity by that measured sensitivity;
both objectives offer candidates and the measured action error picks.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from rtdiff.runtime.accel.base import Accelerator, check_reuse

FORMAT = "rtdiff-bac-schedule/1"


class Recorder(Accelerator):
    """Computes every block at every step and keeps each output: what calibration records."""

    name = "record"
    uses_block_cache = True

    def bind(self, denoiser) -> Recorder:
        super().bind(denoiser)
        if self.cache.recorder is None:
            self.cache.recorder = {}
        return self


@torch.no_grad()
def record_block_outputs(run_trajectory) -> dict[str, torch.Tensor]:
    """{block: (steps, batch, ...)}: each block's output at every step of `run_trajectory(accelerator)`."""
    recorder = Recorder()
    try:
        run_trajectory(recorder)
        return {name: torch.stack(outputs) for name, outputs in recorder.cache.recorder.items()}
    finally:
        recorder.unbind()


def similarity_matrix(outputs: torch.Tensor) -> np.ndarray:
    """S[i, k]: cosine similarity of the block's output at step i and at step k, averaged over the batch."""
    flat = outputs.flatten(2).double()  # (steps, batch, features)
    unit = flat / flat.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.einsum("ibf,kbf->ikb", unit, unit).mean(-1).numpy()


def optimal_update_steps(similarity: np.ndarray, budget: int, allowed: set[int] | None = None,
                         weights: np.ndarray | None = None) -> list[int]:
    """The `budget` update steps (step 0 always among them) that maximise the summed similarity of reuse."""
    return optimal_update_steps_per_budget(similarity, budget, allowed, weights)[-1]


def optimal_update_steps_per_budget(similarity: np.ndarray, max_budget: int, allowed: set[int] | None = None,
                                    weights: np.ndarray | None = None) -> list[list[int]]:
    """The optimal update steps for every budget 1 .. max_budget, from one dynamic programme.

    A segment [i, j) computes at step i and serves steps i+1 .. j-1 from that
    output, scoring -sum_k w_k (1 - S[i, k]). With every weight 1 (the paper's
    objective) that is sum_k S[i, k] less the number of reused steps, which a
    budget fixes, so the choice is BAC's. best[m, j] is the best score of
    covering steps [0, j) with m segments; budget m's answer is best[m, K],
    traced back. `allowed` restricts the update steps (step 0 always computes).
    """
    steps = len(similarity)
    allowed = set(range(steps)) if allowed is None else {0} | {i for i in allowed if 0 <= i < steps}
    max_budget = min(max(max_budget, 1), len(allowed))
    weights = np.ones(steps) if weights is None else np.asarray(weights, dtype=float)
    # reuse[i, j] = -sum of w_k (1 - S[i, k]) for i < k < j; no segment may start at a step that cannot update
    reuse = np.full((steps, steps + 1), -np.inf)
    for i in sorted(allowed):
        reuse[i, i + 1] = 0.0
        reuse[i, i + 2 :] = -np.cumsum(weights[i + 1 :] * (1.0 - similarity[i, i + 1 :]))[: steps - i - 1]
    best = np.full((max_budget + 1, steps + 1), -np.inf)
    choice = np.zeros((max_budget + 1, steps + 1), dtype=int)
    best[1, 1:] = reuse[0, 1:]
    for m in range(2, max_budget + 1):
        for j in range(m, steps + 1):
            candidates = best[m - 1, m - 1 : j] + reuse[m - 1 : j, j]
            k = int(np.argmax(candidates))
            best[m, j], choice[m, j] = candidates[k], m - 1 + k
    return [_trace_back(choice, budget, steps) for budget in range(1, max_budget + 1)]


def _trace_back(choice: np.ndarray, budget: int, steps: int) -> list[int]:
    updates, j = [], steps
    for m in range(budget, 1, -1):
        j = int(choice[m, j])
        updates.append(j)
    return sorted([0, *updates])


def reuse_error(outputs: torch.Tensor) -> float:
    """Mean L1 change of a block's output between adjacent steps, relative to its mean magnitude."""
    flat = outputs.flatten(1).double()
    return float((flat[1:] - flat[:-1]).abs().mean() / flat.abs().mean().clamp_min(1e-12))


def bubbling_union(schedule: dict[str, list[int]], errors: dict[str, float], feed_forward: set[str],
                   count: int) -> tuple[dict[str, list[int]], list[str]]:
    """Give the `count` blocks with the largest reuse error the update steps of every feed-forward block after them."""
    order = list(schedule)
    bubbled = sorted(order, key=lambda name: -errors[name])[:count]
    merged = {name: set(steps) for name, steps in schedule.items()}
    for name in bubbled:
        for downstream in order[order.index(name) + 1 :]:
            if downstream in feed_forward:
                merged[name] |= set(schedule[downstream])
    return {name: sorted(steps) for name, steps in merged.items()}, bubbled


def calibrate(outputs: dict[str, torch.Tensor], budget: int, feed_forward: set[str], bubble: int = 5,
              allowed: set[int] | None = None) -> dict:
    """The schedule and what it was chosen from: per-block similarity curves and reuse errors.

    `allowed`: the only steps that may refresh a block (bac+sada keeps refreshes off the steps SADA may skip)."""
    similarities = {name: similarity_matrix(value) for name, value in outputs.items()}
    per_block = {name: optimal_update_steps(sim, budget, allowed) for name, sim in similarities.items()}
    errors = {name: reuse_error(value) for name, value in outputs.items()}
    return _schedule(per_block, similarities, errors, feed_forward, budget, bubble)


def step_sensitivity(names: list[str], steps: int, output_error) -> list[float]:
    """s[k]: `output_error` when every block computes at every step but k and reuses step k-1's output there.

    s[0] = 0: step 0 always computes. One calibration run per step."""
    return [0.0] + [float(output_error({name: [i for i in range(steps) if i != k] for name in names}))
                    for k in range(1, steps)]


def sensitivity_weights(sensitivity: list[float], similarities: dict[str, np.ndarray]) -> np.ndarray:
    """w_k: action error per unit of feature dissimilarity at step k, normalised to mean 1.

    The sensitivity run stood in step k-1's features for step k's, a dissimilarity
    of 1 - S[k-1, k] (mean over blocks); a first-order model of the action error
    of any schedule is then the sum over reused steps of w_k (1 - S[i, k])."""
    joint = np.mean(list(similarities.values()), axis=0)
    dissimilarity = np.array([1.0] + [1.0 - joint[k - 1, k] for k in range(1, len(joint))])
    weights = np.asarray(sensitivity, dtype=float) / np.maximum(dissimilarity, 1e-9)
    return weights / weights.mean() if weights.mean() > 0 else np.ones(len(joint))


def calibrate_to_fraction(outputs: dict[str, torch.Tensor], fraction: float, feed_forward: set[str],
                          output_error, allowed: set[int] | None = None,
                          sensitivity: list[float] | None = None, final_error=None, finalists: int = 4) -> dict:
    """BAC under a cap on block evaluations, the bubbling union's size chosen by the error it leaves.

    For each union size n (0 .. every block) the largest per-block budget whose
    schedule evaluates at most `fraction` of all blocks; of those candidates, the
    one with the smallest `output_error(blocks)`: how far the final output of a
    calibration run with that schedule lands from the full model's. The paper
    fixes n (5); here no single n served both a 10-step and a 100-step solver.

    One more candidate is the union's limit, a joint schedule: every block
    refreshes at the same steps, chosen by the same programme on the blocks'
    mean similarity. On the UNet, whose blocks all feed forward into each
    other, per-block schedules at DDIM 10 left ten times uniform caching's error.
    The last is the joint schedule with evenly spaced steps: on music-tiny at
    DPM-Solver++ 50 every programmed candidate lost to uniform caching at the same
    fraction (RESULTS.md), so the baseline itself is always among the choices.

    With `sensitivity` (`step_sensitivity`) every candidate is made a second time
    from the sensitivity-weighted programme (`sensitivity_weights`), and the
    action error chooses among all of them.

    With `final_error` the `finalists` candidates `output_error` ranks best are
    scored again by it, and it chooses. It is for an error too costly to run on
    every candidate and closer to what the schedule will meet: on music-tiny the
    cheap screen (short clips, the final latent, the schedule alone) chose a
    schedule that lost to uniform caching on 10 s clips of other prompts.
    """
    similarities = {name: similarity_matrix(value) for name, value in outputs.items()}
    errors = {name: reuse_error(value) for name, value in outputs.items()}
    steps = len(next(iter(similarities.values())))
    objectives = {"similarity": None}
    if sensitivity is not None:
        if len(sensitivity) != steps:
            raise ValueError(f"step sensitivity has {len(sensitivity)} entries for {steps} steps")
        objectives["sensitivity-weighted"] = sensitivity_weights(sensitivity, similarities)
    candidates = []
    for objective, weights in objectives.items():
        for candidate in _candidates_within(fraction, similarities, errors, feed_forward, allowed, weights):
            if all(candidate["blocks"] != c["blocks"] for c in candidates):
                candidates.append({**candidate, "objective": objective})
    if not candidates:
        raise ValueError(f"no BAC schedule evaluates at most {fraction:.3f} of the blocks (one update each is "
                         f"{1 / steps:.3f} plus what bubbling adds)")
    scored = [(float(output_error(c["blocks"])), c) for c in candidates]
    error, chosen = min(scored, key=lambda pair: pair[0])
    final = {}
    if final_error is not None:
        best = sorted(scored, key=lambda pair: pair[0])[:finalists]
        final = {id(c): float(final_error(c["blocks"])) for _, c in best}
        error, chosen = min(best, key=lambda pair: final[id(pair[1])])
    chosen.update(fraction_cap=fraction, output_error=error,
                  candidates=[{"objective": c["objective"], "budget": c["budget"], "bubble": len(c["bubbled"]),
                               "joint": c["joint"], "evenly_spaced": c["evenly_spaced"],
                               "block_evals_fraction": c["block_evals_fraction"],
                               "output_error": e, **({"final_error": final[id(c)]} if id(c) in final else {})}
                              for e, c in scored])
    if final:
        chosen["final_error"] = final[id(chosen)]
    if sensitivity is not None:
        chosen["step_sensitivity"] = [float(x) for x in sensitivity]
    return chosen


def _candidates_within(fraction: float, similarities: dict, errors: dict, feed_forward: set[str],
                       allowed: set[int] | None, weights: np.ndarray | None) -> list[dict]:
    """Per union size, the largest per-block budget within `fraction`; then the joint schedule."""
    steps = len(next(iter(similarities.values())))
    per_budget = {name: optimal_update_steps_per_budget(sim, math.ceil(fraction * steps), allowed, weights)
                  for name, sim in similarities.items()}
    max_budget = len(next(iter(per_budget.values())))  # the programme caps it at the steps that may refresh
    candidates = []
    for bubble in range(len(similarities) + 1):
        fitting = None
        for budget in range(1, max_budget + 1):
            per_block = {name: choices[budget - 1] for name, choices in per_budget.items()}
            schedule = _schedule(per_block, similarities, errors, feed_forward, budget, bubble)
            if schedule["block_evals_fraction"] <= fraction + 1e-9:
                fitting = schedule
        if fitting is not None:
            candidates.append(fitting)
    joint_budget = min(max_budget, math.floor(fraction * steps + 1e-9))
    if joint_budget >= 1:
        joint_similarity = np.mean(list(similarities.values()), axis=0)
        joint_steps = optimal_update_steps(joint_similarity, joint_budget, allowed, weights)
        joint = _schedule({name: joint_steps for name in similarities}, similarities, errors, feed_forward,
                          len(joint_steps), 0)
        candidates.append({**joint, "joint": True})
        # and uniform caching's schedule over the steps that may refresh: the chooser then never picks a schedule
        # that lands farther from the full model on the calibration runs than the DeepCache baseline does
        may_refresh = sorted(range(steps) if allowed is None else allowed | {0})
        evenly = sorted({may_refresh[math.floor(k * len(may_refresh) / joint_budget)] for k in range(joint_budget)})
        uniform = _schedule({name: evenly for name in similarities}, similarities, errors, feed_forward,
                            len(evenly), 0)
        candidates.append({**uniform, "joint": True, "evenly_spaced": True})
    return candidates


def _schedule(per_block: dict, similarities: dict, errors: dict, feed_forward: set[str], budget: int,
              bubble: int) -> dict:
    schedule, bubbled = bubbling_union(per_block, errors, feed_forward, bubble)
    steps = len(next(iter(similarities.values())))
    return {
        "format": FORMAT,
        "steps": steps,
        "budget": budget,
        "joint": False,  # True: every block refreshes at the same steps (calibrate_to_fraction's extra candidates)
        "evenly_spaced": False,  # True: and those steps are evenly spaced, as uniform caching's
        "blocks": schedule,
        "before_bubbling": per_block,
        "bubbled": bubbled,
        "reuse_error": errors,
        # similarity of each step to the step before it: the curve the heatmap shows beside the schedule
        "adjacent_similarity": {n: [1.0] + [float(s[k - 1, k]) for k in range(1, steps)] for n, s in similarities.items()},
        "block_evals_fraction": sum(map(len, schedule.values())) / (steps * len(schedule)),
    }


def save_schedule(schedule: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(schedule, indent=1) + "\n")


def load_schedule(path: Path) -> dict:
    try:
        schedule = json.loads(Path(path).read_text())
    except FileNotFoundError:
        method = "bac+sada" if Path(path).name.startswith("bac+sada") else "bac"
        raise FileNotFoundError(f"no BAC schedule at {path}; run `rtdiff calibrate {method}` first") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"BAC schedule {path} is not valid JSON: {error}") from None
    if not isinstance(schedule, dict) or schedule.get("format") != FORMAT:
        raise ValueError(f"{path} is not a BAC schedule (format {FORMAT!r} expected)")
    return schedule


def plot_schedule(schedule: dict, path: Path) -> None:
    """Heatmap of update steps (blocks x steps) beside each block's adjacent-step similarity curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, steps = list(schedule["blocks"]), schedule["steps"]
    grid = np.zeros((len(names), steps))
    for row, name in enumerate(names):
        grid[row, schedule["before_bubbling"][name]] = 0.5  # chosen by the scheduler
        extra = set(schedule["blocks"][name]) - set(schedule["before_bubbling"][name])
        grid[row, sorted(extra)] = 1.0  # added by bubbling union
    figure, (heat, curves) = plt.subplots(1, 2, figsize=(13, 0.28 * len(names) + 2.5), width_ratios=[3, 2])
    heat.imshow(grid, aspect="auto", cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    heat.set_yticks(range(len(names)), names, fontsize=7)
    heat.set_xlabel("solver step")
    heat.set_title(f"BAC updates ({schedule.get('solver', '')} {steps} steps, budget {schedule['budget']}): "
                   "light = scheduled, dark = bubbling union", fontsize=9)
    for name in names:
        curves.plot(schedule["adjacent_similarity"][name], linewidth=1, label=name)
    curves.set_xlabel("solver step")
    curves.set_ylabel("cosine similarity to previous step")
    curves.legend(fontsize=5, ncol=2)
    if schedule.get("step_sensitivity"):
        sensitivity = curves.twinx()
        sensitivity.semilogy(range(1, steps), schedule["step_sensitivity"][1:], "k--", linewidth=1.5)
        sensitivity.set_ylabel("action error of reusing at this step alone (dashed)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


class BACache(Accelerator):
    """Runs each block only at its scheduled update steps; elsewhere its cached output stands in."""

    name = "bac"
    uses_block_cache = True

    def __init__(self, schedule: dict, solver: str, steps: int, checkpoint_hash: str | None = None):
        super().__init__()
        if schedule["steps"] != steps or schedule.get("solver", solver) != solver:
            raise ValueError(f"BAC schedule is for {schedule.get('solver')} {schedule['steps']} steps, "
                             f"not {solver} {steps}")
        if checkpoint_hash and schedule.get("checkpoint_sha256", checkpoint_hash) != checkpoint_hash:
            raise ValueError("BAC schedule was calibrated on different weights (checkpoint hash differs)")
        self.updates = {name: set(steps) for name, steps in schedule["blocks"].items()}
        self.reuse = check_reuse(schedule.get("reuse", "last"))  # calibrated with it: it belongs to the schedule

    def bind(self, denoiser):
        super().bind(denoiser)
        names = set(self.cache.names)
        if names != set(self.updates):
            self.unbind()
            raise ValueError(f"BAC schedule names blocks {sorted(set(self.updates) ^ names)[:4]} "
                             "that this model does not have (or lacks ones it has)")
        return self

    def should_compute(self, block: str, i: int) -> bool:
        return i in self.updates[block]

    def static_key(self) -> tuple:
        return (self.name, self.reuse,
                tuple(sorted((name, tuple(sorted(steps))) for name, steps in self.updates.items())))
