"""The policy modality's subcommands of `rtdiff`: expert, demos, train, calibrate, eval, demo, sim.

Registered through rtdiff.policies.modality; the core command line (runtime/cli.py) knows none of them by name.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from rtdiff.runtime.cli import add_run_arguments, write_json
from rtdiff.sims.tasks import TASKS

EVAL_SEED = 100_000  # evaluation seeds start here, far from the demonstration seeds 0..N-1


def cmd_expert(args) -> None:
    from rtdiff.sims.tasks import get_task, summarize

    seeds = range(args.seed, args.seed + args.episodes)
    episodes = get_task(args.task).load().run_expert(seeds, workers=args.workers)
    report = {"task": args.task, "controller": "expert", **summarize(episodes)}
    print(f"{args.task} expert  episodes {report['episodes']}  score_mean {report['score_mean']:.3f}  "
          f"success_rate {report['success_rate']:.2f}")
    write_json(args.json, report)


def cmd_demos(args) -> None:
    from rtdiff.sims.demos import save_demos
    from rtdiff.sims.tasks import get_task, summarize

    task = get_task(args.task)
    module = task.load()
    seeds = range(args.seed, args.seed + args.episodes)
    noise = {"noise": task.demo_noise} if task.demo_noise else {}
    episodes = module.run_expert(seeds, workers=args.workers, **noise)
    report = summarize(episodes)
    meta = {"task": task.name, "obs_type": "state", "generator": task.expert, "execution_noise": task.demo_noise,
            "seeds": [args.seed, args.seed + args.episodes], "score_mean": report["score_mean"],
            "success_rate": report["success_rate"],
            "command": f"rtdiff demos {task.name} --episodes {args.episodes} --seed {args.seed}"}
    args.out = args.out or str(task.demos)
    kept = [demo for demo in map(module.demonstration, episodes) if demo is not None]  # None: not worth imitating
    meta["episodes_kept"] = len(kept)
    save_demos(args.out, kept, meta)
    print(f"wrote {args.out}: {len(episodes)} episodes, expert score_mean {report['score_mean']:.3f}")


# Diffusion Policy's horizons. The transformer attends without causal masks: on these demonstrations it
# trains much faster (denoising loss 0.054 vs 0.078 after 800 steps, same seed and learning rate).
# adaLN conditioning: see policies/transformer.py.
ARCH_DEFAULTS = {"unet": {"horizon": 16}, "transformer": {"horizon": 10, "causal_attn": False, "adaln": True}}
ARCH_LR = {"unet": 1e-3, "transformer": 1e-3}


def cmd_train(args) -> None:
    from rtdiff.policies.checkpoint import BUNDLED, load_policy, save_policy
    from rtdiff.runtime.checkpoints import checkpoint_hash, read_metadata
    from rtdiff.policies.config import PolicyConfig
    from rtdiff.policies.train import TrainConfig, train
    from rtdiff.sims.demos import load_demos

    from rtdiff.sims.tasks import get_task

    task = get_task(args.task)
    demos = load_demos(args.demos or task.demos)
    if demos.meta.get("task", task.name) != task.name:
        raise ValueError(f"{args.demos} holds {demos.meta['task']} demonstrations, not {task.name}")
    config = PolicyConfig(arch=args.arch, task=task.name, obs_dim=demos.observations.shape[1],
                          action_dim=demos.actions.shape[1], **ARCH_DEFAULTS[args.arch])
    args.lr = args.lr or ARCH_LR[args.arch]
    train_config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                               threads=args.threads)
    init, lineage = None, {}
    if args.init:  # go on from a checkpoint; its own command is kept, so the chain can be replayed
        init = load_policy(args.init)
        lineage = {"init": str(args.init), "init_sha256": checkpoint_hash(args.init),
                   "init_command": read_metadata(args.init).get("command", "")}
    policy, report = train(demos, config, train_config, init=init)
    command = (f"rtdiff train {task.name} --arch {args.arch} --steps {args.steps} --batch-size {args.batch_size} "
               f"--lr {args.lr} --seed {args.seed} --threads {args.threads}" + (f" --init {args.init}" if init else ""))
    out = args.out or BUNDLED / f"{task.name}-{args.arch}"
    save_policy(policy, out, metadata={"command": command, **lineage, "demos": demos.meta.get("command", ""), **report})
    print(f"wrote {out}: {report}")


def cmd_eval(args) -> None:
    from rtdiff.policies.evaluate import evaluate, format_table
    from rtdiff.runtime.run import RunConfig

    run = RunConfig(args.checkpoint or f"{args.task}-unet", args.solver, args.steps, accel=args.accel,
                    accel_options=_accel_options(args), backend=args.backend)
    report = evaluate(run, args.episodes, args.seed, workers=args.workers, task=args.task)
    print(format_table([report]))
    write_json(args.json, report)


def _accel_options(args) -> dict:
    from rtdiff.runtime.accel import parse_options

    return parse_options(args.accel, args.accel_option)


def _local_server(task: str, checkpoint: str, solver: str | None, steps: int | None, accel: str, backend: str,
                  accel_options: list[str]):
    """A server process for one policy on a private ipc socket (runtime/cli.py `local_server`)."""
    from rtdiff.runtime.cli import local_server

    return local_server(["--model", f"{task}={checkpoint}", *(["--solver", solver] if solver else []),
                         *(["--steps", str(steps)] if steps else []), "--accel", accel, "--threads", "1",
                         "--backend", backend, *(f"--accel-option={pair}" for pair in accel_options)])


def cmd_demo(args) -> None:
    """What `make demo` runs: a server process with the bundled UNet policy and a sim client process that
    runs seeded episodes against it over ZeroMQ in real time, prints the table, writes one rollout as a
    video, and then the server is shut down."""
    import subprocess

    checkpoint = args.checkpoint or f"{args.task}-unet"
    _accel_options(args)  # a bad option fails here, not in the server process
    with _local_server(args.task, checkpoint, args.solver, args.steps, args.accel, args.backend,
                       args.accel_option) as address:
        sim = subprocess.run(
            [sys.executable, "-m", "rtdiff.runtime.cli", "sim", args.task, "--server", address, "--episodes",
             str(args.episodes), "--seed", str(args.seed), "--workers", str(args.workers), "--video", args.video,
             "--json", args.json])
    if sim.returncode != 0:
        raise ValueError(f"the sim client failed (exit {sim.returncode})")
    print(f"rollout of seed {args.seed}: {Path(args.video).resolve()}; report: {Path(args.json).resolve()}")


def cmd_calibrate(args) -> None:
    from rtdiff.policies.accelerate import calibrate_bac

    budget = 4 if args.budget is None and args.fraction is None else args.budget
    sada = {"window": tuple(args.window), "max_consecutive": args.max_consecutive} if args.method == "bac+sada" else None
    schedule, path = calibrate_bac(args.checkpoint, args.solver, args.steps, budget, args.demos,
                                   observations=args.observations, seed=args.seed, bubble=args.bubble, out=args.out,
                                   fraction=args.fraction, sada=sada, command=shlex.join(["rtdiff", *sys.argv[1:]]))
    print(f"wrote {path} and {path.with_suffix('.png')}: budget {schedule['budget']}, block_evals_fraction "
          f"{schedule['block_evals_fraction']:.3f}, bubbled {schedule['bubbled']}")
    for candidate in schedule.get("candidates", []):  # --fraction: what the action error chose from
        print(f"  candidate {candidate['objective']:<20} budget {candidate['budget']:3d} bubble {candidate['bubble']:2d}"
              f"{' joint' if candidate['joint'] else '      '} blocks {candidate['block_evals_fraction']:.3f} "
              f"action MSE {candidate['output_error']:.2e}")


def cmd_sim(args) -> None:
    from rtdiff.sims.remote import format_remote_table, run_remote

    def run(address: str) -> dict:
        return run_remote(args.task, address, args.model, args.episodes, args.seed, args.rate, args.workers,
                          curve_dir=args.curve, video=args.video)

    if args.backend is None:
        report = run(args.server)
    else:  # a server of our own, for this policy on this backend
        checkpoint = args.checkpoint or f"{args.task}-unet"
        _accel_options(args)
        with _local_server(args.task, checkpoint, args.solver, args.steps, args.accel, args.backend,
                           args.accel_option) as address:
            report = run(address)
    print(format_remote_table(report))
    write_json(args.json, report)


def add_eval_options(sub, episodes: int) -> None:
    sub.add_argument("task", choices=sorted(TASKS))
    add_episode_options(sub, episodes)


def add_episode_options(sub, episodes: int) -> None:
    sub.add_argument("--checkpoint", help="bundled name or checkpoint folder (default: TASK-unet)")
    sub.add_argument("--episodes", type=int, default=episodes)
    sub.add_argument("--seed", type=int, default=EVAL_SEED)
    add_run_arguments(sub)
    sub.add_argument("--json")


def add_commands(commands) -> None:
    expert = commands.add_parser("expert", help="run the scripted PushT expert and report its score")
    expert.add_argument("task", choices=sorted(TASKS))
    expert.add_argument("--episodes", type=int, default=50)
    expert.add_argument("--seed", type=int, default=EVAL_SEED)
    expert.add_argument("--workers", type=int, default=2)
    expert.add_argument("--json")
    expert.set_defaults(run=cmd_expert)

    demos = commands.add_parser("demos", help="generate expert demonstrations into one safetensors file")
    demos.add_argument("task", choices=sorted(TASKS))
    demos.add_argument("--episodes", type=int, default=200)
    demos.add_argument("--seed", type=int, default=0)
    demos.add_argument("--workers", type=int, default=2)
    demos.add_argument("--out", help="demonstration file (default: the bundled one for the task)")
    demos.set_defaults(run=cmd_demos)

    train = commands.add_parser("train", help="train a diffusion policy on the PushT demonstrations (CPU)")
    train.add_argument("task", choices=sorted(TASKS))
    train.add_argument("--arch", choices=sorted(ARCH_DEFAULTS), default="unet")
    train.add_argument("--steps", type=int, default=4000)
    train.add_argument("--batch-size", type=int, default=256)
    train.add_argument("--lr", type=float, help="peak learning rate (default: per architecture)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--threads", type=int, default=2, help="torch threads (results depend on it slightly)")
    train.add_argument("--demos", help="demonstration file (default: the bundled one for the task)")
    train.add_argument("--out", help="checkpoint folder (default: the bundled TASK-ARCH)")
    train.add_argument("--init", help="go on from this checkpoint (name or folder) instead of starting afresh")
    train.set_defaults(run=cmd_train)

    calibrate = commands.add_parser("calibrate", help="calibrate an accelerator's schedule for a checkpoint")
    calibrate.add_argument("method", choices=["bac", "bac+sada"],
                           help="bac+sada: refreshes kept off the steps SADA may skip (--window, --max-consecutive)")
    calibrate.add_argument("--checkpoint", default="pusht-unet")
    calibrate.add_argument("--solver", help="default: the checkpoint's own")
    calibrate.add_argument("--steps", type=int, help="default: the checkpoint's own")
    size = calibrate.add_mutually_exclusive_group()
    size.add_argument("--budget", type=int, help="update steps per block before bubbling (default 4)")
    size.add_argument("--fraction", type=float,
                      help="at most this fraction of block evaluations; budget, bubbling and objective (similarity, "
                           "or similarity weighted by each step's measured sensitivity) chosen by action error")
    calibrate.add_argument("--bubble", type=int, default=5, help="with --budget: blocks given downstream feed-forward updates")
    calibrate.add_argument("--window", type=float, nargs=2, default=(0.1, 0.97), metavar=("LO", "HI"),
                           help="bac+sada: the part of the trajectory SADA may skip in")
    calibrate.add_argument("--max-consecutive", type=int, default=2, help="bac+sada: skips in a row")
    calibrate.add_argument("--observations", type=int, default=32)
    calibrate.add_argument("--seed", type=int, default=0)
    calibrate.add_argument("--demos", help="observations to calibrate on (default: the checkpoint's task's demonstrations)")
    calibrate.add_argument("--out", help="schedule JSON (default: beside the checkpoint, where --accel looks)")
    calibrate.set_defaults(run=cmd_calibrate)

    evaluate = commands.add_parser("eval", help="closed-loop evaluation of a policy in PushT")
    add_eval_options(evaluate, episodes=50)
    evaluate.add_argument("--workers", type=int, default=1, help="parallel processes (one torch thread each)")
    evaluate.set_defaults(run=cmd_eval)

    sim = commands.add_parser("sim", help="run a simulator as a client of an rtdiff server, in real time")
    sim.add_argument("task", choices=sorted(TASKS))
    sim.add_argument("--server", default="tcp://127.0.0.1:5555")
    sim.add_argument("--model", help="served model name (default: the only one)")
    sim.add_argument("--episodes", type=int, default=50)
    sim.add_argument("--seed", type=int, default=EVAL_SEED)
    sim.add_argument("--rate", type=float, help="control rate, Hz (default: the task's, 10 for PushT, 20 for Lift)")
    sim.add_argument("--workers", type=int, default=1, help="client processes, each running its share of episodes")
    sim.add_argument("--curve", metavar="KEYDIR")
    sim.add_argument("--video", help="write the first episode as a video (mp4 or gif)")
    sim.add_argument("--json")
    local = sim.add_argument_group("a local server", "with --backend, sim starts its own server for --checkpoint "
                                   "instead of connecting to --server")
    local.add_argument("--checkpoint", help="bundled name or checkpoint folder (default: TASK-unet)")
    add_run_arguments(local, backend=None)
    sim.set_defaults(run=cmd_sim)


def add_demos(targets) -> None:
    for task in sorted(TASKS):
        demo = targets.add_parser(task, help=f"serve the bundled {task} UNet policy and run its sim against it over "
                                             "ZeroMQ, in real time")
        add_episode_options(demo, episodes=10)
        demo.add_argument("--workers", type=int, default=5, help="sim client processes (episodes run in real time)")
        demo.add_argument("--video", default=f"out/{task}_rollout.mp4")
        demo.set_defaults(run=cmd_demo, json="out/demo.json", task=task)
