"""Accelerators on MusicLDM: speed against fidelity on the bundled model, and speed at the real model's size.

    python benchmarks/audio_accel.py --json benchmarks/results/audio_accel.json --plot benchmarks/results/audio_accel.png

For each solver setting (DPM-Solver++ 50 steps; DDIM 200, MusicLDM's default)
every prompt is generated once per configuration, configurations interleaved
prompt by prompt, each from the prompt's own seed and at batch 1 (as a user
asks); per configuration the wall speedup is the median over prompts of the
unaccelerated time over its time. Fidelity is against the unaccelerated output
of the same prompt and noise (audio/metrics.py). BAC schedules are calibrated
first on training captions, never on the benchmark prompts.

`--real-size`: the same accelerators, speed only, on a UNet of MusicLDM's
published configuration (channels 128/256/384/640, 512-d text embedding,
latent (8, 256, 16) for 10.24 s) with random weights, timed over the
denoising loop alone; its BAC schedules are calibrated on its own features.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from rtdiff.audio import data
from rtdiff.audio.metrics import fidelity
from rtdiff.runtime.accel import AcceleratorSpec

# (label, accelerator, options, BAC fraction or None)
CONFIGS = [
    ("none", "none", {}, None),
    ("uniform-2", "uniform", {"interval": 2}, None),
    ("uniform-3", "uniform", {"interval": 3}, None),
    ("uniform-4", "uniform", {"interval": 4}, None),
    ("uniform-5", "uniform", {"interval": 5}, None),
    ("sada-m1", "sada", {"max_consecutive": 1}, None),
    ("sada-m1-lagrange", "sada", {"max_consecutive": 1, "estimate": "lagrange"}, None),
    ("sada", "sada", {}, None),
    ("sada-t0", "sada", {"threshold": 0.0}, None),  # SADA's own threshold
    ("sada-lagrange", "sada", {"estimate": "lagrange"}, None),
    ("sada-m3", "sada", {"max_consecutive": 3}, None),
    ("sada-m3-lagrange", "sada", {"max_consecutive": 3, "estimate": "lagrange"}, None),
    ("sada-tokenwise", "sada", {"tokenwise": True}, None),
    ("bac-0.5", "bac", {}, 0.5),
    ("bac-0.33", "bac", {}, 0.33),
    ("bac+sada-0.5", "bac+sada", {}, 0.5),
    ("bac+sada-0.33", "bac+sada", {}, 0.33),
    ("bac+sada-0.25", "bac+sada", {}, 0.25),
    ("bac+sada-0.33-lagrange", "bac+sada", {"estimate": "lagrange"}, 0.33),
    ("bac+sada-0.25-lagrange", "bac+sada", {"estimate": "lagrange"}, 0.25),
    # reuse=linear: a cached block's output extrapolated through its last two computations (TaylorSeer's forecast)
    ("uniform-2-linear", "uniform", {"interval": 2, "reuse": "linear"}, None),
    ("uniform-3-linear", "uniform", {"interval": 3, "reuse": "linear"}, None),
    ("uniform-4-linear", "uniform", {"interval": 4, "reuse": "linear"}, None),
    ("bac-0.33-linear", "bac", {"reuse": "linear"}, 0.33),
    ("bac+sada-0.36-lagrange-linear", "bac+sada", {"estimate": "lagrange", "reuse": "linear"}, 0.36),
    ("bac+sada-0.33-lagrange-linear", "bac+sada", {"estimate": "lagrange", "reuse": "linear"}, 0.33),
    ("bac+sada-0.25-lagrange-linear", "bac+sada", {"estimate": "lagrange", "reuse": "linear"}, 0.25),
    # SADA nearer its published 1.8x (a wider window, or a later one), and bac+sada on those settings' lattices
    ("sada-lagrange-t0", "sada", {"estimate": "lagrange", "threshold": 0.0}, None),
    ("sada-m1-lagrange-wide", "sada", {"max_consecutive": 1, "estimate": "lagrange", "window": (0.04, 1.0)}, None),
    ("bac+sada-0.36-m1-lagrange-linear", "bac+sada",
     {"max_consecutive": 1, "estimate": "lagrange", "reuse": "linear"}, 0.36),
    ("bac+sada-0.32-m1-lagrange-linear", "bac+sada",
     {"max_consecutive": 1, "estimate": "lagrange", "reuse": "linear"}, 0.32),
    ("sada-w20-lagrange", "sada", {"estimate": "lagrange", "window": (0.2, 0.97)}, None),
    ("bac+sada-0.34-w20-lagrange-linear", "bac+sada",
     {"window": (0.2, 0.97), "estimate": "lagrange", "reuse": "linear"}, 0.34),
    ("bac+sada-0.30-w20-lagrange-linear", "bac+sada",
     {"window": (0.2, 0.97), "estimate": "lagrange", "reuse": "linear"}, 0.30),
    # SADA as its paper and code configure it for 50 steps (../shared/NOTES.md): skip where mean(score) <= 0, steps
    # 10..47, at most 4 skips in a row; the Lagrange estimate, and the epsilon reuse
    ("sada-published", "sada", {"threshold": 0.0, "window": (0.2, 0.96), "max_consecutive": 4,
                                "estimate": "lagrange"}, None),
    ("sada-published-eps", "sada", {"threshold": 0.0, "window": (0.2, 0.96), "max_consecutive": 4}, None),
]
SETTINGS = {"dpmpp-50": ("dpmpp", 50), "ddim-200": ("ddim", 200)}


def benchmark_prompts(count: int) -> list[str]:
    """Captions in the held-out phrasing over every attribute (the model never saw this wording)."""
    rng = np.random.default_rng(1234)
    return [data.draw_clip(rng, seed=i).caption(data.HELD_OUT_TEMPLATE) for i in range(count)]


def accelerator_specs(configs, calibrate, solver: str, steps: int) -> dict[str, AcceleratorSpec]:
    specs = {}
    for label, name, options, fraction in configs:
        schedule = None
        if fraction is not None:  # a BAC schedule is calibrated with the reuse it will run with, and keeps it
            reuse = options.get("reuse", "last")
            options = {key: value for key, value in options.items() if key != "reuse"}
            sada = {"window": (0.1, 0.97), "max_consecutive": 2, **options} if name == "bac+sada" else None
            schedule = calibrate(solver, steps, fraction, sada, reuse)
        specs[label] = AcceleratorSpec(name, options, schedule, solver, steps,
                                       schedule.get("checkpoint_sha256") if schedule else None)
    return specs


def run_bundled(model: str, setting: str, prompts: list[str], seconds: float, configs) -> dict:
    from rtdiff.audio.accelerate import calibrate_music_bac
    from rtdiff.audio.cli import load_music_model
    from rtdiff.audio.pipeline import TextToMusic

    solver, steps = SETTINGS[setting]
    pipeline = TextToMusic(load_music_model(model))

    def calibrate(solver, steps, fraction, sada, reuse):
        with tempfile.TemporaryDirectory() as scratch:
            schedule, _ = calibrate_music_bac(model, pipeline, solver, steps, fraction, sada=sada,
                                              out=Path(scratch) / "schedule.json", reuse=reuse)
        return schedule

    specs = accelerator_specs(configs, calibrate, solver, steps)
    rows = {label: {"seconds": [], "fidelity": [], "stats": []} for label in specs}
    for index, prompt in enumerate(prompts):
        noise = pipeline.initial_latents(1, seconds, torch.Generator().manual_seed(index))
        reference = None
        for label, spec in specs.items():  # interleaved: every configuration on this prompt, then the next
            accelerator = spec()
            started = time.perf_counter()
            music = pipeline.generate([prompt], seconds, steps=steps, solver=solver, latents=noise,
                                      accelerator=accelerator)
            rows[label]["seconds"].append(time.perf_counter() - started)
            rows[label]["stats"].append(accelerator.stats())
            if label == "none":
                reference = music
            rows[label]["fidelity"].append(fidelity(reference, music))
        print(f"{setting} prompt {index + 1}/{len(prompts)}", flush=True)
    return summarise(rows, {"model": model, "setting": setting, "seconds": seconds, "prompts": prompts})


def summarise(rows: dict, header: dict) -> dict:
    base = np.array(rows["none"]["seconds"])
    results = {}
    for label, row in rows.items():
        times = np.array(row["seconds"])
        entry = {"median_s": float(np.median(times)), "speedup": float(np.median(base / times)),
                 "model_calls": float(np.mean([s["model_calls"] for s in row["stats"]])),
                 "block_evals_fraction": float(np.mean([s["block_evals_fraction"] for s in row["stats"]]))}
        if row.get("fidelity"):
            for key in row["fidelity"][0]:
                values = [f[key] for f in row["fidelity"]]
                entry[key] = float(np.median(values)) if key == "mel_psnr_db" else float(np.mean(values))
        results[label] = entry
    if all("mel_psnr_db" in entry for entry in results.values()):
        header = {**header, "sada_against_uniform": against_uniform(results)}
    return {**header, "configs": results}


HIGHER_IS_BETTER = {"mel_psnr_db": True, "mel_ssim": True, "lsd_db": False, "mr_stft": False}


def against_uniform(results: dict) -> dict:
    """For each SADA setting, the uniform-caching settings it is at least as fast as, and whether it is better
    than each of them on every fidelity metric."""
    def better(a: dict, b: dict) -> bool:
        return all(a[k] > b[k] if up else a[k] < b[k] for k, up in HIGHER_IS_BETTER.items())

    uniform = {label: entry for label, entry in results.items() if label.startswith("uniform")}
    return {label: {other: better(entry, u) for other, u in uniform.items() if entry["speedup"] >= u["speedup"]}
            for label, entry in results.items() if label.startswith("sada")}


def real_size_unet():
    from diffusers import UNet2DConditionModel

    channels = (128, 256, 384, 640)
    return UNet2DConditionModel(
        sample_size=(256, 16), in_channels=8, out_channels=8, block_out_channels=channels, layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=channels, attention_head_dim=8, class_embed_type="simple_projection",
        projection_class_embeddings_input_dim=512, class_embeddings_concat=True).eval()


def run_real_size(setting: str, repeats: int, configs) -> dict:
    from rtdiff.audio.denoiser import MusicUNetDenoiser
    from rtdiff.runtime.accel.bac import calibrate as bac_calibrate
    from rtdiff.runtime.accel.bac import record_block_outputs
    from rtdiff.runtime.accel.composed import skip_lattice
    from rtdiff.runtime.accel.hooks import feed_forward_blocks
    from rtdiff.runtime.guidance import ClassifierFreeGuidance
    from rtdiff.runtime.sampling import sample
    from rtdiff.runtime.solvers import SchedulerConfig, make_solver

    from rtdiff.audio.tiny import SCHEDULER

    solver_name, steps = SETTINGS[setting]
    torch.manual_seed(0)
    denoiser = MusicUNetDenoiser(real_size_unet())
    text = torch.nn.functional.normalize(torch.randn(1, 512), dim=-1)
    uncond = torch.nn.functional.normalize(torch.randn(1, 512), dim=-1)
    guided = ClassifierFreeGuidance(denoiser, 2.0, {"text": uncond})
    solver = make_solver(solver_name, SchedulerConfig.from_dict({k: v for k, v in SCHEDULER.items()
                                                                  if not k.startswith("_")}), steps)
    noise = torch.randn(1, 8, 256, 16, generator=torch.Generator().manual_seed(0))

    def denoise(accelerator=None, x=noise):
        return sample(guided, solver, x.clone(), {"text": text}, accelerator=accelerator)

    def calibrate(solver, steps, fraction, sada, reuse):
        # BAC's own rule (a budget of updates per block, the paper's union of five): choosing by output error
        # would cost a trajectory per candidate, and on random weights the error means little
        # recorded on a quarter of the latent (2.56 s): every block's output at every step is kept
        outputs = record_block_outputs(lambda recorder: denoise(recorder, noise[:, :, :64]))
        skippable = skip_lattice(steps, sada["window"], sada["max_consecutive"]) if sada else set()
        schedule = bac_calibrate(outputs, max(1, round(fraction * steps)), feed_forward_blocks(denoiser), 5,
                                 set(range(steps)) - skippable)
        schedule.update(solver=solver, reuse=reuse)
        if sada:
            schedule.update(skippable=sorted(skippable),
                            sada={key: list(value) if isinstance(value, tuple) else value for key, value in sada.items()})
        return schedule

    specs = accelerator_specs(configs, calibrate, solver_name, steps)
    rows = {label: {"seconds": [], "stats": []} for label in specs}
    for _ in range(repeats):
        for label, spec in specs.items():
            accelerator = spec()
            started = time.perf_counter()
            denoise(accelerator)
            rows[label]["seconds"].append(time.perf_counter() - started)
            rows[label]["stats"].append(accelerator.stats())
    return summarise(rows, {"model": "MusicLDM-size UNet, random weights", "setting": setting,
                            "latent": [1, 8, 256, 16], "repeats": repeats})


def merged_results(paths: list[str]) -> list[dict]:
    by_setting = {}
    for path in paths:
        for result in json.loads(Path(path).read_text())["results"]:
            key = (result["model"], result["setting"])
            if key not in by_setting:
                by_setting[key] = {**result, "configs": dict(result["configs"])}
            else:
                for label, entry in result["configs"].items():
                    by_setting[key]["configs"].setdefault(label, entry)
    return list(by_setting.values())


def pareto_plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bundled = [r for r in results if "prompts" in r]
    figure, axes = plt.subplots(1, len(bundled), figsize=(6 * len(bundled), 4.2), squeeze=False)
    for ax, result in zip(axes[0], bundled):
        for label, entry in result["configs"].items():
            if label == "none":
                continue
            family = label.split("-")[0]
            ax.scatter(entry["speedup"], entry["mel_psnr_db"], label=label,
                       marker={"uniform": "s", "sada": "o", "bac": "^", "bac+sada": "*"}.get(family, "x"))
            ax.annotate(label, (entry["speedup"], entry["mel_psnr_db"]), fontsize=7)
        ax.set_xlabel("wall speedup (median over prompts)")
        ax.set_ylabel("log-mel PSNR vs unaccelerated (dB)")
        ax.set_title(f"{result['model']}, {result['setting']}")
        ax.grid(alpha=0.3)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="music-tiny")
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS),
                        help="bundled-model settings (none: only the real-size timing)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--configs", nargs="+", help="labels to run (default: all)")
    parser.add_argument("--real-size", action="store_true", help="also time a MusicLDM-size UNet")
    parser.add_argument("--real-size-repeats", type=int, default=2)
    parser.add_argument("--real-size-settings", nargs="+", default=["dpmpp-50"], choices=list(SETTINGS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    parser.add_argument("--plot")
    parser.add_argument("--plot-from", nargs="+", metavar="JSON",
                        help="draw --plot from earlier reports instead of running: a setting measured in several "
                             "runs is one panel, each configuration from the first run that has it")
    args = parser.parse_args()
    if args.plot_from:
        pareto_plot(merged_results(args.plot_from), args.plot)
        return
    torch.set_num_threads(args.threads)
    configs = [c for c in CONFIGS if args.configs is None or c[0] in args.configs or c[0] == "none"]
    prompts = benchmark_prompts(args.prompts)
    results = [run_bundled(args.model, setting, prompts, args.seconds, configs) for setting in args.settings]
    if args.real_size:
        results += [run_real_size(setting, args.real_size_repeats, configs) for setting in args.real_size_settings]
    report = {"threads": args.threads, "torch": torch.__version__, "results": results}
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        pareto_plot(results, args.plot)


if __name__ == "__main__":
    main()
