"""`rtdiff audio ...`: the audio modality's subcommands.

    rtdiff audio generate --model music-tiny --prompt "a fast high melody with drums" --seconds 10 --out song.wav
"""

from __future__ import annotations

import time
from pathlib import Path

from rtdiff.runtime.cli import add_run_arguments, write_json


def load_music_model(name_or_path: str):
    """A MusicLDM checkpoint by bundled name or folder; another modality's checkpoint is refused by name."""
    from rtdiff.audio.components import MusicLDM
    from rtdiff.runtime.checkpoints import checkpoint_format, load_checkpoint

    fmt, folder = checkpoint_format(name_or_path)
    if fmt.modality != "audio":
        raise ValueError(f"{folder} is a {fmt.modality} checkpoint ({fmt.name}), not a music model")
    model = load_checkpoint(folder)
    if not isinstance(model, MusicLDM):  # a format registered as audio that is not MusicLDM's
        raise ValueError(f"{folder} ({fmt.name}) does not load as a MusicLDM model")
    return model


def read_latents(path: str):
    """Initial noise from a .npy file (never unpickled)."""
    import numpy as np
    import torch

    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"--latents {path}: not a readable .npy array ({error})") from None
    if array.dtype.kind != "f":
        raise ValueError(f"--latents {path}: dtype {array.dtype} is not floating point")
    if array.ndim == 3:
        array = array[None]
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def cmd_generate(args) -> None:
    import numpy as np
    import torch

    from rtdiff.audio.accelerate import music_accelerator_spec
    from rtdiff.audio.pipeline import TextToMusic
    from rtdiff.runtime.accel import parse_options

    torch.set_num_threads(args.threads)
    if args.backend != "torch":
        raise NotImplementedError(f"backend {args.backend!r} is not built for audio yet: only torch runs MusicLDM")
    options = parse_options(args.accel, args.accel_option)
    accelerator = music_accelerator_spec(args.accel, args.model, args.solver, args.steps, options)()
    started = time.perf_counter()
    model = load_music_model(args.model)
    load_ms = (time.perf_counter() - started) * 1e3
    pipeline = TextToMusic(model)
    latents = read_latents(args.latents) if args.latents else None
    negative = [args.negative_prompt] if args.negative_prompt is not None else None
    started = time.perf_counter()
    music = pipeline.generate([args.prompt], args.seconds, steps=args.steps, solver=args.solver,
                              guidance=args.guidance, negative_prompts=negative,
                              generator=torch.Generator().manual_seed(args.seed), latents=latents,
                              accelerator=accelerator, progress=not args.quiet)
    wall_ms = (time.perf_counter() - started) * 1e3
    wave = music.wave[0].numpy()
    write_wav(args.out, wave, music.sample_rate)
    if args.save_npz:
        Path(args.save_npz).parent.mkdir(parents=True, exist_ok=True)
        np.savez(args.save_npz, latent=music.latent[0].numpy(), mel=music.mel[0].numpy(), wave=wave)
    if args.plot:
        plot_mel(args.plot, music.mel[0, 0].numpy(), model.hop_length / model.sample_rate, args.prompt)
    report = {"model": args.model, "prompt": args.prompt, "negative_prompt": args.negative_prompt,
              "seconds": args.seconds, "samples": int(wave.shape[0]), "sample_rate": music.sample_rate,
              "solver": args.solver, "steps": args.steps, "guidance": args.guidance, "seed": args.seed,
              "accel": args.accel, "accel_options": options, "threads": args.threads,
              "load_ms": load_ms, "wall_ms": wall_ms, "stage_ms": music.stage_ms,
              "model_calls": music.accel_stats.get("model_calls"),
              "block_evals_fraction": music.accel_stats.get("block_evals_fraction"),
              "real_time_factor": wall_ms / 1e3 / args.seconds}
    write_json(args.json, report)
    print(f"wrote {args.out}: {wave.shape[0] / music.sample_rate:.2f} s at {music.sample_rate} Hz in "
          f"{wall_ms / 1e3:.2f} s ({', '.join(f'{k} {v:.0f} ms' for k, v in music.stage_ms.items())})")


def cmd_calibrate(args) -> None:
    import torch

    from rtdiff.audio.accelerate import calibrate_music_bac
    from rtdiff.audio.pipeline import TextToMusic
    from rtdiff.audio.train import command_line

    from rtdiff.runtime.accel import parse_options

    torch.set_num_threads(args.threads)
    if args.accel_option and args.method != "bac+sada":
        raise SystemExit("--accel-option sets SADA's options: only for bac+sada")
    sada = parse_options("sada", args.accel_option) if args.method == "bac+sada" else None
    pipeline = TextToMusic(load_music_model(args.model))
    schedule, path = calibrate_music_bac(args.model, pipeline, args.solver, args.steps, args.fraction,
                                         prompts=args.prompts, seed=args.seed, guidance=args.guidance, sada=sada,
                                         out=args.out, command=command_line(), seconds=args.seconds,
                                         final_prompts=args.final_prompts, final_seconds=args.final_seconds,
                                         reuse=args.reuse)
    final = f", log-mel error as served {schedule['final_error']:.3g}" if "final_error" in schedule else ""
    print(f"wrote {path}: {args.method} at {args.solver} {args.steps}, block evaluations "
          f"{schedule['block_evals_fraction']:.3f}, final-latent error {schedule['output_error']:.3g}{final}")


def write_wav(path: str, wave, sample_rate: int) -> None:
    import soundfile

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(path, wave, sample_rate, subtype="FLOAT")


def plot_mel(path: str, mel, seconds_per_frame: float, title: str) -> None:
    """The log-mel spectrogram, time along x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(10, 3.2))
    image = axes.imshow(mel.T, origin="lower", aspect="auto", cmap="magma",
                        extent=(0, mel.shape[0] * seconds_per_frame, 0, mel.shape[1]))
    axes.set_xlabel("time (s)")
    axes.set_ylabel("mel bin")
    axes.set_title(title)
    figure.colorbar(image, ax=axes, label="log-mel")
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def add_commands(commands) -> None:
    audio = commands.add_parser("audio", help="text-to-music (MusicLDM): generate, train, measure")
    verbs = audio.add_subparsers(dest="audio_command", required=True)

    generate = verbs.add_parser("generate", help="generate music from a prompt into a wav file")
    generate.add_argument("--model", default="music-tiny", help="bundled name or MusicLDM folder (diffusers layout)")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--negative-prompt")
    generate.add_argument("--seconds", type=float, default=10.0)
    generate.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance scale (1: off)")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--latents", metavar="NOISE.npy", help="the initial noise (B=1, C, T, F), as diffusers' latents=")
    add_run_arguments(generate, backend="torch")
    generate.set_defaults(solver="dpmpp", steps=50)  # ddim | dpmpp; MusicLDM's own default is DDIM 200
    generate.add_argument("--threads", type=int, default=2)
    generate.add_argument("--out", required=True, metavar="OUT.wav")
    generate.add_argument("--save-npz", metavar="OUT.npz", help="latent, mel and wave exactly as produced")
    generate.add_argument("--json", metavar="OUT.json", help="wall ms per stage, model calls, block fraction")
    generate.add_argument("--plot", metavar="OUT.png", help="the log-mel spectrogram")
    generate.add_argument("--quiet", action="store_true", help="no progress bar")
    generate.set_defaults(run=cmd_generate)

    listen = commands.add_parser("listen", help="stream music from an rtdiff server into a wav file")
    listen.add_argument("--server", default="tcp://127.0.0.1:5555")
    listen.add_argument("--model", help="served model name (default: the only one)")
    add_listen_arguments(listen)
    listen.add_argument("--curve", metavar="KEYDIR")
    listen.add_argument("--out", required=True, metavar="OUT.wav")
    listen.add_argument("--json", metavar="OUT.json")
    listen.add_argument("--plot", metavar="OUT.png", help="the streamed log-mel spectrogram")
    listen.set_defaults(run=cmd_listen)

    calibrate = verbs.add_parser("calibrate", help="calibrate a BAC block schedule on prompts")
    calibrate.add_argument("method", choices=["bac", "bac+sada"])
    calibrate.add_argument("--model", default="music-tiny")
    calibrate.add_argument("--solver", choices=["ddim", "dpmpp"], default="dpmpp")
    calibrate.add_argument("--steps", type=int, default=50)
    calibrate.add_argument("--fraction", type=float, required=True, help="at most this fraction of block evaluations")
    calibrate.add_argument("--prompts", type=int, default=2, help="training captions to calibrate on")
    calibrate.add_argument("--guidance", type=float, default=2.0)
    calibrate.add_argument("--seconds", type=float, default=2.56, help="length of the clips whose block outputs "
                           "are recorded and that screen the candidates")
    calibrate.add_argument("--final-prompts", type=int, default=4, help="other captions on which the best "
                           "candidates run as served (0: keep the screen's choice)")
    calibrate.add_argument("--final-seconds", type=float, default=10.0, help="length of those clips")
    calibrate.add_argument("--seed", type=int, default=0)
    calibrate.add_argument("--reuse", choices=["last", "linear"], default="last",
                           help="what stands in for a cached block: its last output, or that extrapolated through "
                                "its last two (kept in the schedule)")
    calibrate.add_argument("--accel-option", action="append", default=[], metavar="KEY=VALUE",
                           help="bac+sada: SADA's options, as generate takes them (window and max_consecutive also "
                                "lay out the steps left to SADA)")
    calibrate.add_argument("--threads", type=int, default=2)
    calibrate.add_argument("--out", help="schedule JSON (default: beside the checkpoint; the cache for a bundled one)")
    calibrate.set_defaults(run=cmd_calibrate)

    from rtdiff.audio.train import TRAINERS, cmd_train

    train = verbs.add_parser("train", help="train one component of music-tiny on synthetic music (CPU)")
    train.add_argument("component", choices=sorted(TRAINERS))
    train.add_argument("--out", required=True, help="the MusicLDM folder the component is written into")
    train.add_argument("--steps", type=int, default=2000)
    train.add_argument("--clips", type=int, default=2000, help="synthetic clips to train on")
    train.add_argument("--clip-seconds", type=float, default=2.56,
                       help="unet: length of its training clips (a multiple of 0.08 s: the latent's frames halve "
                            "three times)")
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--threads", type=int, default=2)
    train.add_argument("--init", action="store_true", help="go on from the component already in --out")
    train.add_argument("--adversarial", action="store_true",
                       help="vocoder: train against HiFi-GAN's period and scale discriminators as well")
    train.set_defaults(run=cmd_train)


def cmd_listen(args) -> None:
    from rtdiff.audio.listen import listen

    options = {key: value for key, value in (("window_s", args.window_s), ("overlap_s", args.overlap_s),
                                             ("tie", args.tie), ("accel", args.accel), ("seed", args.seed),
                                             ("guidance", args.guidance), ("negative_prompt", args.negative_prompt))
               if value is not None}
    changes = []
    for change in args.change_prompt:
        at, sep, text = change.partition("=")
        try:
            changes.append((float(at), text))
        except ValueError:
            raise ValueError(f"--change-prompt takes SECONDS=PROMPT, got {change!r}") from None
        if not sep or not text:
            raise ValueError(f"--change-prompt takes SECONDS=PROMPT, got {change!r}")
    report, mel, wave, boundaries = listen(args.server, args.model, args.prompt, args.seconds, args.out,
                                           credits=args.credits, paced=not args.unpaced, curve=args.curve,
                                           prompt_changes=changes, **options)
    report["boundary_mel_frames"] = boundaries
    if args.plot:
        frame_s = wave.shape[0] / report["sample_rate"] / mel.shape[0]
        plot_mel(args.plot, mel, frame_s, f"{args.prompt} (streamed, {report['chunks']} chunks)")
    write_json(args.json, report)
    print(f"wrote {args.out}: {report['audio_seconds']:.2f} s in {report['chunks']} chunks; first chunk after "
          f"{report['first_chunk_ms']:.0f} ms, real-time factor "
          f"{report['realtime_factor'] or float('nan'):.2f}, underruns {report['underruns']}")


def add_listen_arguments(listen) -> None:
    listen.add_argument("--prompt", required=True)
    listen.add_argument("--negative-prompt")
    listen.add_argument("--seconds", type=float, help="how much to stream (default: endless, until interrupted)")
    listen.add_argument("--window-s", type=float, help="latent window length (the server's default: 2.56)")
    listen.add_argument("--overlap-s", type=float, help="overlap tied to the window before (default 0.64)")
    listen.add_argument("--tie", choices=["inpaint", "fusion"])
    listen.add_argument("--accel", help="the stream's accelerator (default: the server's)")
    listen.add_argument("--seed", type=int)
    listen.add_argument("--guidance", type=float)
    listen.add_argument("--credits", type=int, default=4, help="chunks the server may compute ahead of the player")
    listen.add_argument("--unpaced", action="store_true", help="grant credit on arrival, not when played")
    listen.add_argument("--change-prompt", action="append", default=[], metavar="SECONDS=PROMPT",
                        help="once SECONDS of audio have arrived, ask for PROMPT (from the server's next window)")


def cmd_demo_audio(args) -> None:
    """`rtdiff demo audio`: a server process with music-tiny, and this process listening to 20 s of it."""
    from rtdiff.audio.listen import listen
    from rtdiff.runtime.cli import local_server

    out = Path(args.out_dir)
    with local_server(["--model", f"music={args.model}", "--accel", args.accel, "--threads", str(args.threads)]) \
            as address:
        report, mel, wave, boundaries = listen(address, "music", args.prompt, args.seconds, out / "music_stream.wav")
    report["boundary_mel_frames"] = boundaries
    plot_mel(str(out / "music_stream.png"), mel, wave.shape[0] / report["sample_rate"] / mel.shape[0],
             f"{args.prompt} (streamed from {args.model}, {report['chunks']} chunks)")
    write_json(str(out / "music_stream.json"), report)
    print(f"wrote {out / 'music_stream.wav'} ({report['audio_seconds']:.1f} s), its spectrogram and report: first "
          f"chunk after {report['first_chunk_ms']:.0f} ms, real-time factor {report['realtime_factor']:.2f}, "
          f"underruns {report['underruns']}")


def add_demos(targets) -> None:
    demo = targets.add_parser("audio", help="serve music-tiny and stream 20 s of it into out/")
    demo.add_argument("--model", default="music-tiny")
    demo.add_argument("--prompt", default="a fast high melody with drums")
    demo.add_argument("--seconds", type=float, default=20.0)
    demo.add_argument("--accel", default="bac+sada")
    demo.add_argument("--threads", type=int, default=2)
    demo.add_argument("--out-dir", default="out")
    demo.set_defaults(run=cmd_demo_audio)
