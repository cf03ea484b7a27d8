"""Synthetic music with captions from the parameters that made it: the bundled model's training data.

A clip is a melody on a scale over a bar-by-bar chord progression, played by
one of a few additive timbres, with or without a drum pattern, at a slow or a
fast tempo, in a low or a high register. Its caption names exactly those
choices (slow/fast, low/high, major/minor, with/without drums, the timbre), in
one of several phrasings. Everything is drawn from a seed, so a dataset is its
command line: nothing is downloaded or stored.

Some attribute combinations and one phrasing never appear in training
(`HELD_OUT`, `HELD_OUT_TEMPLATE`): benchmarks/audio_quality.py prompts with
them to see whether the model follows words it saw only in other company.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SAMPLE_RATE = 16_000
TIMBRES = ("piano", "organ", "flute", "guitar", "synth")
TEMPI = {"slow": (66.0, 84.0), "fast": (138.0, 168.0)}  # beats per minute
REGISTERS = {"low": (43, 55), "high": (74, 86)}  # MIDI range of the melody
SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10)}
PROGRESSIONS = {"major": ((0, 4, 5, 3), (0, 3, 4, 0), (0, 5, 3, 4)),  # scale degrees of each bar's chord root
                "minor": ((0, 5, 3, 4), (0, 3, 4, 0), (0, 6, 5, 4))}
DRUM_PATTERNS = (  # per eighth note of a 4/4 bar: kick, snare, hat
    ("x...x...", "..x...x.", "xxxxxxxx"),
    ("x.x.x.x.", "..x...x.", ".x.x.x.x"),
    ("x.....x.", "....x...", "x.x.x.x."),
)

TEMPLATES = (
    "a {tempo} {register} {timbre} melody in {mode} {drums}",
    "{tempo} {mode} music on a {register} {timbre} {drums}",
    "a {register} {timbre} tune, {tempo}, in a {mode} key, {drums}",
    "{drums_first}, a {tempo} {mode} {timbre} melody in a {register} register",
)
HELD_OUT_TEMPLATE = "a {mode} {timbre} piece, {tempo} and {register}, {drums}"
# (timbre, mode, drums) combinations no training clip has, whatever its tempo and register
HELD_OUT = frozenset({("piano", "minor", True), ("organ", "major", False), ("flute", "minor", False),
                      ("guitar", "major", True), ("synth", "minor", True)})


@dataclass(frozen=True)
class Clip:
    """What one clip is made of; `caption` says it in words."""

    timbre: str
    tempo: str  # slow | fast
    register: str  # low | high
    mode: str  # major | minor
    drums: bool
    bpm: float
    root: int  # pitch class of the key
    seed: int

    def words(self) -> dict[str, str]:
        drums = "with drums" if self.drums else "without drums"
        return {"tempo": self.tempo, "register": self.register, "timbre": self.timbre, "mode": self.mode,
                "drums": drums, "drums_first": drums}

    def caption(self, template: str) -> str:
        return template.format(**self.words())

    @property
    def held_out(self) -> bool:
        return (self.timbre, self.mode, self.drums) in HELD_OUT


def draw_clip(rng: np.random.Generator, seed: int, held_out: bool = False, **fixed) -> Clip:
    """Random parameters (any given in `fixed` kept); with held_out=False the combination is a training one."""
    while True:
        choice = {"timbre": str(rng.choice(TIMBRES)), "tempo": str(rng.choice(list(TEMPI))),
                  "register": str(rng.choice(list(REGISTERS))), "mode": str(rng.choice(list(SCALES))),
                  "drums": bool(rng.integers(2))}
        choice.update(fixed)
        low, high = TEMPI[choice["tempo"]]
        clip = Clip(**choice, bpm=float(rng.uniform(low, high)), root=int(rng.integers(12)), seed=seed)
        if clip.held_out == held_out or fixed.keys() >= {"timbre", "mode", "drums"}:
            return clip


def training_caption(clip: Clip, rng: np.random.Generator) -> str:
    return clip.caption(TEMPLATES[int(rng.integers(len(TEMPLATES)))])


# -- sound ---------------------------------------------------------------------------------------------------

def midi_hz(note: float) -> float:
    return 440.0 * 2.0 ** ((note - 69) / 12)


def envelope(n: int, attack: float, decay: float | None, release: float = 0.02) -> np.ndarray:
    """Attack ramp, then an exponential decay (time constant `decay` s) or a sustain, and a short release."""
    t = np.arange(n) / SAMPLE_RATE
    shape = np.minimum(t / max(attack, 1e-4), 1.0)
    if decay is not None:
        shape = shape * np.exp(-np.maximum(t - attack, 0.0) / decay)
    tail = min(int(release * SAMPLE_RATE), n)
    shape[n - tail:] *= np.linspace(1.0, 0.0, tail)
    return shape


def harmonics(freq: float, n: int, amplitudes, decays=None, vibrato: float = 0.0) -> np.ndarray:
    t = np.arange(n) / SAMPLE_RATE
    phase = 2 * np.pi * freq * (t + vibrato * np.sin(2 * np.pi * 5.0 * t) / (2 * np.pi * 5.0))
    out = np.zeros(n)
    for k, amplitude in enumerate(amplitudes, start=1):
        if freq * k >= SAMPLE_RATE / 2 - 500:
            break
        partial = amplitude * np.sin(k * phase)
        if decays is not None:
            partial *= np.exp(-t / decays[k - 1])
        out += partial
    return out


def note(timbre: str, freq: float, seconds: float, rng: np.random.Generator) -> np.ndarray:
    n = max(int(seconds * SAMPLE_RATE), 16)
    if timbre == "piano":
        k = np.arange(1, 11)
        sound = harmonics(freq, n, 1.0 / k**1.4, decays=0.9 / k**0.7) * envelope(n, 0.004, None)
    elif timbre == "organ":
        sound = harmonics(freq, n, (1.0, 0.7, 0.45, 0.35, 0.0, 0.25, 0.0, 0.2)) * envelope(n, 0.015, None, 0.03)
    elif timbre == "flute":
        tone = harmonics(freq, n, (1.0, 0.25, 0.08), vibrato=0.004)
        breath = np.convolve(rng.standard_normal(n), np.ones(8) / 8, mode="same") * 0.05
        sound = (tone + breath) * envelope(n, 0.06, None, 0.05)
    elif timbre == "guitar":
        k = np.arange(1, 13)
        sound = harmonics(freq, n, 1.0 / k, decays=0.5 / k**0.9) * envelope(n, 0.002, 0.6)
    elif timbre == "synth":
        k = np.arange(1, 25)
        sound = harmonics(freq, n, 0.8 / k) * envelope(n, 0.01, 0.35)
    else:
        raise ValueError(f"unknown timbre {timbre!r}; expected one of {TIMBRES}")
    return sound


def drum(kind: str, rng: np.random.Generator) -> np.ndarray:
    n = int(0.2 * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    if kind == "kick":
        sweep = 45 + 90 * np.exp(-t / 0.03)
        return np.sin(2 * np.pi * np.cumsum(sweep) / SAMPLE_RATE) * np.exp(-t / 0.12)
    noise = rng.standard_normal(n)
    if kind == "snare":
        return (0.6 * np.diff(noise, prepend=0.0) + 0.5 * np.sin(2 * np.pi * 190 * t)) * np.exp(-t / 0.07)
    bright = noise - np.convolve(noise, np.ones(4) / 4, mode="same")  # hat: the noise's highs
    return 0.5 * bright * np.exp(-t / 0.025)


def add(track: np.ndarray, sound: np.ndarray, start: int, gain: float) -> None:
    if start >= len(track):
        return
    end = min(len(track), start + len(sound))
    track[start:end] += gain * sound[:end - start]


def render(clip: Clip, seconds: float) -> np.ndarray:
    """The clip's audio: float32 mono at SAMPLE_RATE, peak 0.5 times a small random gain."""
    rng = np.random.default_rng(clip.seed)
    n = int(seconds * SAMPLE_RATE)
    beat = 60.0 / clip.bpm
    scale = SCALES[clip.mode]
    low, high = REGISTERS[clip.register]
    track = np.zeros(n)

    # melody: a walk on the scale, one beat or two half beats per beat
    degrees = [d for d in range(-14, 22) if low <= _pitch(clip.root, scale, d) <= high]
    position = int(rng.integers(len(degrees)))
    time = float(rng.uniform(0, beat / 2))
    while time < seconds:
        length = beat if rng.random() < 0.5 else beat / 2
        position = int(np.clip(position + rng.integers(-2, 3), 0, len(degrees) - 1))
        pitch = _pitch(clip.root, scale, degrees[position])
        add(track, note(clip.timbre, midi_hz(pitch), length * 0.95, rng), int(time * SAMPLE_RATE), 0.5)
        time += length

    # chords: a triad per bar an octave below the melody's range
    progression = PROGRESSIONS[clip.mode][int(rng.integers(len(PROGRESSIONS[clip.mode])))]
    bar = 4 * beat
    base_degree = next(d for d in range(-21, 21) if _pitch(clip.root, scale, d) >= low - 12)
    for index in range(int(seconds / bar) + 1):
        root_degree = base_degree + progression[index % len(progression)]
        for offset in (0, 2, 4):
            pitch = _pitch(clip.root, scale, root_degree + offset)
            add(track, note(clip.timbre, midi_hz(pitch), bar * 0.98, rng), int(index * bar * SAMPLE_RATE), 0.12)

    if clip.drums:
        kick, snare, hat = DRUM_PATTERNS[int(rng.integers(len(DRUM_PATTERNS)))]
        sounds = {name: drum(name, rng) for name in ("kick", "snare", "hat")}
        for eighth in range(int(seconds / (beat / 2)) + 1):
            start = int(eighth * beat / 2 * SAMPLE_RATE)
            for name, pattern, gain in (("kick", kick, 0.9), ("snare", snare, 0.5), ("hat", hat, 0.25)):
                if pattern[eighth % 8] == "x":
                    add(track, sounds[name], start, gain)

    peak = np.abs(track).max()
    return (track / max(peak, 1e-6) * 0.5 * rng.uniform(0.7, 1.0)).astype(np.float32)


def _pitch(root: int, scale: tuple[int, ...], degree: int) -> int:
    """MIDI pitch of a scale degree counted from the key's root in octave 4 (degree 0 = MIDI 60 + root)."""
    octave, step = divmod(degree, len(scale))
    return 60 + root + 12 * octave + scale[step]


def dataset(count: int, seconds: float, seed: int = 0, held_out: bool = False):
    """`count` (clip, caption, audio) triples, the same for the same arguments."""
    rng = np.random.default_rng(seed)
    for index in range(count):
        clip = draw_clip(rng, seed=seed * 1_000_003 + index, held_out=held_out)
        yield clip, training_caption(clip, rng), render(clip, seconds)
