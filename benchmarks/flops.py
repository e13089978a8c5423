"""FLOPs: the vocoder's per mel frame (from the model a record describes), and any ONNX graph's per node.

The vocoder's: counting reuses `voxport.prune.flops.count_macs` (forward hooks on every Conv1d /
ConvTranspose1d: 2 FLOPs per multiply-accumulate, biases and activations left out) on an
untrained module rebuilt from the record's `model` config: FLOPs depend on shapes, not weights.
HiFi-GAN's work is exactly linear in the number of frames ("same" padding everywhere), so one
short pass gives FLOPs per frame. Structured pruning shrinks `resblock_inner_channels` in that
config and therefore the count; unstructured sparsity leaves dense kernels and the count as is.

Any ONNX graph's (`graph_macs`, `voxport profile`): per node from its tensor shapes, below; the two
counts agree exactly on HiFi-GAN (tests/test_profile.py).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

log = logging.getLogger(__name__)

_FRAMES = 16  # long enough that no layer is an edge case; the count is linear in frames


def vocoder_flops_per_frame(model: dict[str, Any]) -> float | None:
    """FP32 FLOPs the generator performs per input mel frame (None if it cannot be counted here)."""
    return _count(json.dumps(model, sort_keys=True))


@lru_cache(maxsize=8)
def _count(model_json: str) -> float | None:
    try:
        from voxport.prune.flops import count_macs
    except ImportError:
        log.warning("voxport.prune.flops is not installed: vocoder FLOP/s figures are left out")
        return None
    import torch

    from voxport.models import registry

    model = json.loads(model_json)
    module = registry.build_module(model)
    mel = torch.zeros(1, module.cfg.num_mels, _FRAMES)
    return count_macs(module, (mel,)).flops / _FRAMES


def achieved(flops_per_frame: float | None, frames: int, seconds: float, peak_flops: float,
             cores: int, threads: int) -> dict[str, float | None]:
    """Achieved FLOP/s of one timed row, as a fraction of the host's peak and of the threads' share."""
    if not flops_per_frame or seconds <= 0:
        return {"flops": None, "flops_per_s": None, "peak_fraction": None, "peak_fraction_threads": None}
    rate = flops_per_frame * frames / seconds
    share = peak_flops * min(threads, cores) / cores if cores else 0.0
    return {"flops": flops_per_frame * frames, "flops_per_s": rate,
            "peak_fraction": rate / peak_flops if peak_flops else None,
            "peak_fraction_threads": rate / share if share else None}


# ---------------------------------------------------------------------------------------------
# Any ONNX graph: multiply-accumulates per node from its tensor shapes
#
# One formula for every convolution, whatever its layout: a Conv's MACs are (output elements) x
# (weight elements / output channels), a ConvTranspose's (input elements) x (weight elements /
# input channels), since each output (input) sample reads (scatters) one filter of C/groups x kernel
# taps. NCHW or NHWC, fused or not, the element counts are the same. MatMul-like ops: (output
# elements) x (the shared dimension). Integer ops (QLinearConv, ConvInteger, MatMulInteger, and a
# float op fed by DequantizeLinear on both its data and its weight: a QDQ node) count as INT8 OPs.

# op type -> (what the MAC count scales with: "out" | "in", index of the weight input)
_CONV_OPS = {
    "Conv": ("out", 1), "FusedConv": ("out", 1), "NhwcFusedConv": ("out", 1), "ConvInteger": ("out", 1),
    "QLinearConv": ("out", 3), "ConvTranspose": ("in", 1), "QLinearConvTranspose": ("in", 3),
}
_MATMUL_OPS = {"MatMul": 1, "Gemm": 1, "FusedMatMul": 1, "MatMulInteger": 1, "QLinearMatMul": 3,
               "DynamicQuantizeMatMul": 1, "MatMulIntegerToFloat": 1}
_INT8_OPS = frozenset({"QLinearConv", "ConvInteger", "QLinearConvTranspose", "MatMulInteger", "QLinearMatMul",
                       "DynamicQuantizeMatMul", "MatMulIntegerToFloat"})
_INT8_DTYPES = frozenset({"int8", "uint8"})


@dataclass(frozen=True)
class NodeMacs:
    """Multiply-accumulates of one node; `precision` "int8" for integer arithmetic, else "fp32"."""

    macs: int
    precision: str

    @property
    def ops(self) -> int:
        return 2 * self.macs


def _prod(shape: list[int] | tuple[int, ...]) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out


def node_macs(op_type: str, input_shapes: list[tuple[int, ...] | None], output_shapes: list[tuple[int, ...] | None],
              integer: bool = False) -> NodeMacs | None:
    """MACs of one node from its concrete input/output shapes (None where an op does no MACs we count,
    or a shape is unknown). `integer`: the node's operands are INT8 (a QDQ node, or dtypes seen at run time)."""
    precision = "int8" if integer or op_type in _INT8_OPS else "fp32"
    if op_type in _CONV_OPS:
        anchor, w = _CONV_OPS[op_type]
        weight = input_shapes[w] if len(input_shapes) > w else None
        data = output_shapes[0] if anchor == "out" else input_shapes[0]
        # A weight of another rank than the data is not the weight (ORT dropped a pre-packed one).
        if not weight or not data or len(weight) != len(data) or weight[0] == 0:
            return None
        return NodeMacs(_prod(data) * (_prod(weight) // int(weight[0])), precision)
    if op_type in _MATMUL_OPS:
        a = input_shapes[0] if input_shapes else None
        out = output_shapes[0] if output_shapes else None
        if not a or not out:
            return None
        # The shared dimension is A's last (Gemm with transA is not used by our exports).
        return NodeMacs(_prod(out) * int(a[-1]), precision)
    return None


def graph_macs(model: Any, input_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[str, NodeMacs]]:
    """{node name: (op type, MACs)} of every counted node of an ONNX model (a path or a ModelProto),
    with the graph inputs fixed to `input_shapes` and every other shape found by ONNX shape inference."""
    import onnx

    proto = onnx.load(str(model)) if not isinstance(model, onnx.ModelProto) else model
    proto = onnx.ModelProto.FromString(proto.SerializeToString())  # never mutate the caller's model
    for graph_input in proto.graph.input:
        if graph_input.name in input_shapes:
            dims = graph_input.type.tensor_type.shape.dim
            for dim, size in zip(dims, input_shapes[graph_input.name], strict=True):
                dim.Clear()
                dim.dim_value = int(size)
    # data_prop: lengths computed in the graph (Shape -> Gather -> Concat -> Reshape, as a
    # polyphase upsampler's interleave exports) are propagated too.
    inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    shapes: dict[str, tuple[int, ...] | None] = {i.name: tuple(i.dims) for i in inferred.graph.initializer}
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = (tuple(d.dim_value for d in dims)
                              if all(d.HasField("dim_value") for d in dims) else None)
    for node in inferred.graph.node:  # Constant nodes' shapes (ONNX shape inference leaves them out)
        if node.op_type == "Constant" and node.attribute and node.attribute[0].HasField("t"):
            shapes.setdefault(node.output[0], tuple(node.attribute[0].t.dims))
    dequantized = {o for n in inferred.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    counted: dict[str, tuple[str, NodeMacs]] = {}
    for index, node in enumerate(inferred.graph.node):
        weight = _CONV_OPS.get(node.op_type, (None, _MATMUL_OPS.get(node.op_type)))[1]
        qdq = weight is not None and len(node.input) > weight and {node.input[0], node.input[weight]} <= dequantized
        macs = node_macs(node.op_type, [shapes.get(i) for i in node.input], [shapes.get(o) for o in node.output],
                         integer=qdq)
        if macs is not None:
            counted[node.name or f"{node.op_type}_{index}"] = (node.op_type, macs)
    return counted


def is_mac_op(op_type: str) -> bool:
    return op_type in _CONV_OPS or op_type in _MATMUL_OPS


def runtime_precision(op_name: str, input_type_shape: list[dict[str, list[int]]]) -> str | None:
    """"int8" | "fp32" for a MAC op as ONNX Runtime's profiler reports it (its `args.input_type_shape`
    entries are {dtype: shape}): INT8 when its data input is 8-bit, whatever the op is called; else None."""
    if not is_mac_op(op_name):
        return None
    data = next(iter(input_type_shape[0])) if input_type_shape else ""
    return "int8" if op_name in _INT8_OPS or data in _INT8_DTYPES else "fp32"


def runtime_node_macs(op_name: str, input_type_shape: list[dict[str, list[int]]],
                      output_type_shape: list[dict[str, list[int]]]) -> NodeMacs | None:
    """MACs of one node from the shapes ONNX Runtime's profiler reports. None where a weight was
    pre-packed (ORT leaves pre-packed initializers out of `input_type_shape`: ConvTranspose and
    QLinearConv weights), so `graph_macs` of the model file is the primary count."""
    shapes = [tuple(next(iter(e.values()))) for e in input_type_shape]
    outputs = [tuple(next(iter(e.values()))) for e in output_type_shape]
    weight = _CONV_OPS.get(op_name, (None, _MATMUL_OPS.get(op_name)))[1]
    if weight is None or len(shapes) <= weight:
        return None
    precision = runtime_precision(op_name, input_type_shape)
    return node_macs(op_name, shapes, outputs, integer=precision == "int8")
