"""The `rtdiff` command line: expert, demos, train, eval, demo.

Every failure a user can cause (a missing checkpoint, a wrong shape, an unknown
solver) ends in one line, `rtdiff: error: ...`, and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEMOS_PATH = Path(__file__).resolve().parent.parent / "sims" / "data" / "pusht_demos.safetensors"
EVAL_SEED = 100_000  # evaluation seeds start here, far from the demonstration seeds 0..N-1


def _write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")


def cmd_expert(args) -> None:
    from sims.pusht import run_expert, summarize

    seeds = range(args.seed, args.seed + args.episodes)
    report = {"controller": "expert", **summarize(run_expert(seeds, workers=args.workers))}
    print(f"expert  episodes {report['episodes']}  score_mean {report['score_mean']:.3f}  "
          f"success_rate {report['success_rate']:.2f}")
    _write_json(args.json, report)


def cmd_demos(args) -> None:
    from sims.demos import save_demos
    from sims.pusht import demonstration, run_expert, summarize

    seeds = range(args.seed, args.seed + args.episodes)
    episodes = run_expert(seeds, workers=args.workers)
    report = summarize(episodes)
    meta = {"task": "pusht", "obs_type": "state", "generator": "sims.pusht_expert.PushTExpert",
            "seeds": [args.seed, args.seed + args.episodes], "score_mean": report["score_mean"],
            "success_rate": report["success_rate"],
            "command": f"rtdiff demos pusht --episodes {args.episodes} --seed {args.seed}"}
    save_demos(args.out, [demonstration(e) for e in episodes], meta)
    print(f"wrote {args.out}: {len(episodes)} episodes, expert score_mean {report['score_mean']:.3f}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rtdiff", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    expert = commands.add_parser("expert", help="run the scripted PushT expert and report its score")
    expert.add_argument("task", choices=["pusht"])
    expert.add_argument("--episodes", type=int, default=50)
    expert.add_argument("--seed", type=int, default=EVAL_SEED)
    expert.add_argument("--workers", type=int, default=2)
    expert.add_argument("--json")
    expert.set_defaults(run=cmd_expert)

    demos = commands.add_parser("demos", help="generate expert demonstrations into one safetensors file")
    demos.add_argument("task", choices=["pusht"])
    demos.add_argument("--episodes", type=int, default=200)
    demos.add_argument("--seed", type=int, default=0)
    demos.add_argument("--workers", type=int, default=2)
    demos.add_argument("--out", default=str(DEMOS_PATH))
    demos.set_defaults(run=cmd_demos)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (FileNotFoundError, ValueError, KeyError) as error:
        parser.exit(2, f"rtdiff: error: {error}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
