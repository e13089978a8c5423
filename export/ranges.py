"""Reference run: the range of every tensor of an FP32 ONNX graph on real inputs, and the nodes
that FP16 cannot carry.

FP16 holds magnitudes up to 65504 and loses precision below its smallest normal (2^-14 ≈ 6.1e-5).
A node whose output exceeds a safe fraction of that range must compute in FP32, and so must its
consumers: the converter would otherwise put a Cast to FP16 between them, which overflows just the
same. Norm-like ops square their inputs internally, so their safe output is the square root of it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from voxport.runtime.backends.base import Runner
from voxport.runtime.backends.onnxruntime import SessionSettings, open_session

log = logging.getLogger(__name__)

FP16_MAX = 65504.0
FP16_MIN_NORMAL = 2.0**-14
_SQUARING_OPS = ("ReduceL2", "ReduceSumSquare", "LpNormalization")



@dataclass
class TensorRange:
    """Running statistics of one float tensor over every call of the reference run."""

    max_abs: float = 0.0
    abs_sum: float = 0.0
    subnormal_sum: float = 0.0  # sum of |x| over values below FP16's smallest normal
    values: int = 0
    nonfinite: int = 0

    def update(self, values: np.ndarray) -> None:
        flat = np.abs(np.asarray(values, dtype=np.float64).ravel())
        finite = np.isfinite(flat)
        self.nonfinite += int((~finite).sum())
        flat = flat[finite]
        if flat.size:
            self.max_abs = max(self.max_abs, float(flat.max()))
            self.abs_sum += float(flat.sum())
            self.subnormal_sum += float(flat[flat < FP16_MIN_NORMAL].sum())
            self.values += int(flat.size)

    @property
    def subnormal_mass(self) -> float:
        """Share of the tensor's total magnitude carried by values FP16 stores imprecisely or as 0."""
        return self.subnormal_sum / self.abs_sum if self.abs_sum > 0 else 0.0


@dataclass(frozen=True)
class RangeLimits:
    max_fraction: float = 0.25  # keep FP32 where |x| exceeds this fraction of 65504
    max_subnormal_mass: float = 0.01  # ... or where more than this share of |x| is below 2^-14

    @property
    def max_abs(self) -> float:
        return self.max_fraction * FP16_MAX


def instrumented(model: onnx.ModelProto, threads: int = 1) -> tuple[Runner, dict[str, TensorRange]]:
    """A Runner over an FP32 `model` that returns its declared outputs and records the range of
    every float tensor computed on the way (all node outputs become session outputs)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    declared = [o.name for o in probe.graph.output]
    extra = [o for n in probe.graph.node for o in n.output if o and o not in declared]
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in extra)
    # No fusion: every tensor of the graph as written, so a range maps to the node producing it.
    settings = SessionSettings(graph_optimization="disabled", intra_op_threads=threads)
    session = open_session(probe.SerializeToString(), settings=settings)
    in_names = [i.name for i in session.get_inputs()]
    out_names = [o.name for o in session.get_outputs()]
    ranges: dict[str, TensorRange] = {}

    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = session.run(None, {n: feeds[n] for n in in_names})
        for name in in_names:
            if np.asarray(feeds[name]).dtype.kind == "f":
                ranges.setdefault(name, TensorRange()).update(feeds[name])
        for name, value in zip(out_names, values, strict=True):
            if value.dtype.kind == "f":
                ranges.setdefault(name, TensorRange()).update(value)
        return {n: v for n, v in zip(out_names, values, strict=True) if n in declared}

    return run, ranges


def fp32_nodes(model: onnx.ModelProto, ranges: Mapping[str, TensorRange], limits: RangeLimits) -> dict[str, str]:
    """Nodes that must stay FP32, each with the reason (from the reference run's ranges)."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    observed = dict(ranges)
    for init in graph.initializer:  # weights beyond FP16's range would be clipped by the converter
        if init.data_type == onnx.TensorProto.FLOAT:
            observed.setdefault(init.name, TensorRange()).update(numpy_helper.to_array(init))
    keep: dict[str, str] = {}
    for tensor, r in observed.items():
        if r.max_abs > limits.max_abs:
            why = f"|{tensor}| reaches {r.max_abs:.4g} > {limits.max_fraction:g} x 65504"
        elif r.subnormal_mass > limits.max_subnormal_mass:
            why = f"{r.subnormal_mass:.1%} of |{tensor}| lies below FP16's smallest normal 6.1e-05"
        else:
            continue
        nodes = ([producer[tensor]] if tensor in producer else []) + consumers.get(tensor, [])
        for node in nodes:
            keep.setdefault(node.name, why)
    for node in graph.node:
        if node.op_type in _SQUARING_OPS:
            peak = max((observed[o].max_abs for o in node.output if o in observed), default=0.0)
            if peak**2 > limits.max_abs:
                keep.setdefault(node.name, f"{node.op_type} squares internally: {peak:.4g}^2 = {peak**2:.4g} "
                                           f"> {limits.max_fraction:g} x 65504")
    return keep
