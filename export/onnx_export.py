"""ONNX export of a policy's denoiser, one graph per schedule segment and form, plus `manifest.json`.

    rtdiff export --checkpoint pusht-transformer --schedule bac-ddim-10.json --batch 1,16 --out exports/tr

Layout of the output folder:

    manifest.json              what each graph is, reads and writes; hashes of checkpoint, schedule, graphs
    b1/piece00_full.onnx       piece 0 computing its blocks, batch 1
    b1/piece00_cached.onnx     piece 0 with its blocks' outputs given (absent when nothing is left to run)
    ...
    calibration.safetensors    fp16 only: model inputs along real trajectories, for the overflow check

Shapes are static per exported batch size (TensorRT builds for fixed shapes;
CUDA graphs need them). The diffusion step goes in as float32, so no int64
tensor reaches a graph, and the sinusoidal embedding is exported as real
Sin/Cos nodes. fp16 graphs compute in half precision behind fp32 inputs and
outputs (export/fp16.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from rtdiff.export.fp16 import half_precision
from rtdiff.export.segments import Part, segments_from_schedule, split
from rtdiff.export.source import ExportSource, export_source
from rtdiff.runtime.accel.bac import load_schedule

FORMAT = "rtdiff-export/2"  # 2: conditioning inputs named as the model's forward names them (was one "cond")
MANIFEST = "manifest.json"
FORMS = ("full", "cached")
DEFAULT_OPSET = 17
PRECISIONS = ("fp32", "fp16")
CALIBRATION = "calibration.safetensors"


def export_onnx(checkpoint: str | ExportSource, out: str | Path, schedule_path: str | Path | None = None,
                batch_sizes: tuple[int, ...] = (1,), precision: str = "fp32", opset: int = DEFAULT_OPSET) -> dict:
    """Write the graphs and the manifest; returns the manifest. `checkpoint`: any registered checkpoint, or
    the export source a modality built for one."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if opset < 17:
        raise ValueError(f"opset {opset}: rtdiff exports opset 17 or newer")
    out = Path(out)
    source = checkpoint if isinstance(checkpoint, ExportSource) else export_source(checkpoint)
    denoiser = source.denoiser.eval()
    weights = source.weights_sha256
    schedule, schedule_info = None, None
    if schedule_path is not None:
        schedule = load_schedule(Path(schedule_path))
        if schedule.get("checkpoint_sha256", weights) != weights:
            raise ValueError(f"schedule {schedule_path} was calibrated on other weights than {source.label}")
        schedule_info = {"path": str(schedule_path), "sha256": sha256(Path(schedule_path).read_bytes()),
                         "solver": schedule.get("solver"), "steps": schedule["steps"]}
    block_names = [name for name, _, _ in denoiser.cache_blocks()]
    pieces = split(denoiser, segments_from_schedule(block_names, schedule))

    manifest = {
        "format": FORMAT, "checkpoint": source.label, "checkpoint_sha256": weights, "schedule": schedule_info,
        **source.description, "opset": opset, "precision": precision, "batch_sizes": list(batch_sizes),
        "torch": torch.__version__, "blocks": block_names, "values": {}, "pieces": [],
        "conditions": [name for name in source.example_inputs(1) if name not in ("x", "t")],
    }
    for piece in pieces:
        manifest["pieces"].append({"blocks": piece.blocks, "block_values": piece.block_values,
                                   **{form: {"inputs": getattr(piece, form).inputs,
                                             "outputs": getattr(piece, form).outputs, "files": {}}
                                      for form in FORMS}})
    jobs = [(b, k, form) for b in batch_sizes for k in range(len(pieces)) for form in FORMS
            if getattr(pieces[k], form).outputs]
    progress = tqdm(jobs, desc="export onnx", unit="graph", leave=False)
    examples = {}
    for batch, k, form in progress:
        if batch not in examples:
            examples[batch] = _example_values(pieces, source, batch)
            manifest["values"][str(batch)] = {name: list(v.shape) for name, v in examples[batch].items()}
        part = getattr(pieces[k], form)
        data = _onnx_bytes(part, examples[batch], opset, precision)
        relative = f"b{batch}/piece{k:02d}_{form}.onnx"
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        (out / relative).write_bytes(data)
        manifest["pieces"][k][form]["files"][str(batch)] = {"file": relative, "sha256": sha256(data)}
    if precision == "fp16" and source.trajectory_inputs is not None:  # what `export --check` runs, for overflow
        manifest["calibration"] = _write_calibration(source, schedule, min(batch_sizes), out / CALIBRATION)
    # The manifest goes last: a folder without one (an interrupted export) is never loaded.
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


@torch.no_grad()
def _example_values(pieces, source: ExportSource, batch: int) -> dict[str, torch.Tensor]:
    """Every value passed between pieces, from one full pass on example inputs (they fix the static shapes)."""
    values = dict(source.example_inputs(batch))
    for piece in pieces:
        outputs = piece.full.module(*(values[name] for name in piece.full.inputs))
        values.update(zip(piece.full.outputs, outputs))
    return values


def _write_calibration(source: ExportSource, schedule: dict | None, batch: int, path: Path) -> dict:
    """The model inputs (x_t, t, cond) at every step of real trajectories, with the schedule's solver (DDIM 10
    without one). Returns the manifest's record of it."""
    solver_name = (schedule or {}).get("solver", "ddim")
    steps = (schedule or {}).get("steps", 10)
    tensors, origin = source.trajectory_inputs(batch, solver_name, steps)
    save_file({name: value.contiguous() for name, value in tensors.items()}, str(path))
    return {"file": CALIBRATION, "sha256": sha256(path.read_bytes()), "source": origin, "solver": solver_name,
            "steps": steps, "batch": batch}


def _onnx_bytes(part: Part, values: dict[str, torch.Tensor], opset: int, precision: str) -> bytes:
    module = half_precision(part.module) if precision == "fp16" else part.module
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of torch.export; its graphs for these small
        # models are exact and need no onnxscript at run time.
        warnings.simplefilter("ignore")
        torch.onnx.export(module, tuple(values[name] for name in part.inputs), buffer, dynamo=False,
                          input_names=part.inputs, output_names=part.outputs, opset_version=opset,
                          do_constant_folding=True)
    return buffer.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()

