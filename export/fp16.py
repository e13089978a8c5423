"""Stage `fp16`: an FP16 ONNX artifact for GPU targets, overflow-prone nodes kept in FP32.

Which nodes stay FP32 is decided by a reference run of the FP32 graph on real calibration speech
(export/ranges.py), not guessed. The conversion keeps FP32 inputs and outputs (the runtime's
contract does not change) and must pass `onnx.checker`'s full check. This host has no GPU, so the
artifact is gated on ONNX Runtime CPU, which computes most FP16 nodes in FP32 behind Casts it
inserts: the figures overstate GPU FP16 accuracy, and the record says so. A torch `.half()` run on
a short input, the better proxy for FP16 arithmetic, is recorded beside them.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from voxport.errors import ConfigError
from voxport.evaluate import inputs, quality
from voxport.export.gate import (
    gate_graph,
    quiet_runner,
    reference_specs,
    synthesizer_cases,
    timing_feed,
    torch_half_figures,
)
from voxport.export.onnx import torch_runner
from voxport.export.ranges import RangeLimits, TensorRange, fp32_nodes, instrumented
from voxport.models.checkpoint import sha256_file
from voxport.pipeline.passes import StageContext, fail, known_settings, register
from voxport.pipeline.records import Record, now_iso, tool_versions, write_record

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
    gate_seconds: float = 3.0
    timing_seconds: float = 3.0
    texts: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> Fp16Config:
        data = known_settings(cls, settings, "fp16")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


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


def reference_ranges(parent: Record, model: onnx.ModelProto, ctx: StageContext, cfg: Fp16Config,
                     ) -> tuple[dict[str, TensorRange], dict[str, Any]]:
    """Run the FP32 graph on real calibration inputs; the range of every tensor, and what ran."""
    run, ranges = instrumented(model, threads=ctx.threads or 1)
    source, specs = reference_specs(ctx, parent.component)
    if parent.component == "vocoder":
        from voxport.models.audio import MelConfig

        mel_cfg = MelConfig.from_dict(source.contract["mel"])
        clips = inputs.speech_clips(ctx.corpus, mel_cfg, cfg.calibration_clips, cfg.crop_seconds, split="calib")
        for feed in inputs.vocoder_feeds(clips):
            run(feed)
        return ranges, {"split": "calib", "clips": [c.id for c in clips]}
    if parent.component == "speaker_encoder":
        enc_cfg = specs["speaker_encoder"].module.encoder.cfg
        feeds = inputs.encoder_feeds(ctx.corpus, enc_cfg, cfg.calibration_clips, split="calib")
        for feed in feeds:
            run(feed)
        return ranges, {"split": "calib", "utterances": len(feeds)}
    import torch

    from voxport.models.synthesizer import SynthesizerConfig
    from voxport.runtime.synthesizer_loop import run_host_loop

    syn_cfg = SynthesizerConfig.from_dict(source.model["config"])
    graphs = {g: run if g == parent.graph else quiet_runner(ctx.bundle_dir / ctx.find(parent.component, g, "onnx").file)
              for g in ("encoder", "decoder_step", "postnet")}
    cases = synthesizer_cases(ctx, list(cfg.texts), syn_cfg.n_symbols, split="calib")
    for ids, embedding in cases:
        run_host_loop(graphs["encoder"], graphs["decoder_step"], graphs["postnet"], np.asarray([ids], dtype=np.int64),
                      embedding[None].astype(np.float32), 0, torch.Generator().manual_seed(ctx.seed), syn_cfg,
                      max_decoder_steps=cfg.calibration_steps, stop_on_token=False)
    return ranges, {"split": "calib", "texts": len(cases), "decoder_steps": cfg.calibration_steps}


def _headline(component: str, figures: Mapping[str, Any]) -> dict[str, Any]:
    keys = {"vocoder": {"wav_snr_db_vs_fp32_min": "wav_snr_db_min", "mr_stft_distance_vs_fp32_max":
                        "mr_stft_distance_max", "log_mel_distance_increase_db": "log_mel_distance_increase_db",
                        "pesq_drop": "pesq_drop"},
            "speaker_encoder": {"embedding_cosine_min": "embedding_cosine_min"},
            "synthesizer": {"mel_snr_db_min": "mel_snr_db_min", "stop_agreement_min": "stop_agreement_min"}}
    return {new: figures[old] for old, new in keys[component].items() if old in figures}


def _save(model: onnx.ModelProto, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        onnx.save(model, tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


@register("fp16")
def run(parent: Record, cfg: Any, ctx: StageContext) -> Record:
    """FP16 ONNX from the FP32 ONNX `parent`; gated with conf `gates.<component>.fp16`."""
    if parent.format != "onnx" or parent.precision != "fp32":
        raise ConfigError(f"fp16 stage needs an FP32 ONNX parent, got {parent.file} "
                          f"({parent.format} {parent.precision})")
    settings = dict(cfg)
    fcfg = Fp16Config.from_settings(settings)
    gate = ctx.gate(parent.component, "fp16")
    label = f"{parent.key} FP16"
    model = prepare(onnx.load(str(ctx.bundle_dir / parent.file)))
    ranges, calibration = reference_ranges(parent, model, ctx, fcfg)
    keep = fp32_nodes(model, ranges, RangeLimits(fcfg.max_fraction, fcfg.max_subnormal_mass))
    keep.update({name: "configured (fp16.exclude_nodes)" for name in fcfg.exclude_nodes})
    try:
        converted, info = to_fp16(model, keep, fcfg.exclude_op_types)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as exc:
        fail(label, [f"FP16 conversion is not a valid ONNX model: {str(exc).splitlines()[0]}"], {}, [])
    name = parent.file.replace("_fp32.onnx", "_fp16.onnx") if parent.file.endswith("_fp32.onnx") \
        else f"{Path(parent.file).stem}_fp16.onnx"
    path = ctx.bundle_dir / name
    _save(converted, path)
    written = [path]
    try:
        run_fp16 = quiet_runner(path, threads=ctx.threads)
        others = {r.graph: quiet_runner(ctx.bundle_dir / r.file, threads=ctx.threads) for r in ctx.records
                  if r.component == parent.component and r.stage == "fp16" and r.graph != parent.graph}
        figures, failures = gate_graph(parent, run_fp16, ctx, gate, settings, others)
        half = torch_half_figures(parent, ctx, fcfg.torch_half_seconds, fcfg.texts) if fcfg.torch_half_seconds else {}
        speed: dict[str, Any] = {}
        if fcfg.measure_speed:
            feed, seconds = timing_feed(parent, ctx, fcfg.timing_seconds)
            _, specs = reference_specs(ctx, parent.component)
            speed = quality.speed_figures(torch_runner(specs[parent.graph]), quiet_runner(ctx.bundle_dir / parent.file,
                                          threads=ctx.threads), run_fp16, feed, seconds, ctx.timing_repeats,
                                          ctx.timing_min_seconds)
            speed["note"] = "ONNX Runtime CPU timing of a GPU artifact (inserted Casts): says nothing of GPU speed"
    except BaseException:
        for p in written:
            p.unlink(missing_ok=True)
        raise
    if failures:
        fail(label, failures, figures, written)
    counts = precision_counts(converted)
    log.info("%s: %d nodes FP16, %d kept FP32 by the reference run", label, counts["fp16"], len(keep))
    record = Record(
        component=parent.component, graph=parent.graph, format="onnx", precision="fp16", file=name,
        sha256=sha256_file(path), weights=parent.weights, stage="fp16", inputs=parent.inputs,
        outputs=parent.outputs, parent=parent.file, parent_sha256=parent.sha256, model=parent.model,
        contract=parent.contract,
        config={**settings, "kept_fp32": [{"node": n, "reason": why} for n, why in sorted(keep.items())],
                "node_precisions": counts, "calibration": calibration, **info},
        parity={**_headline(parent.component, figures), "measured_on": ORT_CPU_NOTE, "torch_half_cpu": half},
        quality={**figures, "passed": True, "engine": "onnxruntime-cpu"}, speed=speed,
        tools=tool_versions(), created=now_iso(),
    )
    write_record(record, ctx.bundle_dir)
    return record
