"""The decoder step as a stateful Triton model: its state pairs, and the one graph edit Triton's zero
initial state needs.

The decoder step takes its recurrent state as inputs (`attn_hidden`, `rnn1_h`, ..., `cumulative`)
and returns the next state as `<name>_out` (models/synthesizer_io.py). Triton's implicit state feeds
each `<name>_out` of one request of a sequence back as `<name>` of the next, and starts a sequence
from an initial state whose dims must be fixed. Every state but `cumulative` (the attention weights
summed over past steps, one per input symbol) has a fixed width, so its zero initial state is
exact. `cumulative` is as wide as the text, which Triton cannot know; the packaged graph therefore
broadcasts it to the width of `chars` (`Expand(cumulative, Shape(chars))`) before anything reads it:
the (batch, 1) zero Triton starts with becomes the (batch, n_text) zero the runtime starts with, and
a (batch, n_text) state passes through unchanged. Nothing else in the graph changes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from voxport.errors import PackageError
from voxport.export.triton.configs import TensorIO

log = logging.getLogger(__name__)

STATE_SUFFIX = "_out"


def state_pairs(inputs: Sequence[TensorIO], outputs: Sequence[TensorIO],
                expected: Sequence[str] | None = None) -> list[tuple[TensorIO, TensorIO]]:
    """(state input, state output) pairs of a step graph: every input `x` with an output `x_out` of
    the same type and rank. `expected` (e.g. synthesizer_io.STATE_NAMES) must be exactly the names found."""
    by_name = {o.name: o for o in outputs}
    pairs = []
    for i in inputs:
        o = by_name.get(i.name + STATE_SUFFIX)
        if o is None:
            continue
        if o.data_type != i.data_type or len(o.shape) != len(i.shape):
            raise PackageError(f"state pair {i.name} -> {o.name}: {i.data_type}{list(i.shape)} vs "
                               f"{o.data_type}{list(o.shape)}; a state output must be fed back as its input")
        pairs.append((i, o))
    if expected is not None and [i.name for i, _ in pairs] != list(expected):
        raise PackageError(f"decoder step state pairs {[i.name for i, _ in pairs]} differ from the runtime's "
                           f"{list(expected)}")
    if not pairs:
        raise PackageError("the decoder step graph has no state pair (input x with output x_out)")
    return pairs


def width_source(state: TensorIO, others: Sequence[TensorIO]) -> TensorIO | None:
    """For a state with symbolic non-batch axes: a non-state input of exactly its shape (axis names
    included), whose runtime shape it takes; None for a fixed-width state."""
    if all(isinstance(d, int) for d in state.shape[1:]):
        return None
    for other in others:
        if other.shape == state.shape:
            return other
    raise PackageError(f"state '{state.name}' has shape {list(state.shape)} and no input of that shape to "
                       "take its width from, so Triton's fixed-size zero initial state cannot fit it")


def initial_dims(state: TensorIO, batched: bool) -> list[int]:
    """Fixed dims of the zero initial state: batch 1 (the BLS loop runs one sequence per request) and
    1 for a variable width (broadcast by the graph, see `broadcast_variable_states`)."""
    shape = state.shape[1:] if batched else (1, *state.shape[1:])
    return [d if isinstance(d, int) else 1 for d in shape]


def broadcast_variable_states(model: Any, pairs: Sequence[tuple[TensorIO, TensorIO]],
                              inputs: Sequence[TensorIO]) -> tuple[Any, list[str]]:
    """A copy of `model` where every variable-width state input is first expanded to the shape of the
    input it takes its width from. Returns (model, names of the states edited)."""
    import onnx
    from onnx import helper

    state_names = {i.name for i, _ in pairs}
    others = [t for t in inputs if t.name not in state_names]
    edits = {i.name: src for i, _ in pairs if (src := width_source(i, others)) is not None}
    if not edits:
        return model, []
    edited = onnx.ModelProto()
    edited.CopyFrom(model)
    graph = edited.graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                raise PackageError(f"decoder step node {node.name or node.op_type} has a subgraph; "
                                   "the state edit only rewrites top-level nodes")
    new_nodes = []
    for name, src in edits.items():
        shape, expanded = f"{name}__width_of_{src.name}", f"{name}__expanded"
        new_nodes += [helper.make_node("Shape", [src.name], [shape], name=f"{name}__shape"),
                      helper.make_node("Expand", [name, shape], [expanded], name=f"{name}__expand")]
        for node in graph.node:
            node.input[:] = [expanded if x == name else x for x in node.input]
        if any(o.name == name for o in graph.output):
            raise PackageError(f"state input '{name}' is also a graph output; cannot edit it")
        # The input may now be narrower than the text: its own axis name, so no tool equates them.
        value = next(v for v in graph.input if v.name == name)
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if axis > 0 and dim.dim_param:
                dim.dim_param = f"{name}_width"
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(new_nodes + nodes)
    onnx.checker.check_model(edited)
    log.info("decoder step: %s broadcast to the width of %s for Triton's zero initial state",
             ", ".join(edits), ", ".join(src.name for src in edits.values()))
    return edited, list(edits)
