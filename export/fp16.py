"""Pass `fp16`: an FP16 ONNX artifact for GPU targets, overflow-prone nodes kept in FP32.

Which nodes stay FP32 is decided by a reference run of the FP32 graph on real calibration speech
(export/ranges.py), not guessed. The conversion keeps FP32 inputs and outputs (the runtime's
contract does not change) and must pass `onnx.checker`'s full check. This host has no GPU, so the
artifact is gated on ONNX Runtime CPU, which computes most FP16 nodes in FP32 behind Casts it
inserts: the figures overstate GPU FP16 accuracy, and the record says so. A torch `.half()` run on
a short input, the better proxy for FP16 arithmetic, is recorded beside them.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from onnx import helper

from voxport.errors import ConfigError, GateError
from voxport.export.ranges import RangeLimits, TensorRange, fp32_nodes, instrumented
from voxport.pipeline.passes import Candidate, PassContext, known_settings
from voxport.pipeline.records import Record, atomic_path

log = logging.getLogger(__name__)

ORT_CPU_NOTE = ("measured on ONNX Runtime CPU, which runs most FP16 nodes in FP32 behind Casts it inserts "
                "at session start: these figures overstate GPU FP16 accuracy (torch_half_cpu is the better proxy)")


@dataclass(frozen=True)
class Fp16Config:
    calibration_clips: int = 6  # real speech from the corpus' calib split (reference run)
    crop_seconds: float = 2.0
    calibration_steps: int = 60  # synthesizer decoder steps per text in the reference run
    max_fraction: float = 0.25  # keep FP32 where |activation| > this fraction of 65504
    max_subnormal_mass: float = 0.01  # ... or where this share of |activation| is below 2^-14
    exclude_op_types: tuple[str, ...] = ()  # always FP32, besides onnxconverter-common's defaults
    exclude_nodes: tuple[str, ...] = ()
    torch_half_seconds: float = 0.25  # torch .half() CPU proxy on a short input (0: skip)
    measure_speed: bool = False
    graph: str = ""

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> Fp16Config:
        return cls(**known_settings(cls, settings, "fp16", ignored=()))

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _cast_to(node: onnx.NodeProto) -> int | None:
    """The target type of a Cast node (None for other nodes)."""
    if node.op_type != "Cast":
        return None
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == "to"), None)


def prepare(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy the converter handles: every node named (blocking is by name), and graph outputs
    that other nodes also read routed through an Identity (keep_io_types would otherwise leave
    those readers with an FP32 input beside FP16 weights)."""
    out = _copy(model)
    graph = out.graph
    taken = {n.name for n in graph.node}
    for i, node in enumerate(graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
            while node.name in taken:
                node.name += "_"
            taken.add(node.name)
    read = {name for node in graph.node for name in node.input}
    for output in graph.output:
        if output.name not in read:
            continue
        inner = f"{output.name}__inner"
        for node in graph.node:
            node.output[:] = [inner if o == output.name else o for o in node.output]
            node.input[:] = [inner if i == output.name else i for i in node.input]
        graph.node.append(helper.make_node("Identity", [inner], [output.name], name=f"{output.name}__output"))
    return out


def to_fp16(model: onnx.ModelProto, keep_fp32: Mapping[str, str], exclude_op_types: tuple[str, ...] = (),
            ) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Convert a `prepare`d FP32 model to FP16 (FP32 I/O), keeping `keep_fp32` nodes in FP32.

    Existing Casts to float are kept FP32 too (the converter retypes their outputs but not their
    `to` attribute). Raises onnx.checker's error if the result is not a valid model.
    """
    from onnxconverter_common import float16

    model = _copy(model)  # the converter edits its argument in place
    casts = [n.name for n in model.graph.node if _cast_to(n) == onnx.TensorProto.FLOAT]
    with warnings.catch_warnings(record=True) as clamped:
        warnings.simplefilter("always")
        converted = float16.convert_float_to_float16(
            model, keep_io_types=True, min_positive_val=2.0**-24, max_finite_val=65504.0,
            op_block_list=[*float16.DEFAULT_OP_BLOCK_LIST, *exclude_op_types],
            node_block_list=sorted({*keep_fp32, *casts}),
        )
    round_trips = _drop_fp16_round_trips(converted)
    onnx.checker.check_model(converted, full_check=True)
    info = {"converter": "onnxconverter-common float16", "keep_io_types": True,
            "weight_clamp_warnings": sum("truncated" in str(w.message) for w in clamped),
            "float_casts_kept": len(casts), "fp16_round_trips_removed": round_trips,
            "op_types_kept_fp32": sorted({*float16.DEFAULT_OP_BLOCK_LIST, *exclude_op_types})}
    return converted, info


def _drop_fp16_round_trips(model: onnx.ModelProto) -> int:
    """Between two FP32 nodes the converter leaves Cast(FP16) -> Cast(FP32): a round trip through
    FP16 that overflows exactly the tensors the reference run kept FP32. Each becomes an Identity
    of the original FP32 tensor; the FP16 Cast goes if nothing else reads it."""
    graph = model.graph
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.input]}
    types.update({t.name: t.data_type for t in graph.initializer})
    producer = {o: n for n in graph.node for o in n.output}
    removed = 0
    for node in graph.node:
        src = producer.get(node.input[0]) if node.op_type == "Cast" else None
        if (_cast_to(node) == onnx.TensorProto.FLOAT and src is not None and _cast_to(src) == onnx.TensorProto.FLOAT16
                and types.get(src.input[0]) == onnx.TensorProto.FLOAT):
            node.op_type = "Identity"
            node.input[0] = src.input[0]
            del node.attribute[:]
            removed += 1
    read = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    dead = [n for n in graph.node if n.op_type == "Cast" and not any(o in read for o in n.output)]
    for node in dead:
        graph.node.remove(node)
    return removed


def precision_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Nodes computing in FP16 / FP32 (by the type of their first output; Casts not counted)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]}
    counts = {"fp16": 0, "fp32": 0, "other": 0}
    for node in inferred.graph.node:
        if node.op_type == "Cast" or not node.output:
            continue
        elem = types.get(node.output[0])
        key = {onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.FLOAT: "fp32"}.get(elem, "other")
        counts[key] += 1
    return counts


def reference_ranges(parent: Record, model: onnx.ModelProto, ctx: PassContext, cfg: Fp16Config,
                     ) -> tuple[dict[str, TensorRange], dict[str, Any]]:
    """Run the FP32 graph on real calibration inputs (its component chooses them); the range of
    every tensor, and what ran."""
    run, ranges = instrumented(model, threads=ctx.threads or 1)
    ran = ctx.component.drive(parent.graph, run, cfg.calibration_clips, cfg.crop_seconds, cfg.calibration_steps)
    return ranges, ran


def _save(model: onnx.ModelProto, path: Path) -> None:
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))


CONFIG = Fp16Config


def transform(parent: Record, fcfg: Fp16Config, ctx: PassContext) -> Candidate:
    """FP16 ONNX from the FP32 ONNX `parent`; the engine gates it with `gates.<component>.fp16`."""
    if parent.format != "onnx" or parent.precision != "fp32":
        raise ConfigError(f"fp16 stage needs an FP32 ONNX parent, got {parent.file} "
                          f"({parent.format} {parent.precision})")
    label = f"{parent.key} FP16"
    model = prepare(onnx.load(str(ctx.bundle_dir / parent.file)))
    ranges, calibration = reference_ranges(parent, model, ctx, fcfg)
    keep = fp32_nodes(model, ranges, RangeLimits(fcfg.max_fraction, fcfg.max_subnormal_mass))
    keep.update({name: "configured (fp16.exclude_nodes)" for name in fcfg.exclude_nodes})
    try:
        converted, info = to_fp16(model, keep, fcfg.exclude_op_types)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as exc:
        raise GateError(label, [f"FP16 conversion is not a valid ONNX model: {str(exc).splitlines()[0]}"]) from None
    name = parent.file.replace("_fp32.onnx", "_fp16.onnx") if parent.file.endswith("_fp32.onnx") \
        else f"{Path(parent.file).stem}_fp16.onnx"
    path = ctx.bundle_dir / name
    _save(converted, path)
    try:
        half = ctx.component.half_precision_proxy(parent.graph, fcfg.torch_half_seconds) \
            if fcfg.torch_half_seconds else {}
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    counts = precision_counts(converted)
    log.info("%s: %d nodes FP16, %d kept FP32 by the reference run", label, counts["fp16"], len(keep))
    draft = Record(
        component=parent.component, graph=parent.graph, format="onnx", precision="fp16", file=name, sha256="",
        weights=parent.weights, stage="fp16", inputs=parent.inputs, outputs=parent.outputs, parent=parent.file,
        parent_sha256=parent.sha256, model=parent.model, contract=parent.contract,
        config={**fcfg.to_dict(), "kept_fp32": [{"node": n, "reason": why} for n, why in sorted(keep.items())],
                "node_precisions": counts, "calibration": calibration, **info},
        parity={"measured_on": ORT_CPU_NOTE, "engine": "onnxruntime-cpu", "torch_half_cpu": half},
        speed={"note": "ONNX Runtime CPU timing of a GPU artifact (inserted Casts): says nothing of GPU speed"}
        if fcfg.measure_speed else {},
    )
    # ONNX Runtime CPU timing of a GPU artifact says nothing of GPU speed (and takes minutes).
    return Candidate([draft], {"label": label, "timed": fcfg.measure_speed})
