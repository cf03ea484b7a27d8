"""`rtdiff export --check DIR`: will TensorRT take these graphs as they are?

Per graph: the opset is in TensorRT 10's range; every node's op is one
TensorRT 10's ONNX parser supports; nothing is float64; no control flow and no
op whose output shape depends on the data; no int64 constant that TensorRT's
cast to int32 would truncate. Each problem names the graph and the node.

For an fp16 export, the graphs also run (ONNX Runtime, CPU) on the recorded
calibration inputs with every fp16 value exposed, and any value that is not
finite is reported with the node that made it.

Not checked: per-op restrictions beyond the op's name (e.g. Slice's `axes`
being an initializer): a TensorRT build on a GPU machine is the final word.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rtdiff.export.exported import load_manifest
from rtdiff.export.onnxruntime_backend import session_options

OPSETS = range(9, 21)  # TensorRT 10.0 parses opsets 9 to 20
# Ops the ONNX-TensorRT parser of TensorRT 10.0 supports (onnx-tensorrt docs/operators.md, release 10.0).
TENSORRT_10_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike Ceil Celu
Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace DequantizeLinear Div
Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor GRU Gather GatherElements GatherND Gelu Gemm
GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization HardSigmoid
HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN LRN LSTM LayerNormalization LeakyRelu
Less LessOrEqual Log LogSoftmax Loop LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min
Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or PRelu Pad ParametricSoftplus Pow QuantizeLinear RNN
RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum
ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize
ReverseSequence RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin
Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK
Transpose Trilu Unsqueeze Upsample Where Xor
""".split())
CONTROL_FLOW = frozenset({"If", "Loop", "Scan"})
DATA_DEPENDENT_SHAPES = frozenset({"NonZero", "Unique", "NonMaxSuppression", "Compress"})
INT32 = np.iinfo(np.int32)


def check_model(model, label: str = "graph") -> list[str]:
    """Problems in one ONNX model, each naming `label` and the node (empty: TensorRT should take it)."""
    import onnx
    from onnx import TensorProto, numpy_helper

    problems = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset not in OPSETS:
        problems.append(f"{label}: opset {opset} is outside TensorRT 10's range {OPSETS.start}-{OPSETS.stop - 1}")
    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except Exception as error:  # a graph shape inference rejects will not build either
        problems.append(f"{label}: shape inference failed: {error}")
    graph = model.graph

    def where(node) -> str:
        return f"{label}: node {node.name or '(unnamed)'} ({node.op_type})"

    consumers: dict[str, list[tuple[str, int]]] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node.op_type, index))

    def only_slice_bounds(node) -> bool:
        # Slice clamps starts/ends to the dimension (ONNX semantics, TensorRT's too): INT64_MAX means "to the end".
        uses = [use for output in node.output for use in consumers.get(output, [])]
        return bool(uses) and all(op == "Slice" and index in (1, 2) for op, index in uses)

    for node in graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in TENSORRT_10_OPS:
            problems.append(f"{where(node)}: op not supported by TensorRT 10's ONNX parser")
        if node.op_type in CONTROL_FLOW:
            problems.append(f"{where(node)}: control flow; export static graphs only")
        if node.op_type in DATA_DEPENDENT_SHAPES:
            problems.append(f"{where(node)}: output shape depends on the data")
        for attribute in node.attribute:
            if attribute.name == "to" and attribute.i == TensorProto.DOUBLE:
                problems.append(f"{where(node)}: casts to float64")
            if attribute.type == onnx.AttributeProto.TENSOR and not only_slice_bounds(node):
                problems += _tensor_problems(numpy_helper.to_array(attribute.t), where(node))
    for initializer in graph.initializer:
        problems += _tensor_problems(numpy_helper.to_array(initializer), f"{label}: initializer {initializer.name}")
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.type.tensor_type.elem_type == TensorProto.DOUBLE:
            problems.append(f"{label}: value {value.name} is float64")
    return problems


def _tensor_problems(array: np.ndarray, where: str) -> list[str]:
    if array.dtype == np.float64:
        return [f"{where}: float64 constant"]
    if array.dtype == np.int64 and array.size and (array.min() < INT32.min or array.max() > INT32.max):
        return [f"{where}: int64 constant outside int32, which TensorRT would truncate"]
    return []


def check_export(folder: str | Path) -> list[str]:
    """Problems in every graph of an export folder (the manifest's hashes are checked first)."""
    import onnx

    folder = Path(folder)
    manifest = load_manifest(folder)
    problems = []
    for piece in manifest["pieces"]:
        for form in ("full", "cached"):
            for entry in piece[form]["files"].values():
                problems += check_model(onnx.load(str(folder / entry["file"])), entry["file"])
    if manifest["precision"] == "fp16":
        problems += fp16_overflow(folder, manifest)
    return problems


def fp16_overflow(folder: Path, manifest: dict) -> list[str]:
    """Run the full form of every piece along the calibration trajectories with every value exposed; name
    each graph's first node that makes a non-finite fp16 value out of finite inputs (a -inf attention mask
    is an input, not an overflow)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, numpy_helper
    from safetensors.numpy import load_file

    calibration = load_file(str(folder / manifest["calibration"]["file"]))
    batch = str(manifest["calibration"]["batch"])
    runners = []
    for piece in manifest["pieces"]:
        entry = piece["full"]["files"][batch]
        model = onnx.shape_inference.infer_shapes(onnx.load(str(folder / entry["file"])))
        graph = model.graph
        types = {v.name: v.type.tensor_type.elem_type for v in graph.value_info}
        exposed = [v for v in graph.value_info if v.type.tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.FLOAT16)]
        graph.output.extend(exposed)
        constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        nodes = [(node.name, list(node.input), [o for o in node.output if types.get(o) == TensorProto.FLOAT16])
                 for node in graph.node]
        session = ort.InferenceSession(model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
        runners.append((entry["file"], piece["full"], session, [v.name for v in exposed], constants, nodes))
    problems = {}
    for step in range(len(calibration["x"])):
        # x and t per step; the conditioning tensors, the same at every step
        values = {name: value[step] if name in ("x", "t") else value for name, value in calibration.items()}
        for label, part, session, names, constants, nodes in runners:
            wanted = part["outputs"] + names
            outputs = dict(zip(wanted, session.run(wanted, {name: values[name] for name in part["inputs"]})))
            known = {**constants, **values, **outputs}
            for node, inputs, fp16_outputs in nodes:
                if label in problems:
                    break
                finite_in = all(np.isfinite(known[i]).all() for i in inputs if i in known and known[i].dtype.kind == "f")
                bad = [o for o in fp16_outputs if not np.isfinite(known[o]).all()]
                if bad and finite_in:
                    problems[label] = f"{label}: node {node}: fp16 value {bad[0]} overflows at calibration step {step}"
            values.update({name: outputs[name] for name in part["outputs"]})
    return list(problems.values())
