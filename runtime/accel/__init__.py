"""Accelerators: step-level plans and block-level caching, attached to a denoiser from outside."""

import dataclasses
import json

from rtdiff.runtime.accel.bac import BACache
from rtdiff.runtime.accel.base import FULL, SKIP, Accelerator, UniformCache
from rtdiff.runtime.accel.composed import BACWithSADA
from rtdiff.runtime.accel.sada import StabilitySkip

SCHEDULED = ("bac", "bac+sada")  # accelerators that run on a block schedule calibrated per checkpoint

ACCELERATORS = {
    "none": Accelerator,
    "uniform": UniformCache,
    "bac": BACache,
    "sada": StabilitySkip,
    "bac+sada": BACWithSADA,
}


def _accelerator_class(name: str):
    if name not in ACCELERATORS:
        raise ValueError(f"unknown accelerator {name!r}; expected one of {sorted(ACCELERATORS)}")
    return ACCELERATORS[name]


def option_names(name: str) -> list[str]:
    return [f.name for f in dataclasses.fields(_accelerator_class(name).Options)]


def check_options(name: str, options: dict):
    """The named accelerator's typed options (its `Options` dataclass, which checks every value), or a
    ValueError naming the key it does not take or the value that is wrong."""
    takes = option_names(name)
    unknown = [key for key in options if key not in takes]
    if unknown:
        raise ValueError(f"accelerator {name!r} has no option {unknown[0]!r}; it takes: {', '.join(takes) or 'none'}")
    try:
        return _accelerator_class(name).Options(**options)
    except TypeError as error:
        raise ValueError(f"accelerator {name!r}: {error}") from None


def parse_options(name: str, pairs: list[str]) -> dict:
    """`KEY=VALUE` strings, VALUE written as JSON (`threshold=0.02`, `window=[0.1,0.9]`, `tokenwise=true`) or as
    a bare word for a string (`estimate=lagrange`), as the named accelerator's options, checked by its
    `Options`; a key it does not take, a value that is neither, or one of the wrong kind is a ValueError."""
    options = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"an accelerator option is KEY=VALUE, got {pair!r}")
        try:
            options[key] = json.loads(text)
        except json.JSONDecodeError:
            if text.isidentifier():
                options[key] = text
                continue
            raise ValueError(f"option {key}: {text!r} is not a JSON value (numbers, true/false, [lists])") from None
    check_options(name, options)
    return options


def make_accelerator(name: str, **options) -> Accelerator:
    """`bac` and `bac+sada` need a schedule: `make_accelerator("bac", schedule=..., solver=..., steps=...)`."""
    return _accelerator_class(name)(**options)


@dataclasses.dataclass(frozen=True)
class AcceleratorSpec:
    """How to make a request's accelerator: a service holds one spec and calls it once per request or stream,
    so no cache, counter or history is ever shared between two trajectories."""

    name: str = "none"
    options: dict = dataclasses.field(default_factory=dict)  # the user's, checked by the accelerator's Options
    schedule: dict | None = None  # bac, bac+sada
    solver: str | None = None
    steps: int | None = None
    checkpoint_hash: str | None = None

    def __post_init__(self):
        check_options(self.name, self.options)
        if (self.name in SCHEDULED) != (self.schedule is not None):
            raise ValueError(f"accelerator {self.name!r} " + ("needs a schedule" if self.name in SCHEDULED
                                                                else "takes no schedule"))
        if self.schedule is not None:
            self()  # a schedule for other steps, solver or weights fails here, once, not per request

    def __call__(self) -> Accelerator:
        if self.schedule is None:
            return make_accelerator(self.name, **self.options)
        return make_accelerator(self.name, schedule=self.schedule, solver=self.solver, steps=self.steps,
                                checkpoint_hash=self.checkpoint_hash, **self.options)


__all__ = ["ACCELERATORS", "SCHEDULED", "FULL", "SKIP", "Accelerator", "AcceleratorSpec", "BACWithSADA", "BACache",
           "StabilitySkip", "UniformCache", "check_options", "make_accelerator", "option_names", "parse_options"]
