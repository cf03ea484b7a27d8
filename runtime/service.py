"""Services: what the server speaks to. A checkpoint's format makes its service from a run configuration."""

from __future__ import annotations

from rtdiff.runtime.checkpoints import checkpoint_format
from rtdiff.runtime.run import RunConfig


def make_service(run: RunConfig):
    """The service for `run.checkpoint`, of whatever modality registered its format."""
    fmt, folder = checkpoint_format(run.checkpoint)
    if fmt.service is None:
        raise ValueError(f"checkpoint {folder} ({fmt.name}) cannot be served")
    return fmt.service(folder, run)
