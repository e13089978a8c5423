"""Rank layers by the error each adds when quantized alone, emulating ONNX Runtime in PyTorch.

Building and running one real ORT artifact per layer (74 convolutions in HiFi-GAN V1) costs
minutes; the ranking only needs each layer's error. So we read the exact scales, zero points and
int8 weights ORT chose (from ONE all-layers QDQ model of the same calibration) and fake-quantize
one PyTorch layer at a time: its input and output tensors per-tensor (U8 or S8, ORT rounding
half to even), its weights per channel as ORT stored them. Only the part of the network that
depends on the perturbed layer is recomputed: the module is traced with torch.fx and every other
value comes from one cached FP32 run, which cuts the cost to a fraction of a forward per layer.

The real ORT artifacts are still what the search accepts or rejects (quantize/search.py); the
emulation only orders the candidates.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
import torch.fx
from onnx import numpy_helper

from voxport.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QTensor:
    """Per-tensor affine quantization of an activation, as ORT's QuantizeLinear applies it."""

    scale: float
    zero_point: int
    qmin: int
    qmax: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.clamp(torch.round(x / self.scale) + self.zero_point, self.qmin, self.qmax)
        return (q - self.zero_point) * self.scale


@dataclass(frozen=True)
class QLayer:
    """One quantized Conv/MatMul of the QDQ model: what ORT computes instead of the float layer."""

    node: str
    weight: torch.Tensor  # dequantized int8 weights
    bias: torch.Tensor | None  # dequantized int32 bias
    input: QTensor | None
    output: QTensor | None


def qlayers(qdq: onnx.ModelProto) -> dict[str, QLayer]:
    """Every node of a QDQ model whose weights are quantized, with its exact quantization."""
    inits = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
    producer = {out: n for n in qdq.graph.node for out in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in qdq.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def dequantized(tensor: str) -> np.ndarray | None:
        dq = producer.get(tensor)
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
            return None
        q, scale = inits[dq.input[0]].astype(np.float64), inits[dq.input[1]].astype(np.float64)
        zp = inits[dq.input[2]].astype(np.float64) if len(dq.input) > 2 else np.zeros_like(scale)
        if scale.ndim == 1 and scale.size > 1:  # per channel along `axis`
            axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
            shape = [1] * q.ndim
            shape[axis] = -1
            scale, zp = scale.reshape(shape), zp.reshape(shape)
        return ((q - zp) * scale).astype(np.float32)

    def activation(q: onnx.NodeProto | None) -> QTensor | None:
        if q is None or q.op_type != "QuantizeLinear":
            return None
        zp = inits[q.input[2]]
        info = np.iinfo(zp.dtype)
        return QTensor(float(inits[q.input[1]]), int(zp), int(info.min), int(info.max))

    layers = {}
    for node in qdq.graph.node:
        if node.op_type not in ("Conv", "MatMul", "Gemm") or len(node.input) < 2:
            continue
        weight = dequantized(node.input[1])
        if weight is None:
            continue
        bias = dequantized(node.input[2]) if len(node.input) > 2 else None
        dq_in = producer.get(node.input[0])
        q_in = producer.get(dq_in.input[0]) if dq_in is not None and dq_in.op_type == "DequantizeLinear" else None
        q_out = next((c for c in consumers.get(node.output[0], []) if c.op_type == "QuantizeLinear"), None)
        layers[node.name] = QLayer(node.name, torch.from_numpy(weight),
                                   None if bias is None else torch.from_numpy(bias),
                                   activation(q_in), activation(q_out))
    return layers


def module_paths(float_model: onnx.ModelProto, module: torch.nn.Module, nodes: Sequence[str]) -> dict[str, str]:
    """ONNX node name -> PyTorch module path, through the weight's name (exported parameter names
    equal module paths + '.weight'); shapes are checked so a wrong match cannot pass silently."""
    from voxport.quantize.qdq import node_weights

    weights = node_weights(float_model)
    params = dict(module.named_parameters())
    inits = {i.name: tuple(i.dims) for i in float_model.graph.initializer}
    out = {}
    for node in nodes:
        name = weights.get(node)
        if name is None or name not in params or not name.endswith(".weight"):
            raise ConfigError(f"cannot map ONNX node '{node}' to a PyTorch layer (weight '{name}')")
        if tuple(params[name].shape) != inits[name]:
            raise ConfigError(f"'{node}': ONNX weight {inits[name]} != PyTorch {tuple(params[name].shape)}")
        out[node] = name[: -len(".weight")]
    return out


def shared_inputs(float_model: onnx.ModelProto, nodes: Sequence[str]) -> dict[str, list[str]]:
    """Node -> the other nodes reading the same input tensor. ORT quantizes a TENSOR: the
    DequantizeLinear it inserts for one layer's input feeds every consumer, float or not (after
    pre-processing, HiFi-GAN's three resblocks of a stage share one LeakyRelu output), so the
    emulation must quantize the siblings' input too."""
    readers: dict[str, list[str]] = {}
    for n in float_model.graph.node:
        if n.input:
            readers.setdefault(n.input[0], []).append(n.name)
    by_name = {n.name: n for n in float_model.graph.node}
    return {node: [r for r in readers.get(by_name[node].input[0], []) if r != node] for node in nodes}


class _Cached(torch.fx.Interpreter):
    """Recomputes only the nodes downstream of the perturbed layer; the rest comes from `cache`."""

    def __init__(self, gm: torch.fx.GraphModule, cache: Mapping[torch.fx.Node, Any],
                 dirty: set[torch.fx.Node], target: str, layer: QLayer, siblings: Sequence[str]) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self._cache, self._dirty, self._target, self._layer = cache, dirty, target, layer
        self._siblings = set(siblings)

    def run_node(self, n: torch.fx.Node) -> Any:
        if n not in self._dirty:
            return self._cache[n]
        return super().run_node(n)

    def call_module(self, target: str, args: tuple, kwargs: dict) -> Any:
        layer = self._layer
        if target in self._siblings and layer.input is not None:  # float layer, quantized input
            return super().call_module(target, (layer.input(args[0]), *args[1:]), kwargs)
        if target != self._target:
            return super().call_module(target, args, kwargs)
        conv = self.fetch_attr(target)
        x = layer.input(args[0]) if layer.input is not None else args[0]
        y = conv._conv_forward(x, layer.weight, layer.bias)
        return layer.output(y) if layer.output is not None else y


def _descendants(gm: torch.fx.GraphModule, targets: Sequence[str]) -> set[torch.fx.Node]:
    stack = [n for n in gm.graph.nodes if n.op == "call_module" and n.target in targets]
    seen: set[torch.fx.Node] = set()
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.users)
    return seen


def layer_errors(module: torch.nn.Module, layers: Mapping[str, QLayer], paths: Mapping[str, str],
                 feeds: Sequence[torch.Tensor], metric: Callable[[np.ndarray, np.ndarray], float],
                 siblings: Mapping[str, Sequence[str]] | None = None,
                 ) -> tuple[dict[str, float], dict[str, float]]:
    """({node: mean metric(fp32 output, output with only that layer quantized)}, {node: MACs per feed}).

    `module` takes one tensor and returns a tuple whose first element is the output compared;
    `siblings[node]` are module paths of float layers reading the same (quantized) input tensor.
    """
    siblings = siblings or {}
    for node, path in paths.items():
        if not isinstance(module.get_submodule(path), torch.nn.modules.conv._ConvNd):
            raise ConfigError(f"emulation supports convolutions only; '{node}' ({path}) is not one")
    gm = torch.fx.symbolic_trace(module)
    dirty = {node: _descendants(gm, [path, *siblings.get(node, ())]) for node, path in paths.items()}
    errors: dict[str, list[float]] = {node: [] for node in paths}
    macs: dict[str, float] = {}
    with torch.inference_mode():
        for feed in feeds:
            ref_run = torch.fx.Interpreter(gm, garbage_collect_values=False)
            ref = ref_run.run(feed)[0].numpy()
            cache = ref_run.env
            for node, path in paths.items():
                out = _Cached(gm, cache, dirty[node], path, layers[node], siblings.get(node, ())).run(feed)[0].numpy()
                errors[node].append(float(metric(ref, out)))
                macs[node] = _conv_macs(gm, cache, path)
            del cache, ref_run
    return {node: float(np.mean(v)) for node, v in errors.items()}, macs


def _conv_macs(gm: torch.fx.GraphModule, cache: Mapping[torch.fx.Node, Any], path: str) -> float:
    conv = gm.get_submodule(path)
    call = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == path)
    out = cache[call]
    return float(out.numel() * conv.weight[0].numel())
