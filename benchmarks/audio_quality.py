"""Prompt adherence of a music model on captions held out from its training, with the synthetic clips as ceiling.

    python benchmarks/audio_quality.py --model music-tiny --json benchmarks/results/audio_quality.json

Prompts use the held-out phrasing and the attribute combinations no training
clip had (audio/data.py: HELD_OUT, HELD_OUT_TEMPLATE). Pairs differ in one
word, and each pair counts as ordered correctly when the measured feature
moves the way the word says:

- register (low vs high): spectral centroid, median over frames, higher for "high";
- tempo (slow vs fast): onsets per second (librosa's onset detector), higher for "fast";
- drums (without vs with): the percussive share of the energy (librosa's HPSS), higher for "with drums".

For each pair and seed the model generates both prompts from the same initial
noise. The ceiling is the same measurement on clips synthesised with the
pairs' parameters (audio/data.py), which no feature orders perfectly either.

`tempo_diagnostics` (beside the measure above, not instead of it) says where tempo is lost: the same
onset detector run on log-mels at the model's own resolution (64 bands, 10 ms), for the generated clips'
VAE output before the vocoder and for the synthetic clips' log-mels; and the waveform measure on the
synthetic clips' log-mels resynthesised by the model's vocoder (the vocoder's own ceiling).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time
from pathlib import Path

import numpy as np

from rtdiff.audio import data


def register_feature(wave: np.ndarray, rate: int) -> float:
    import librosa

    return float(np.median(librosa.feature.spectral_centroid(y=wave, sr=rate)))


def tempo_feature(wave: np.ndarray, rate: int) -> float:
    import librosa

    return len(librosa.onset.onset_detect(y=wave, sr=rate)) / (len(wave) / rate)


def mel_tempo_feature(log_mel: np.ndarray) -> float:
    """Onsets per second of a (frames, bins) natural-log magnitude mel (audio/features.py), in dB for librosa."""
    import librosa

    from rtdiff.audio import features

    envelope = librosa.onset.onset_strength(S=20 / np.log(10) * log_mel.T, sr=features.SAMPLE_RATE,
                                            hop_length=features.HOP)
    onsets = librosa.onset.onset_detect(onset_envelope=envelope, sr=features.SAMPLE_RATE, hop_length=features.HOP)
    return len(onsets) / (len(log_mel) * features.HOP / features.SAMPLE_RATE)


def drums_feature(wave: np.ndarray, rate: int) -> float:
    import librosa

    harmonic, percussive = librosa.effects.hpss(wave)
    return float(np.sum(percussive**2) / max(np.sum(harmonic**2) + np.sum(percussive**2), 1e-12))


FEATURES = {"register": (register_feature, "low", "high"), "tempo": (tempo_feature, "slow", "fast"),
            "drums": (drums_feature, False, True)}


def held_out_pairs() -> dict[str, list[tuple[dict, dict]]]:
    """For each attribute, pairs of held-out parameter sets that differ in it alone."""
    pairs = {name: [] for name in FEATURES}
    for timbre, mode, drums in sorted(data.HELD_OUT):
        for tempo, register in itertools.product(data.TEMPI, data.REGISTERS):
            base = {"timbre": timbre, "mode": mode, "drums": drums, "tempo": tempo, "register": register}
            if register == "low":
                pairs["register"].append((base, {**base, "register": "high"}))
            if tempo == "slow":
                pairs["tempo"].append((base, {**base, "tempo": "fast"}))
            # the other side of a drums pair is a training combination: only the held-out side is new
            pairs["drums"].append(({**base, "drums": False}, {**base, "drums": True}))
    return pairs


def caption(params: dict) -> str:
    clip = data.Clip(**params, bpm=100.0, root=0, seed=0)
    return clip.caption(data.HELD_OUT_TEMPLATE)


def ceiling_pairs(attribute_pairs, seconds: float, seeds: int):
    """(seed, wave of a, wave of b) of synthetic clips for each pair and seed."""
    for (a, b), seed in itertools.product(attribute_pairs, range(seeds)):
        rng = np.random.default_rng(seed)
        clip_a = data.draw_clip(rng, seed=seed, held_out=True, **a)
        bpm = clip_a.bpm if a["tempo"] == b["tempo"] else float(rng.uniform(*data.TEMPI[b["tempo"]]))
        clip_b = dataclasses.replace(clip_a, **b, bpm=bpm)  # same key, same melody draws
        yield seed, data.render(clip_a, seconds), data.render(clip_b, seconds)


def measure_ceiling(pairs, seconds: float, seeds: int) -> dict:
    results = {}
    for name, attribute_pairs in pairs.items():
        feature = FEATURES[name][0]
        correct = [feature(wave_b, data.SAMPLE_RATE) > feature(wave_a, data.SAMPLE_RATE)
                   for _, wave_a, wave_b in ceiling_pairs(attribute_pairs, seconds, seeds)]
        results[name] = {"pairs": len(correct), "ordered": float(np.mean(correct))}
    return results


def measure_tempo_diagnostics(pipeline, tempo_pairs, seconds: float, seeds: int, generated_mels: dict) -> dict:
    """Tempo order on the generated log-mels (before the vocoder), on the synthetic clips' log-mels, and on the
    synthetic clips resynthesised by the model's vocoder."""
    import torch

    from rtdiff.audio import features

    def resynthesised(log_mel: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return pipeline.model.vocoder(torch.from_numpy(log_mel)[None]).numpy()[0]

    generated, synthetic_mel, synthetic_vocoded = [], [], []
    for (a, b), seed in itertools.product(tempo_pairs, range(seeds)):
        generated.append(mel_tempo_feature(generated_mels[(caption(b), seed)])
                         > mel_tempo_feature(generated_mels[(caption(a), seed)]))
    for _, wave_a, wave_b in ceiling_pairs(tempo_pairs, seconds, seeds):
        mel_a, mel_b = (features.log_mel(torch.from_numpy(w)[None].float())[0].numpy() for w in (wave_a, wave_b))
        synthetic_mel.append(mel_tempo_feature(mel_b) > mel_tempo_feature(mel_a))
        synthetic_vocoded.append(tempo_feature(resynthesised(mel_b), data.SAMPLE_RATE)
                                 > tempo_feature(resynthesised(mel_a), data.SAMPLE_RATE))
    return {"pairs": len(generated), "generated_mel_ordered": float(np.mean(generated)),
            "synthetic_mel_ordered": float(np.mean(synthetic_mel)),
            "synthetic_resynthesised_ordered": float(np.mean(synthetic_vocoded))}


def measure_model(model_name: str, pairs, seconds: float, seeds: int, steps: int, solver: str, guidance: float,
                  batch: int) -> dict:
    import torch

    from rtdiff.audio.cli import load_music_model
    from rtdiff.audio.pipeline import TextToMusic

    pipeline = TextToMusic(load_music_model(model_name))
    prompts = sorted({caption(p) for attribute_pairs in pairs.values() for pair in attribute_pairs for p in pair})
    waves, mels = {}, {}
    started = time.perf_counter()
    for seed in range(seeds):
        noise = pipeline.initial_latents(1, seconds, torch.Generator().manual_seed(seed))
        for start in range(0, len(prompts), batch):
            chunk = prompts[start:start + batch]
            music = pipeline.generate(chunk, seconds, steps=steps, solver=solver, guidance=guidance,
                                      latents=noise.expand(len(chunk), -1, -1, -1).clone())
            waves.update({(text, seed): wave for text, wave in zip(chunk, music.wave.numpy())})
            mels.update({(text, seed): mel[0] for text, mel in zip(chunk, music.mel.numpy())})
    generate_s = time.perf_counter() - started
    results = {}
    for name, attribute_pairs in pairs.items():
        feature = FEATURES[name][0]
        values = {key: feature(wave, pipeline.model.sample_rate) for key, wave in waves.items()}
        correct, misordered = [], []
        for (a, b), seed in itertools.product(attribute_pairs, range(seeds)):
            low, high = values[(caption(a), seed)], values[(caption(b), seed)]
            correct.append(high > low)
            if not correct[-1]:  # for finding where the model loses an attribute
                misordered.append({"seed": seed, "prompts": [caption(a), caption(b)], "values": [low, high]})
        results[name] = {"pairs": len(correct), "ordered": float(np.mean(correct)), "misordered": misordered}
    results["tempo_diagnostics"] = measure_tempo_diagnostics(pipeline, pairs["tempo"], seconds, seeds, mels)
    return {"prompts": len(prompts), "generate_s": generate_s, **results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="music-tiny")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--solver", default="dpmpp")
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    pairs = held_out_pairs()
    report = {"model": args.model, "seconds": args.seconds, "seeds": args.seeds, "steps": args.steps,
              "solver": args.solver, "guidance": args.guidance,
              "ceiling": measure_ceiling(pairs, args.seconds, args.seeds),
              "model_results": measure_model(args.model, pairs, args.seconds, args.seeds, args.steps, args.solver,
                                             args.guidance, args.batch)}
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
