"""Modalities register themselves; the core finds them here and imports none of them by name.

A modality package (policies/, audio/, video/) exposes one `Modality` under
the `rtdiff.modalities` entry-point group of its distribution
(pyproject.toml). Adding a modality is a new package and one entry-point line:
no core file changes.
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Callable

from rtdiff.runtime.checkpoints import CheckpointFormat

GROUP = "rtdiff.modalities"


@dataclass(frozen=True)
class Modality:
    name: str
    checkpoint_formats: list[CheckpointFormat] = field(default_factory=list)
    bundled: Path | None = None  # a folder of checkpoints shipped with the package, addressed by folder name
    add_commands: Callable[[argparse._SubParsersAction], None] | None = None  # the modality's CLI subcommands
    add_demos: Callable[[argparse._SubParsersAction], None] | None = None  # its targets of `rtdiff demo TARGET`


@functools.cache
def modalities() -> tuple[Modality, ...]:
    found = []
    for point in sorted(entry_points(group=GROUP), key=lambda p: p.name):
        modality = point.load()
        if not isinstance(modality, Modality):
            raise TypeError(f"entry point {point.name} ({point.value}) is not an rtdiff Modality")
        found.append(modality)
    return tuple(found)
