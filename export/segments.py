"""Cut a denoiser into the segments a cache schedule computes together, each with the glue around it.

A segment is a run of consecutive cacheable blocks (the model's
`cache_blocks()`, in execution order) that the schedule always computes at the
same steps. The model is traced with torch.fx, its blocks kept as opaque calls,
and the traced graph is cut after each segment's last block: piece k holds the
glue before segment k's first block, the segment's blocks and the glue between
them; the last piece runs on to the model's output.

Each piece comes in two forms. `full` computes its blocks and also returns
their outputs, for the cache. `cached` takes those outputs as inputs and runs
only the glue still needed (what feeds later pieces), exactly what the torch
path does when every block of the segment is served from the cache: glue
always runs, blocks are skipped.

Values passed between pieces are named by their fx node names; a block's
output is named after its node both where `full` returns it and where
`cached` takes it in.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import fx, nn

MODEL_INPUTS = ("x", "t")  # then the conditioning's named tensors, as the forward names them
MODEL_OUTPUT = "out"


@dataclass
class Part:
    """One form of a piece: a graph module and the named values it reads and writes."""

    module: fx.GraphModule
    inputs: list[str]
    outputs: list[str]


@dataclass
class Piece:
    blocks: list[str]  # the segment's block names (module paths), execution order
    block_values: list[str]  # the same blocks' value names
    full: Part
    cached: Part


class _BlockTracer(fx.Tracer):
    def __init__(self, blocks: set[int]):
        super().__init__()
        self.blocks = blocks

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return id(module) in self.blocks or super().is_leaf_module(module, qualified_name)


def trace(denoiser: nn.Module) -> fx.GraphModule:
    """The denoiser as an fx graph whose cacheable blocks are single `call_module` nodes."""
    blocks = {id(module) for _, module, _ in denoiser.cache_blocks()}
    graph = _BlockTracer(blocks).trace(denoiser)
    placeholders = [node.target for node in graph.nodes if node.op == "placeholder"]
    if tuple(placeholders[:2]) != MODEL_INPUTS:
        raise TypeError(f"a denoiser's forward takes (x, t, **cond), {type(denoiser).__name__} takes {placeholders}")
    return fx.GraphModule(denoiser, graph)


def segments_from_schedule(block_names: list[str], schedule: dict | None) -> list[list[str]]:
    """Maximal runs of consecutive blocks with the same update steps; without a schedule, one segment."""
    if schedule is None:
        return [list(block_names)]
    updates = schedule["blocks"]
    if set(updates) != set(block_names):
        raise ValueError(f"schedule names blocks {sorted(set(updates) ^ set(block_names))[:4]} that the model "
                         "does not have (or lacks ones it has)")
    segments = [[block_names[0]]]
    for previous, name in itertools.pairwise(block_names):
        if sorted(updates[name]) == sorted(updates[previous]):
            segments[-1].append(name)
        else:
            segments.append([name])
    return segments


def split(denoiser: nn.Module, segments: list[list[str]]) -> list[Piece]:
    """One piece per segment (module.eval() is the caller's business: the graph keeps what tracing saw)."""
    graph_module = trace(denoiser)
    order = [name for name, _, _ in denoiser.cache_blocks()]
    if [name for segment in segments for name in segment] != order:
        raise ValueError("segments must cover the model's cache blocks once each, in execution order")
    nodes = [node for node in graph_module.graph.nodes if node.op not in ("placeholder", "get_attr")]
    segment_of = {name: k for k, segment in enumerate(segments) for name in segment}
    last_block = {}
    for node in nodes:
        if node.op == "call_module" and node.target in segment_of:
            last_block[segment_of[node.target]] = node
    members: list[list[fx.Node]] = [[] for _ in segments]
    current = 0
    for node in nodes:
        members[current].append(node)
        if current < len(segments) - 1 and node is last_block[current]:
            current += 1
    return [_piece(graph_module, segment, nodes_k, set(order)) for segment, nodes_k in zip(segments, members)]


def _piece(graph_module: fx.GraphModule, segment: list[str], nodes: list[fx.Node], block_names: set[str]) -> Piece:
    block_nodes = [n for n in nodes if n.op == "call_module" and n.target in block_names]
    return Piece(
        blocks=list(segment),
        block_values=[n.name for n in block_nodes],
        full=_part(graph_module, nodes, block_nodes, cached=False),
        cached=_part(graph_module, nodes, block_nodes, cached=True),
    )


def _part(graph_module: fx.GraphModule, nodes: list[fx.Node], block_nodes: list[fx.Node], cached: bool) -> Part:
    inside = set(nodes)
    graph, copied, inputs = fx.Graph(), {}, []

    def outside_value(node: fx.Node) -> fx.Node:
        if node not in copied:
            if node.op == "get_attr":  # a parameter or buffer: every piece that uses one holds it
                copied[node] = graph.get_attr(node.target)
            else:
                copied[node] = graph.placeholder(node.name)
                inputs.append(node.name)
        return copied[node]

    for node in nodes:
        if node.op == "output":
            continue
        if cached and node in block_nodes:
            copied[node] = graph.placeholder(node.name)
            inputs.append(node.name)
        else:
            copied[node] = graph.node_copy(node, outside_value)
    # What later pieces (or the model's output) read; `full` also hands its blocks' outputs to the cache.
    # `cached` does not return a block value: the caller has it already.
    leaving = [n for n in nodes if n.op != "output" and any(user not in inside or user.op == "output" for user in n.users)]
    if not cached:
        leaving += [n for n in block_nodes if n not in leaving]
    else:
        leaving = [n for n in leaving if n not in block_nodes]
    names = [MODEL_OUTPUT if _is_model_output(n) else n.name for n in leaving]
    graph.output(tuple(copied[n] for n in leaving))
    module = fx.GraphModule(graph_module, graph)
    module.graph.eliminate_dead_code()
    for placeholder in [n for n in module.graph.nodes if n.op == "placeholder" and not n.users]:
        inputs.remove(placeholder.target)
        module.graph.erase_node(placeholder)
    module.recompile()
    return Part(module, inputs, names)


def _is_model_output(node: fx.Node) -> bool:
    return any(user.op == "output" for user in node.users)


@torch.no_grad()
def run_pieces(pieces: list[Piece], x: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
    """Every piece in its full form, in torch: the reference the exported graphs are checked against."""
    values = {"x": x, "t": t, **cond}
    for piece in pieces:
        outputs = piece.full.module(*(values[name] for name in piece.full.inputs))
        values.update(zip(piece.full.outputs, outputs))
    return values[MODEL_OUTPUT]
