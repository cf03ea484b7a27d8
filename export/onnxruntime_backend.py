"""ONNX Runtime backend: an exported denoiser with one inference session per graph.

CPU everywhere; the CUDA execution provider is chosen when the installed
onnxruntime has it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rtdiff.export.exported import ExportedDenoiser


def session_options(threads: int = 1):
    import onnxruntime as ort

    options = ort.SessionOptions()
    # Small graphs at batch 1: one thread per session beats a pool that wakes for microseconds of work.
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: fp16 graphs on CPU log every op it computes in fp32 instead
    return options


def providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OrtDenoiser(ExportedDenoiser):
    """Values between pieces stay ONNX Runtime values on the session's device (I/O binding): with the CUDA
    provider nothing returns to the host until the model's output does."""

    def __init__(self, folder: str | Path, checkpoint_sha256: str | None = None, threads: int = 1):
        super().__init__(folder, checkpoint_sha256)
        import onnxruntime as ort

        options, chosen = session_options(threads), providers()
        self.device = "cuda" if chosen[0] == "CUDAExecutionProvider" else "cpu"
        self.sessions = {(batch, k, form): ort.InferenceSession(str(path), options, providers=chosen)
                         for batch, k, form, path in self.graphs()}

    def to_backend(self, tensor: torch.Tensor, batch: int):
        import onnxruntime as ort

        array = np.ascontiguousarray(tensor.detach().cpu().numpy(), dtype=np.float32)
        if len(array) < batch:
            array = np.concatenate([array, np.repeat(array[-1:], batch - len(array), axis=0)])
        return ort.OrtValue.ortvalue_from_numpy(array, self.device, 0)

    def to_torch(self, value) -> torch.Tensor:
        return torch.from_numpy(value.numpy())

    def run(self, batch: int, k: int, form: str, values: dict) -> None:
        part = self.pieces[k][form]
        session = self.sessions[batch, k, form]
        binding = session.io_binding()
        for name in part["inputs"]:
            binding.bind_ortvalue_input(name, values[name])
        for name in part["outputs"]:
            binding.bind_output(name, self.device)
        session.run_with_iobinding(binding)
        values.update(zip(part["outputs"], binding.get_outputs()))
