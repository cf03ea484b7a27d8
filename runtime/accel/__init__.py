"""Accelerators: step-level plans and block-level caching, attached to a denoiser from outside."""

from runtime.accel.bac import BACache
from runtime.accel.base import FULL, SKIP, Accelerator, UniformCache
from runtime.accel.composed import BACWithSADA
from runtime.accel.sada import StabilitySkip

ACCELERATORS = {
    "none": Accelerator,
    "uniform": UniformCache,
    "bac": BACache,
    "sada": StabilitySkip,
    "bac+sada": BACWithSADA,
}


def make_accelerator(name: str, **options) -> Accelerator:
    """`bac` and `bac+sada` need a schedule: `make_accelerator("bac", schedule=..., solver=..., steps=...)`."""
    if name not in ACCELERATORS:
        raise ValueError(f"unknown accelerator {name!r}; expected one of {sorted(ACCELERATORS)}")
    return ACCELERATORS[name](**options)


__all__ = ["ACCELERATORS", "FULL", "SKIP", "Accelerator", "BACWithSADA", "BACache", "StabilitySkip", "UniformCache", "make_accelerator"]
