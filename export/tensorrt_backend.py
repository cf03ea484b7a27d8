"""TensorRT backend: engines built from the ONNX export, cached on disk, each replayed as a CUDA graph.

NOT RUN YET. The machines this was written on have no GPU and cannot install
TensorRT; the code follows TensorRT 10's and 11's documented Python API and
its tests skip unless `tensorrt` imports and CUDA is available.

- Build: a strongly typed network parsed from the ONNX graph, so precision
  comes from the graph's own types (TensorRT 11 has no FP16 builder flag;
  in 10 the same flag keeps both versions building the same engine).
- Cache: one engine file per (graph hash, TensorRT version, GPU name, compute
  capability), with its own hash beside it; a file that fails the hash or
  does not deserialize is rebuilt, never used.
- Run: fixed shapes, so every engine gets static input and output buffers,
  one `execute_async_v3` to warm up, then that call captured in a CUDA graph
  that each step replays.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from rtdiff.export.exported import ExportedDenoiser


class BackendUnavailable(ValueError):
    pass


def _trt():
    try:
        import tensorrt
    except ImportError:
        raise BackendUnavailable("the tensorrt backend needs the `tensorrt` package and an NVIDIA GPU") from None
    if not torch.cuda.is_available():
        raise BackendUnavailable("the tensorrt backend needs CUDA; torch sees no GPU")
    return tensorrt


def engine_key(onnx_bytes: bytes) -> str:
    trt = _trt()
    major, minor = torch.cuda.get_device_capability()
    parts = [hashlib.sha256(onnx_bytes).hexdigest(), trt.__version__, torch.cuda.get_device_name(), f"sm{major}{minor}"]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def build_engine(onnx_bytes: bytes, workspace_bytes: int = 1 << 30) -> bytes:
    trt = _trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):  # 10.x; always on (and gone) in 11.x
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ValueError(f"TensorRT could not parse the graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ValueError("TensorRT failed to build an engine (its log above says why)")
    return bytes(serialized)


def load_engine(onnx_path: Path, cache_dir: Path):
    """The deserialized engine for a graph, from the cache when a sound one is there, else built and cached."""
    trt = _trt()
    onnx_bytes = onnx_path.read_bytes()
    path = cache_dir / f"{engine_key(onnx_bytes)}.engine"
    digest_path = path.with_suffix(".sha256")
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    if path.is_file() and digest_path.is_file():
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() == digest_path.read_text().strip():
            engine = runtime.deserialize_cuda_engine(data)
            if engine is not None:
                return engine
    data = build_engine(onnx_bytes)
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    staging.write_bytes(data)
    os.replace(staging, path)
    digest_path.write_text(hashlib.sha256(data).hexdigest() + "\n")
    engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise ValueError(f"TensorRT cannot deserialize the engine it just built for {onnx_path}")
    return engine


class GraphedEngine:
    """One engine with static I/O buffers, its enqueue captured once as a CUDA graph and replayed per call."""

    def __init__(self, engine, stream: torch.cuda.Stream):
        trt = _trt()
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.buffers = {n: torch.zeros(tuple(engine.get_tensor_shape(n)), dtype=torch.float32, device="cuda")
                        for n in names}
        for name, buffer in self.buffers.items():
            self.context.set_tensor_address(name, buffer.data_ptr())
        self.stream = stream
        self.context.execute_async_v3(stream.cuda_stream)  # the first enqueue may do one-time work: not in the graph
        stream.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=stream):
            self.context.execute_async_v3(stream.cuda_stream)

    def __call__(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for name in self.inputs:
            self.buffers[name].copy_(inputs[name])
        self.graph.replay()
        # The buffers are overwritten by the next replay; the block cache keeps what we return.
        return {name: self.buffers[name].clone() for name in self.outputs}


class TrtDenoiser(ExportedDenoiser):
    def __init__(self, folder: str | Path, checkpoint_sha256: str | None = None, cache_dir: str | Path | None = None):
        _trt()  # fail first, and clearly, where TensorRT or the GPU is missing
        super().__init__(folder, checkpoint_sha256)
        from rtdiff.runtime.checkpoints import cache_root

        cache_dir = Path(cache_dir) if cache_dir else cache_root() / "tensorrt"
        self.stream = torch.cuda.Stream()
        self.engines = {(batch, k, form): GraphedEngine(load_engine(path, cache_dir), self.stream)
                        for batch, k, form, path in self.graphs()}
        self._caller_device = torch.device("cpu")

    def to_backend(self, tensor: torch.Tensor, batch: int) -> torch.Tensor:
        self._caller_device = tensor.device
        tensor = tensor.to("cuda", torch.float32)
        if len(tensor) < batch:
            tensor = torch.cat([tensor, tensor[-1:].expand(batch - len(tensor), *tensor.shape[1:])])
        return tensor

    def to_torch(self, value: torch.Tensor) -> torch.Tensor:
        return value.to(self._caller_device)

    def run(self, batch: int, k: int, form: str, values: dict) -> None:
        part = self.pieces[k][form]
        caller = torch.cuda.current_stream()
        self.stream.wait_stream(caller)  # inputs were written on the caller's stream
        with torch.cuda.stream(self.stream):
            outputs = self.engines[batch, k, form]({name: values[name] for name in part["inputs"]})
        caller.wait_stream(self.stream)
        values.update(outputs)
