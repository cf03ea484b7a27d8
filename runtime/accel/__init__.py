"""Accelerators: step-level plans and block-level caching, attached to a denoiser from outside."""

from runtime.accel.base import FULL, SKIP, Accelerator, UniformCache

ACCELERATORS = {"none": Accelerator, "uniform": UniformCache}


def make_accelerator(name: str, **options) -> Accelerator:
    if name not in ACCELERATORS:
        raise ValueError(f"unknown accelerator {name!r}; expected one of {sorted(ACCELERATORS)}")
    return ACCELERATORS[name](**options)


__all__ = ["ACCELERATORS", "FULL", "SKIP", "Accelerator", "UniformCache", "make_accelerator"]
