"""Accelerators: step-level plans and block-level caching, attached to a denoiser from outside."""

import json

from rtdiff.runtime.accel.bac import BACache
from rtdiff.runtime.accel.base import FULL, SKIP, Accelerator, UniformCache
from rtdiff.runtime.accel.composed import BACWithSADA
from rtdiff.runtime.accel.sada import StabilitySkip

ACCELERATORS = {
    "none": Accelerator,
    "uniform": UniformCache,
    "bac": BACache,
    "sada": StabilitySkip,
    "bac+sada": BACWithSADA,
}


def parse_options(name: str, pairs: list[str]) -> dict:
    """`KEY=VALUE` strings, VALUE written as JSON (`threshold=0.02`, `window=[0.1,0.9]`, `tokenwise=true`), as
    the named accelerator's options; a key it does not take or a value that is not JSON is a ValueError."""
    if name not in ACCELERATORS:
        raise ValueError(f"unknown accelerator {name!r}; expected one of {sorted(ACCELERATORS)}")
    takes = ACCELERATORS[name].options
    options = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"an accelerator option is KEY=VALUE, got {pair!r}")
        if key not in takes:
            raise ValueError(f"accelerator {name!r} has no option {key!r}; it takes: {', '.join(takes) or 'none'}")
        try:
            options[key] = json.loads(text)
        except json.JSONDecodeError:
            raise ValueError(f"option {key}: {text!r} is not a JSON value (numbers, true/false, [lists])") from None
    return options


def make_accelerator(name: str, **options) -> Accelerator:
    """`bac` and `bac+sada` need a schedule: `make_accelerator("bac", schedule=..., solver=..., steps=...)`."""
    if name not in ACCELERATORS:
        raise ValueError(f"unknown accelerator {name!r}; expected one of {sorted(ACCELERATORS)}")
    return ACCELERATORS[name](**options)


__all__ = ["ACCELERATORS", "FULL", "SKIP", "Accelerator", "BACWithSADA", "BACache", "StabilitySkip", "UniformCache", "make_accelerator",
           "parse_options"]
