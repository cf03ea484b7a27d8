"""A piece in half precision, with fp32 inputs and outputs; the diffusion step's embedding stays fp32.

Done on the traced torch graph before export, so the exporter types every
ONNX value itself. Weights become fp16; each input is cast to fp16 as it
enters and each output back to fp32 as it leaves, so pieces chain and a
block cache holds one type whatever the precision. The exception is the
chain from the step `t` to its first module (the sinusoidal embedding): in
fp16, step x frequency near 100 keeps about 0.06 rad of phase, so it runs in
fp32 and is cast where a module reads it. TensorRT 11 takes its precision
from exactly these types.
"""

from __future__ import annotations

import copy

import torch
from torch import fx

STEP_INPUT = "t"


def half_precision(module: fx.GraphModule) -> fx.GraphModule:
    module = copy.deepcopy(module).half()
    graph = module.graph
    step = _step_embedding(graph)
    for node in list(graph.nodes):
        if node.op == "placeholder" and node.target != STEP_INPUT:
            _cast_uses(graph, node, torch.float16, lambda user: True)
        elif node in step:
            _cast_uses(graph, node, torch.float16, lambda user: user not in step and user.op != "output")
    output = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(output):
        outputs = tuple(graph.call_method("to", (value, torch.float32)) for value in output.args[0])
    output.args = (outputs,)
    module.recompile()
    return module


def _step_embedding(graph: fx.Graph) -> set[fx.Node]:
    """The step input and the functions computed from it alone (the embedding before its first module)."""
    chain = {n for n in graph.nodes if n.op == "placeholder" and n.target == STEP_INPUT}  # later pieces lack it
    for node in graph.nodes:  # topological order: a node's inputs are decided before it
        inputs = node.all_input_nodes
        if node.op in ("call_function", "call_method") and inputs and all(i in chain for i in inputs):
            chain.add(node)
    return chain


def _cast_uses(graph: fx.Graph, node: fx.Node, dtype: torch.dtype, which) -> None:
    users = [user for user in node.users if which(user)]
    if not users:
        return
    with graph.inserting_after(node):
        cast = graph.call_method("to", (node, dtype))
    for user in users:
        user.replace_input_with(node, cast)
