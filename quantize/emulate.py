"""Rank layers by the error each adds when quantized alone, emulating ONNX Runtime in PyTorch.

Building and running one real ORT artifact per layer (74 convolutions in HiFi-GAN V1) costs
minutes; the ranking only needs each layer's error. So we read the exact scales, zero points and
int8 weights ORT chose (from ONE all-layers QDQ model of the same calibration) and fake-quantize
one PyTorch layer at a time: its input and output tensors per-tensor (U8 or S8, ORT rounding
half to even), its weights per channel as ORT stored them. Only the part of the network that
depends on the perturbed layer is recomputed: the module is traced with torch.fx and every other
value comes from one cached FP32 run, which cuts the cost to a fraction of a forward per layer.

Residual Adds are emulated the same way (`qadds`, `add_sources`, `layer_errors`): ORT runs an Add whose inputs
and output are quantized as QLinearAdd, i.e. both summands and the sum rounded per tensor, and
the rounded input tensors are what every other reader of them sees too.

The real ORT artifacts are still what the search accepts or rejects (quantize/search.py); the
emulation only orders the candidates.
"""

from __future__ import annotations

import logging
import operator
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


@dataclass(frozen=True)
class QAdd:
    """One quantized Add of the QDQ model (ORT's QLinearAdd): the rounding of each summand, in
    the ONNX node's input order, and of the sum."""

    node: str
    inputs: tuple[QTensor | None, ...]
    output: QTensor | None


def _index(qdq: onnx.ModelProto) -> tuple[dict[str, np.ndarray], dict[str, onnx.NodeProto],
                                          dict[str, list[onnx.NodeProto]]]:
    """(initializer values, tensor -> producing node, tensor -> reading nodes) of a QDQ model."""
    inits = {i.name: numpy_helper.to_array(i) for i in qdq.graph.initializer}
    producer = {out: n for n in qdq.graph.node for out in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in qdq.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return inits, producer, consumers


def _output_quantizer(consumers: Mapping[str, list[onnx.NodeProto]], tensor: str) -> onnx.NodeProto | None:
    return next((c for c in consumers.get(tensor, []) if c.op_type == "QuantizeLinear"), None)


def _activation(inits: Mapping[str, np.ndarray], q: onnx.NodeProto | None) -> QTensor | None:
    if q is None or q.op_type != "QuantizeLinear":
        return None
    zp = inits[q.input[2]]
    info = np.iinfo(zp.dtype)
    return QTensor(float(inits[q.input[1]]), int(zp), int(info.min), int(info.max))


def _quantized_input(producer: Mapping[str, onnx.NodeProto], tensor: str) -> onnx.NodeProto | None:
    """The QuantizeLinear behind a DequantizeLinear feeding `tensor`, if any."""
    dq = producer.get(tensor)
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    return producer.get(dq.input[0])


def qadds(qdq: onnx.ModelProto) -> dict[str, QAdd]:
    """Every Add of a QDQ model whose inputs and output are quantized (what ORT fuses to QLinearAdd)."""
    inits, producer, consumers = _index(qdq)
    adds = {}
    for node in qdq.graph.node:
        if node.op_type != "Add":
            continue
        inputs = tuple(_activation(inits, _quantized_input(producer, i)) for i in node.input)
        q_out = _output_quantizer(consumers, node.output[0])
        if all(q is not None for q in inputs) and q_out is not None:
            adds[node.name] = QAdd(node.name, inputs, _activation(inits, q_out))
    return adds


def qlayers(qdq: onnx.ModelProto) -> dict[str, QLayer]:
    """Every node of a QDQ model whose weights are quantized, with its exact quantization."""
    inits, producer, consumers = _index(qdq)

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

    layers = {}
    for node in qdq.graph.node:
        if node.op_type not in ("Conv", "MatMul", "Gemm") or len(node.input) < 2:
            continue
        weight = dequantized(node.input[1])
        if weight is None:
            continue
        bias = dequantized(node.input[2]) if len(node.input) > 2 else None
        q_out = _output_quantizer(consumers, node.output[0])
        layers[node.name] = QLayer(node.name, torch.from_numpy(weight),
                                   None if bias is None else torch.from_numpy(bias),
                                   _activation(inits, _quantized_input(producer, node.input[0])),
                                   _activation(inits, q_out))
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


class _Rounded(torch.fx.Interpreter):
    """Runs the graph with some values rounded (`rounding[node]`, applied to the node's output
    for every reader) and recomputes only what depends on them; the rest comes from `cache`."""

    def __init__(self, gm: torch.fx.GraphModule, cache: Mapping[torch.fx.Node, Any],
                 rounding: Mapping[torch.fx.Node, QTensor]) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self._cache, self._rounding = cache, rounding
        self._dirty = _descendants_of([u for n in rounding for u in n.users])

    def run_node(self, n: torch.fx.Node) -> Any:
        value = super().run_node(n) if n in self._dirty else self._cache[n]
        rounding = self._rounding.get(n)
        return rounding(value) if rounding is not None else value


def add_sources(float_model: onnx.ModelProto, module: torch.nn.Module, adds: Sequence[str],
                ) -> dict[str, tuple[tuple[str, str] | None, ...]]:
    """Add node -> what each of its inputs is in PyTorch terms: ("module", path) for a layer's
    output, ("add", name) for another Add's (which gets its own entry), None for anything else
    (the layer ranking's twin of `module_paths`, resolved on the traced module by `layer_errors`)."""
    from voxport.quantize.qdq import node_weights

    producer = {out: n for n in float_model.graph.node for out in n.output}
    weighted = node_weights(float_model)
    layers = [n.name for n in float_model.graph.node
              if n.op_type in ("Conv", "ConvTranspose", "MatMul", "Gemm") and n.name in weighted]
    paths = module_paths(float_model, module, layers)
    by_name = {n.name: n for n in float_model.graph.node}
    sources: dict[str, tuple[tuple[str, str] | None, ...]] = {}
    pending = list(adds)
    while pending:  # the Adds an Add reads are mapped through theirs
        add = pending.pop()
        node = by_name[add]
        if node.op_type != "Add":
            raise ConfigError(f"'{add}' is a {node.op_type}, not an Add")
        found: list[tuple[str, str] | None] = []
        for tensor in node.input:
            p = producer.get(tensor)
            found.append(("module", paths[p.name]) if p is not None and p.name in paths
                         else ("add", p.name) if p is not None and p.op_type == "Add" else None)
        sources[add] = tuple(found)
        pending.extend(s[1] for s in found if s is not None and s[0] == "add" and s[1] not in sources)
    return sources


def _is_add(n: torch.fx.Node) -> bool:
    return (n.op == "call_function" and n.target in (operator.add, torch.add)) or (n.op == "call_method"
                                                                                  and n.target == "add")


def _fx_adds(gm: torch.fx.GraphModule, sources: Mapping[str, tuple[tuple[str, str] | None, ...]],
             ) -> dict[str, tuple[torch.fx.Node, list[torch.fx.Node | None]]]:
    """ONNX Add -> (the traced `+` computing it, the traced node of each ONNX input or None): the add
    reading the same layers' (or Adds') outputs. An Add whose inputs resolve to nothing, or to
    several candidate adds, is an error, so a wrong match cannot pass silently."""
    calls = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    found: dict[str, torch.fx.Node] = {}

    def resolve(source: tuple[str, str] | None) -> torch.fx.Node | None:
        if source is None:
            return None
        kind, name = source
        return calls.get(name) if kind == "module" else match(name)

    def match(add: str) -> torch.fx.Node:
        if add not in found:
            known = [r for r in (resolve(s) for s in sources[add]) if r is not None]
            if not known:
                raise ConfigError(f"cannot map ONNX Add '{add}' to the PyTorch graph: no input is a layer or Add")
            users = [u for u in known[0].users if _is_add(u) and all(k in u.args for k in known)]
            if len(users) != 1:
                raise ConfigError(f"cannot map ONNX Add '{add}' to the PyTorch graph ({len(users)} candidates)")
            found[add] = users[0]
        return found[add]

    return {add: (match(add), [resolve(s) for s in sources[add]]) for add in sources}


def _add_rounding(node: torch.fx.Node, source_nodes: Sequence[torch.fx.Node | None], qadd: QAdd,
                  ) -> dict[torch.fx.Node, QTensor]:
    """What quantizing one Add rounds: each summand's tensor (for every reader, as ORT's Q/DQ
    pair serves them all) and the sum."""
    args = [a for a in node.args if isinstance(a, torch.fx.Node)]
    if len(args) != 2 or len(qadd.inputs) != 2 or qadd.output is None:
        raise ConfigError(f"emulation supports two-input quantized Adds; '{qadd.node}' is not one")
    order = list(source_nodes)
    if order.count(None) == 1:  # the unresolved input is the other summand
        order[order.index(None)] = next(a for a in args if a not in order)
    if sorted(map(id, order)) != sorted(map(id, args)):
        raise ConfigError(f"cannot match the inputs of Add '{qadd.node}' to its PyTorch twin")
    return {order[0]: qadd.inputs[0], order[1]: qadd.inputs[1], node: qadd.output}


def _descendants_of(start: Sequence[torch.fx.Node]) -> set[torch.fx.Node]:
    stack = list(start)
    seen: set[torch.fx.Node] = set()
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.users)
    return seen


def _descendants(gm: torch.fx.GraphModule, targets: Sequence[str]) -> set[torch.fx.Node]:
    return _descendants_of([n for n in gm.graph.nodes if n.op == "call_module" and n.target in targets])


def layer_errors(module: torch.nn.Module, layers: Mapping[str, QLayer], paths: Mapping[str, str],
                 feeds: Sequence[torch.Tensor], metric: Callable[[np.ndarray, np.ndarray], float],
                 siblings: Mapping[str, Sequence[str]] | None = None,
                 adds: Mapping[str, QAdd] | None = None,
                 add_inputs: Mapping[str, tuple[tuple[str, str] | None, ...]] | None = None,
                 ) -> tuple[dict[str, float], dict[str, float]]:
    """({node: mean metric(fp32 output, output with only that node quantized)}, {layer: MACs per feed,
    Add: elements of its output per feed}).

    `module` takes one tensor and returns a tuple whose first element is the output compared;
    `siblings[node]` are module paths of float layers reading the same (quantized) input tensor.
    `adds` (with `add_inputs`, from `add_sources`): quantized Adds scored the same way, each alone
    (they have no MACs).
    """
    siblings, adds = siblings or {}, adds or {}
    for node, path in paths.items():
        if not isinstance(module.get_submodule(path), torch.nn.modules.conv._ConvNd):
            raise ConfigError(f"emulation supports convolutions only; '{node}' ({path}) is not one")
    gm = torch.fx.symbolic_trace(module)
    dirty = {node: _descendants(gm, [path, *siblings.get(node, ())]) for node, path in paths.items()}
    rounding: dict[str, dict[torch.fx.Node, QTensor]] = {}
    twins = _fx_adds(gm, add_inputs or {}) if adds else {}
    for add, qadd in adds.items():
        rounding[add] = _add_rounding(*twins[add], qadd)
    errors: dict[str, list[float]] = {node: [] for node in [*paths, *adds]}
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
            for add, rounded in rounding.items():
                errors[add].append(float(metric(ref, _Rounded(gm, cache, rounded).run(feed)[0].numpy())))
                macs[add] = float(cache[twins[add][0]].numel())
            del cache, ref_run
    return {node: float(np.mean(v)) for node, v in errors.items()}, macs


def _conv_macs(gm: torch.fx.GraphModule, cache: Mapping[torch.fx.Node, Any], path: str) -> float:
    conv = gm.get_submodule(path)
    call = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == path)
    out = cache[call]
    return float(out.numel() * conv.weight[0].numel())
