"""Accelerators: step-level plans and block-level caching, attached to a denoiser from outside."""

from runtime.accel.bac import BACache
from runtime.accel.base import FULL, SKIP, Accelerator, UniformCache
from runtime.accel.sada import StabilitySkip

ACCELERATORS = {"none": Accelerator, "uniform": UniformCache, "bac": BACache, "sada": StabilitySkip}


def make_accelerator(name: str, **options) -> Accelerator:
    """`bac` needs its schedule: `make_accelerator("bac", schedule=..., solver=..., steps=...)`."""
    if name not in ACCELERATORS:
        raise ValueError(f"unknown accelerator {name!r}; expected one of {sorted(ACCELERATORS)}")
    return ACCELERATORS[name](**options)


__all__ = ["ACCELERATORS", "FULL", "SKIP", "Accelerator", "BACache", "StabilitySkip", "UniformCache", "make_accelerator"]
