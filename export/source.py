"""What export needs to know about a model, whatever its modality: the modality builds it, export reads it.

A checkpoint format's `export_source(folder)` returns one. Export then never
loads a checkpoint itself, and never learns what the model's inputs mean.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn


@dataclass
class ExportSource:
    label: str  # how the manifest names the checkpoint (a bundled name or a path)
    denoiser: nn.Module  # forward(x, t, cond) with cache_blocks(), in eval mode
    weights_sha256: str
    # example model inputs {"x", "t", "cond"} at a batch size: they fix the graphs' static shapes
    example_inputs: Callable[[int], dict[str, torch.Tensor]]
    description: dict = field(default_factory=dict)  # copied into the manifest (architecture, input shapes)
    # the model inputs along real trajectories, for fp16 overflow checks: (batch, solver, steps) -> {"x", "t", "cond"}
    # with x and t stacked over steps; None: the export carries no calibration data
    trajectory_inputs: Callable[[int, str, int], tuple[dict[str, torch.Tensor], str]] | None = None


def export_source(checkpoint) -> ExportSource:
    """The export source of any registered checkpoint."""
    from rtdiff.runtime.checkpoints import checkpoint_format

    fmt, folder = checkpoint_format(checkpoint)
    if fmt.export_source is None:
        raise ValueError(f"checkpoint {folder} ({fmt.name}) cannot be exported")
    return fmt.export_source(folder, label=str(checkpoint))
