"""The `rtdiff` command line: serve, export, keys, and the subcommands each installed modality registers
(policies: expert, demos, train, calibrate, eval, demo, sim).

Every failure a user can cause (a missing checkpoint, a wrong shape, an unknown
solver) ends in one line, `rtdiff: error: ...`, and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")


def cmd_export(args) -> None:
    if args.check:
        from rtdiff.export.check import check_export

        problems = check_export(args.check)
        print("\n".join(problems) if problems else f"{args.check}: every graph passes")
        if problems:
            raise SystemExit(1)
        return
    if not args.checkpoint or not args.out:
        raise ValueError("export needs --checkpoint and --out (or --check DIR)")
    from rtdiff.export.onnx_export import export_onnx

    batch_sizes = tuple(int(b) for b in args.batch.split(","))
    manifest = export_onnx(args.checkpoint, args.out, args.schedule, batch_sizes, args.precision, args.opset)
    graphs = sum(len(p[form]["files"]) for p in manifest["pieces"] for form in ("full", "cached"))
    print(f"wrote {args.out}: {len(manifest['pieces'])} segments, {graphs} graphs, batch sizes {list(batch_sizes)}")
    if args.format == "tensorrt":  # engines from the same graphs, cached beside them
        from rtdiff.export.tensorrt_backend import TrtDenoiser

        TrtDenoiser(args.out, cache_dir=Path(args.out) / "engines")
        print(f"built TensorRT engines into {args.out}/engines")


def cmd_serve(args) -> None:
    import logging

    import torch

    from rtdiff.runtime.accel import parse_options
    from rtdiff.runtime.run import RunConfig
    from rtdiff.runtime.server import Server, ServerConfig
    from rtdiff.runtime.service import make_service

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    options = parse_options(args.accel, args.accel_option)
    # an exported backend is built for these batch sizes (static shapes); batches between run padded up
    batch_sizes = tuple(sorted({1, min(4, args.max_batch), min(16, args.max_batch), args.max_batch}))
    services = {}
    for spec in args.model:
        name, sep, checkpoint = spec.partition("=")
        if not sep or not name or not checkpoint:
            raise ValueError(f"--model takes NAME=CHECKPOINT, got {spec!r}")
        if checkpoint == "null" or checkpoint.startswith("null:"):  # no compute: for protocol benchmarks
            from rtdiff.runtime.null_service import NullService

            services[name] = NullService.from_spec(checkpoint)
            continue
        run = RunConfig(checkpoint, args.solver, args.steps, accel=args.accel, accel_options=options,
                        backend=args.backend, batch_sizes=batch_sizes, threads=args.threads)
        services[name] = make_service(run)
    config = ServerConfig(bind=args.bind, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, curve_dir=args.curve,
                          model_threads={"on": True, "off": False, "auto": None}[args.model_threads])
    server = Server(services, config)
    settings = "; ".join(f"{n}={s.run.checkpoint} {s.run.solver} {s.run.steps}" if hasattr(s, "run") else f"{n}=null"
                         for n, s in services.items())
    print(f"serving {settings} on {server.address} (accel {args.accel}, backend {args.backend}, max batch "
          f"{args.max_batch}{', CURVE' if args.curve else ''})", flush=True)
    server.serve_forever(handle_signals=True)
    print("server stopped", flush=True)


def cmd_keys(args) -> None:
    import os
    import shutil

    from zmq.auth import create_certificates

    out = Path(args.dir)
    old_umask = os.umask(0o077)  # secret keys are never readable by others, not even for a moment
    try:
        (out / "clients").mkdir(parents=True, exist_ok=True)
        create_certificates(out, "server")
        create_certificates(out, "client")
        shutil.copy(out / "client.key", out / "clients" / "client.key")  # the server admits the clients listed here
    finally:
        os.umask(old_umask)
    out.chmod(0o700)
    for secret in out.glob("*.key_secret"):
        secret.chmod(0o600)
    for public in [*out.glob("*.key"), *(out / "clients").glob("*.key")]:
        public.chmod(0o644)  # public keys are meant to be handed out
    print(f"wrote {out}/server.key[_secret], {out}/client.key[_secret] and {out}/clients/client.key; "
          f"give clients server.key and their own key pair, never server.key_secret")


def add_run_arguments(parser, backend: str | None = "torch") -> None:
    """What a run is made of (runtime/run.py), the same options wherever a command runs a model."""
    parser.add_argument("--solver", help="ddim | ddpm | dpmpp | flow (default: the checkpoint's own)")
    parser.add_argument("--steps", type=int, help="solver steps (default: the checkpoint's own)")
    parser.add_argument("--accel", default="none", help="none | uniform | bac | sada | bac+sada (bac, bac+sada: "
                        "schedules ship with the bundled checkpoints at their own solver; `rtdiff calibrate` for others)")
    parser.add_argument("--accel-option", action="append", default=[], metavar="KEY=VALUE",
                        help="an accelerator option, VALUE in JSON, e.g. threshold=0.02 or window=[0.1,0.9] (repeatable)")
    parser.add_argument("--backend", default=backend, help="torch | onnxruntime | tensorrt | cudagraph "
                        "(exported and built on first use, cached)")


@contextlib.contextmanager
def local_server(serve_args: list[str]):
    """`rtdiff serve SERVE_ARGS` as a process on a private ipc socket: yields its address once it serves, and
    stops it after (what the demos and the sims' own servers run)."""
    import signal
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory(prefix="rtdiff-serve-") as workdir:
        address = f"ipc://{workdir}/server.ipc"
        server = subprocess.Popen([sys.executable, "-m", "rtdiff.runtime.cli", "serve", "--bind", address,
                                   *serve_args], stdout=subprocess.PIPE, text=True)
        try:
            line = server.stdout.readline()
            if not line.startswith("serving"):
                raise ValueError(f"the server did not start (exit {server.wait()}): {line.strip()}")
            print(line.strip(), flush=True)
            yield address
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)


def build_parser() -> argparse.ArgumentParser:
    from rtdiff.runtime.registry import modalities

    parser = argparse.ArgumentParser(prog="rtdiff", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="export a policy to ONNX, one graph per schedule segment; or check one")
    export.add_argument("--checkpoint", help="bundled name or checkpoint folder")
    export.add_argument("--schedule", help="BAC schedule JSON: its segments become the graphs (default: one segment)")
    export.add_argument("--format", choices=["onnx", "tensorrt"], default="onnx")
    export.add_argument("--batch", default="1", help="comma-separated static batch sizes, e.g. 1,16")
    export.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
    export.add_argument("--opset", type=int, default=17)
    export.add_argument("--out", help="output folder")
    export.add_argument("--check", metavar="DIR", help="check an export for TensorRT instead; exit 1 on problems")
    export.set_defaults(run=cmd_export)

    serve = commands.add_parser("serve", help="serve models over ZeroMQ (docs/protocol.md)")
    serve.add_argument("--model", action="append", required=True, metavar="NAME=CHECKPOINT",
                       help="a model to serve under NAME (repeatable); CHECKPOINT `null` (or null:obs=2x5:actions=16x2) "
                            "answers zeros with no compute, for protocol benchmarks")
    serve.add_argument("--bind", default="tcp://127.0.0.1:5555")
    add_run_arguments(serve, backend="torch")
    serve.add_argument("--max-batch", type=int, default=16, help="1 turns dynamic batching off")
    serve.add_argument("--max-wait-ms", type=float, default=0.0,
                       help="how long a request may wait for others to batch with (0: none; load makes batches)")
    serve.add_argument("--threads", type=int, default=2)
    serve.add_argument("--curve", metavar="KEYDIR", help="encrypt and authenticate with the keys `rtdiff keys` made")
    serve.add_argument("--model-threads", nargs="?", const="on", default="auto", choices=["on", "off", "auto"],
                       help="compute each model on a thread of its own, so a slow model cannot hold up another or the "
                            "socket; auto (the default): on when more than one model is served (a lone model computes "
                            "on the loop, which costs a request no hand-over between threads)")
    serve.set_defaults(run=cmd_serve)

    keys = commands.add_parser("keys", help="make CURVE certificates for the server and one client")
    keys.add_argument("dir")
    keys.set_defaults(run=cmd_keys)

    demo = commands.add_parser("demo", help="serve a bundled model and run a client against it, end to end")
    targets = demo.add_subparsers(dest="demo_target", required=True, metavar="TARGET")
    for modality in modalities():
        if modality.add_commands is not None:
            modality.add_commands(commands)
        if modality.add_demos is not None:
            modality.add_demos(targets)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (FileNotFoundError, ValueError, KeyError, TimeoutError, NotImplementedError) as error:
        parser.exit(2, f"rtdiff: error: {error}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
