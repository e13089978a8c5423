"""ONNX Runtime static INT8 (QDQ) building blocks: calibrate once, quantize many, count integer ops.

Calibration is the slow part (a histogram over every activation for Entropy / Percentile), so it
runs once per model and calibration setting; the tensor ranges it produces are saved with ORT's
own `calibration_cache_path` and reused for every node subset the mixed precision search tries.

"INT8" can silently run in float: a Q/DQ pair that ONNX Runtime does not fuse into an integer
kernel costs time and computes in FP32. So besides the Q/DQ nodes in the file we count the
integer kernels in the graph ONNX Runtime actually runs (its optimized graph).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader

from voxport.quantize.config import QuantizeConfig
from voxport.runtime.backends.onnxruntime import SessionSettings, open_session

log = logging.getLogger(__name__)

# Operators that compute on integers (QDQ fused forms, QOperator forms, dynamic forms).
INTEGER_OPS = ("QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd", "QLinearMul", "QLinearLeakyRelu",
               "QLinearConcat", "QLinearSigmoid", "QLinearAveragePool", "QLinearGlobalAveragePool",
               "ConvInteger", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
               "DynamicQuantizeLSTM", "NhwcQLinearConv")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear")
# Float compute worth reporting beside the integer ops.
FLOAT_COMPUTE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm", "LSTM", "FusedConv", "FusedMatMul", "FusedGemm")


def quant_types(cfg: QuantizeConfig) -> tuple[object, object]:
    from onnxruntime.quantization import QuantType

    types = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    return types[cfg.activation_type], types[cfg.weight_type]


def calibration_method(name: str) -> object:
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[name]


def preprocess(src: Path, dst: Path) -> Path:
    """ORT's recommended pre-processing (symbolic shape inference, graph optimization) before quantizing."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(src), str(dst), skip_symbolic_shape=False)
    return dst


class FeedReader(CalibrationDataReader):
    """ORT's calibration reader over a fixed list of real feeds."""

    def __init__(self, feeds: Sequence[Mapping[str, np.ndarray]]) -> None:
        self._feeds = list(feeds)
        self._it = iter(self._feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def __len__(self) -> int:
        return len(self._feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._it = iter(self._feeds[start_index:end_index])


def calibrate(pre: Path, cfg: QuantizeConfig, feeds: Sequence[Mapping[str, np.ndarray]], cache: Path) -> Path:
    """Tensor ranges of every input/output of `cfg.op_types` nodes on real feeds, saved to `cache`
    in ORT's calibration-cache format.

    ORT's calibrator is driven directly because `quantize_static` cannot set two things that
    matter here: its Entropy method keeps num_bins = num_quantized_bins = 128, which leaves ONE
    candidate threshold (the full range: Entropy silently equals MinMax), and its Percentile
    method defaults to SYMMETRIC ranges [-t, t], which for mostly positive LeakyRelu outputs
    wastes half of the U8 codes. Both use `histogram_bins` and asymmetric ranges here.
    """
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    extra: dict[str, object] = {"symmetric": False}
    if cfg.calibration in ("entropy", "percentile"):
        extra.update(num_bins=cfg.histogram_bins, num_quantized_bins=128, percentile=cfg.percentile)
    with tempfile.TemporaryDirectory(prefix="voxport-calib-") as tmp:
        calibrator = create_calibrator(Path(pre), list(cfg.quantized_op_types),
                                       augmented_model_path=str(Path(tmp) / "aug.onnx"),
                                       calibrate_method=calibration_method(cfg.calibration), extra_options=extra)
        calibrator.collect_data(FeedReader(feeds))
        save_tensors_data(calibrator.compute_data(), cache)
    return cache


def quantize(pre: Path, out: Path, cfg: QuantizeConfig, nodes: Sequence[str], cache: Path,
             feeds: Sequence[Mapping[str, np.ndarray]] | None = None) -> Path:
    """Static QDQ quantization of exactly `nodes`, written atomically to `out`.

    The first call (with `feeds`) calibrates and writes the tensor ranges to `cache`; later calls
    reuse them, so every variant of one search shares the same scales.
    """
    from onnxruntime.quantization import QuantFormat, quantize_static

    if not nodes:
        raise ValueError("quantize: no node to quantize")
    if feeds is not None:
        calibrate(pre, cfg, feeds, cache)
    activation, weight = quant_types(cfg)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=".onnx", dir=out.parent)
    os.close(fd)
    try:
        quantize_static(
            str(pre), tmp, None, quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(cfg.quantized_op_types), nodes_to_quantize=list(nodes),
            per_channel=cfg.per_channel, reduce_range=cfg.reduce_range, activation_type=activation, weight_type=weight,
            calibrate_method=calibration_method(cfg.calibration),
            extra_options={"CalibPercentile": cfg.percentile}, calibration_cache_path=str(cache),
        )
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return out


def load_graph(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=False)


def op_counts(model: onnx.ModelProto | Path) -> dict[str, int]:
    graph = (load_graph(model) if isinstance(model, (str, Path)) else model).graph
    return dict(sorted(Counter(n.op_type for n in graph.node).items()))


def runtime_op_counts(path: Path) -> dict[str, int]:
    """Operator counts of the graph ONNX Runtime executes (extended optimizations: QDQ fusions,
    no hardware-specific layout), i.e. whether Q/DQ pairs became integer kernels."""
    with tempfile.TemporaryDirectory(prefix="voxport-ortopt-") as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        open_session(path, settings=SessionSettings(graph_optimization="extended"), optimized_model_filepath=optimized)
        return op_counts(load_graph(optimized))


def integer_summary(path: Path) -> dict[str, dict[str, int]]:
    """{'file': Q/DQ and compute ops in the artifact, 'runtime': integer and float compute ops
    in the graph ONNX Runtime runs}."""
    in_file, at_runtime = op_counts(path), runtime_op_counts(path)
    keep = (*INTEGER_OPS, *QDQ_OPS, *FLOAT_COMPUTE_OPS)
    return {"file": {k: v for k, v in in_file.items() if k in keep},
            "runtime": {k: v for k, v in at_runtime.items() if k in keep}}


def left_float(path: Path, nodes: Iterable[str]) -> list[str]:
    """Nodes that were asked to be quantized but still compute in float with float weights (ORT's
    dynamic quantizer renames Gemm to '<name>_MatMul' first; both names are checked)."""
    model = load_graph(path)
    float_inits = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    compute = {n.name: n for n in model.graph.node if n.op_type in FLOAT_COMPUTE_OPS}
    left = []
    for name in nodes:
        for alias in (name, f"{name}_MatMul"):
            node = compute.get(alias)
            if node is not None and len(node.input) > 1 and node.input[1] in float_inits:
                left.append(name)
                break
    return left


# OpenVINO's layer types that multiply-accumulate, and its runtime layers counted as
# `<layer type>[<runtime precision>]` (export/openvino.py) that do so in integers.
OPENVINO_MAC_LAYERS = ("Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul")
OPENVINO_INTEGER_LAYERS = tuple(f"{layer}[{p}]" for layer in OPENVINO_MAC_LAYERS for p in ("u8", "i8"))


def integer_op_total(counts: Mapping[str, int]) -> int:
    """Integer kernels among op counts (ONNX Runtime ops, OpenVINO layers, or PyTorch
    `DynamicQuantized*` modules)."""
    return sum(v for k, v in counts.items()
               if k in INTEGER_OPS or k in OPENVINO_INTEGER_LAYERS or k.startswith("DynamicQuantized"))


def candidate_nodes(model: onnx.ModelProto, cfg: QuantizeConfig) -> tuple[list[str], dict[str, str]]:
    """(nodes the search may quantize, {node kept float: why}) for the static stage."""
    kept: dict[str, str] = {}
    candidates = []
    output_layers = set(output_layer_nodes(model)) if cfg.keep_output_layer_float else set()
    for node in model.graph.node:
        if node.op_type in cfg.exclude_op_types:
            kept[node.name] = f"op type {node.op_type} excluded (quantize.exclude_op_types)"
        elif node.op_type not in cfg.op_types:
            continue
        elif node.name in cfg.exclude_nodes:
            kept[node.name] = "excluded by name (quantize.exclude_nodes)"
        elif node.name in output_layers:
            kept[node.name] = "output layer (quantize.keep_output_layer_float)"
        else:
            candidates.append(node.name)
    missing = sorted(set(cfg.exclude_nodes) - {n.name for n in model.graph.node})
    if missing:
        from voxport.errors import ConfigError

        raise ConfigError(f"quantize.exclude_nodes names no node of this graph: {', '.join(missing)}")
    return candidates, kept


def residual_adds(model: onnx.ModelProto, quantized: Iterable[str]) -> list[str]:
    """Add nodes reading the output of one of the `quantized` nodes, in graph order (the residual
    connections of an INT8 layer: quantizing them too keeps the stream in integers)."""
    quantized = set(quantized)
    producer = {out: node.name for node in model.graph.node for out in node.output}
    return [n.name for n in model.graph.node
            if n.op_type == "Add" and any(producer.get(i) in quantized for i in n.input)]


def output_layer_nodes(model: onnx.ModelProto, compute: Iterable[str] = FLOAT_COMPUTE_OPS) -> list[str]:
    """Compute nodes whose result reaches a graph output without passing another compute node."""
    compute = set(compute)
    producer = {out: node for node in model.graph.node for out in node.output}
    found, stack, seen = [], [o.name for o in model.graph.output], set()
    while stack:
        node = producer.get(stack.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in compute:
            found.append(node.name)
        else:
            stack.extend(node.input)
    return found


def node_weights(model: onnx.ModelProto) -> dict[str, str]:
    """Node name -> name of its weight initializer (second input), for nodes that have one."""
    inits = {i.name for i in model.graph.initializer}
    return {n.name: n.input[1] for n in model.graph.node if len(n.input) > 1 and n.input[1] in inits}


def weight_macs(model: onnx.ModelProto, nodes: Iterable[str], steps: int = 1) -> dict[str, float]:
    """Multiply-accumulates per row of input, from weight sizes: an LSTM applies its W and R at
    each of `steps` time steps, a MatMul / Gemm its weight once (relative costs for ranking)."""
    sizes = {i.name: float(np.prod(i.dims)) for i in model.graph.initializer}
    by_name = {n.name: n for n in model.graph.node}
    out = {}
    for name in nodes:
        node = by_name[name]
        if node.op_type == "LSTM":
            out[name] = (sizes.get(node.input[1], 0.0) + sizes.get(node.input[2], 0.0)) * steps
        else:
            out[name] = sizes.get(node.input[1], 0.0)
    return out

