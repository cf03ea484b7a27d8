"""One run's configuration, built and checked once and handed down: what to load and how to sample it."""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class RunConfig:
    checkpoint: str  # a bundled name or a folder, as the user gave it
    solver: str | None = None  # None: the checkpoint's own scheduler settings
    steps: int | None = None
    accel: str = "none"
    accel_options: dict = field(default_factory=dict)
    accel_schedule: dict | None = None  # bac, bac+sada: None reads the checkpoint's own (runtime/checkpoints.py)
    backend: str = "torch"
    batch_sizes: tuple[int, ...] = (1,)  # the static shapes an exported backend is built for
    threads: int = 1
    seed: int = 0  # the service's generator, for requests that bring no seed

    def __post_init__(self):
        from rtdiff.export.backends import check_backend
        from rtdiff.runtime.accel import check_options
        from rtdiff.runtime.solvers import SOLVERS

        if self.solver is not None and self.solver not in SOLVERS:
            raise ValueError(f"unknown solver {self.solver!r}; expected one of {sorted(SOLVERS)}")
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int)
                                       or self.steps < 1):
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        check_backend(self.backend)
        check_options(self.accel, self.accel_options)
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch sizes must be positive, got {self.batch_sizes}")

    def with_solver(self, solver: str, steps: int) -> RunConfig:
        """This run with the solver settled (the checkpoint's own where the user named none)."""
        return replace(self, solver=self.solver or solver, steps=self.steps or steps)
