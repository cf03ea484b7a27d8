"""ONNX Runtime backend: an exported denoiser with one inference session per graph.

CPU everywhere; the CUDA execution provider is chosen when the installed
onnxruntime has it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from export.exported import ExportedDenoiser, ExportError


def session_options(threads: int = 1):
    import onnxruntime as ort

    options = ort.SessionOptions()
    # Small graphs at batch 1: one thread per session beats a pool that wakes for microseconds of work.
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OrtDenoiser(ExportedDenoiser):
    def __init__(self, folder: str | Path, checkpoint_sha256: str | None = None, threads: int = 1):
        super().__init__(folder, checkpoint_sha256)
        import onnxruntime as ort

        options, chosen = session_options(threads), providers()
        self.sessions = {(batch, k, form): ort.InferenceSession(str(path), options, providers=chosen)
                         for batch, k, form, path in self.graphs()}

    def to_backend(self, tensor: torch.Tensor, batch: int) -> np.ndarray:
        array = np.ascontiguousarray(tensor.detach().cpu().numpy(), dtype=np.float32)
        if len(array) == batch:
            return array
        return np.concatenate([array, np.repeat(array[-1:], batch - len(array), axis=0)])

    def to_torch(self, value: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(value)

    def run(self, batch: int, k: int, form: str, values: dict) -> None:
        part = self.pieces[k][form]
        outputs = self.sessions[batch, k, form].run(part["outputs"], {name: values[name] for name in part["inputs"]})
        values.update(zip(part["outputs"], outputs))


def use_onnxruntime(policy, folder: str | Path, checkpoint_sha256: str | None = None, threads: int = 1):
    """The policy with its denoiser replaced by the export in `folder` (in place; returns the policy)."""
    denoiser = OrtDenoiser(folder, checkpoint_sha256, threads)
    if denoiser.manifest["blocks"] != [name for name, _ in policy.denoiser.cache_blocks()]:
        raise ExportError(f"{folder} was exported from a model with other blocks than this policy's")
    policy.denoiser = denoiser
    return policy
