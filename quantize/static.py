"""Pass `quantize_static`: ONNX Runtime static INT8 (QDQ) of a convolutional graph (the
vocoder), calibrated on real speech of its component's calibration split.

Naive all-conv INT8 of the real HiFi-GAN is audibly broken (copy synthesis log-mel distance
9.5 dB vs 2.9 for FP32, PESQ 1.7 vs 2.8), so the layers to quantize are searched
(quantize/search.py) against the component's listener-side gate on CALIBRATION clips, tightened
by `search_margin`; ConvTranspose (no integer kernel) and the output layer stay float by default.
The engine then judges the result on held-out recordings against the PyTorch FP32 original and
times it (with `require_speedup`, it must beat its FP32 parent, measured side by side).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from voxport.errors import ConfigError, GateError
from voxport.evaluate import metrics
from voxport.evaluate.inputs import SpeechClip
from voxport.export.onnx import ort_runner
from voxport.pipeline.passes import Candidate, PassContext, artifact_name
from voxport.pipeline.records import Record
from voxport.quantize import emulate, qdq, search
from voxport.quantize.config import STATIC_FIELDS, QuantizeConfig

log = logging.getLogger(__name__)

PRECISION = "int8-static"
CONFIG = QuantizeConfig
KEY_FIELDS = STATIC_FIELDS
# The parent's gate figures that count against INT8's budget when the search is measured vs the parent.
SPENT_FIGURES = ("log_mel_distance_increase_db", "pesq_drop")
SEARCHES = True  # the search aims at the gate: a changed gate is a new search (the stage cache's key)


def transform(parent: Record, qc: QuantizeConfig, ctx: PassContext) -> Candidate:
    if parent.format != "onnx" or not hasattr(ctx.component, "calibration_clips"):
        raise ConfigError(f"quantize_static quantizes a convolutional ONNX graph calibrated on speech (the vocoder);"
                          f" got {parent.format} {parent.key}")
    # The network the parent ONNX was exported from: the PyTorch original, or a model an earlier
    # pass made (a pruned vocoder), whose layers the search ranks.
    origin = ctx.record(parent.parent or "") or ctx.component.source
    spec = ctx.component.specs_of(origin, parent.model.get("graph_form"))[parent.graph]
    out = ctx.bundle_dir / artifact_name(parent.file, "int8_static")
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="voxport-int8-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        pre = qdq.preprocess(ctx.bundle_dir / parent.file, work / "pre.onnx")
        pre_model = qdq.load_graph(pre)
        candidates, kept = qdq.candidate_nodes(pre_model, qc)
        if not candidates:
            raise ConfigError(f"{parent.file}: no {'/'.join(qc.op_types)} node left to quantize after exclusions")
        clips = ctx.component.calibration_clips(qc.calibration_clips, qc.crop_seconds)
        feeds = [{"mel": c.mel[None].astype(np.float32)} for c in clips]
        cache = work / "ranges.json"
        # `quantize.integer_adds`: the residual Adds reading a candidate layer join the search, each
        # ranked by its own emulated error, never before that layer (see _ranking).
        adds = qdq.residual_adds(pre_model, candidates) if qc.integer_adds else []
        # Quantizing every candidate once both calibrates (ranges cached for every later variant)
        # and gives the exact scales ORT chose, which the ranking emulates.
        every_node = [*candidates, *adds]
        every = qdq.quantize(pre, work / "all.onnx", qc, every_node, cache, feeds)
        timings["calibration_s"] = time.perf_counter() - t0
        reference = spent = None
        if qc.search_reference == "parent":
            reference = ort_runner(ctx.bundle_dir / parent.file, ctx.threads)
            # What the parent already costs against the original, held out (a pruned model's gate
            # figures, which its export inherits): INT8's budget is what the gate leaves.
            spent = {k: float(parent.quality[k]) for k in SPENT_FIGURES if k in (parent.quality or {})}
        judge = ctx.component.search_judge(spec.name, PRECISION, qc.search_margin, clips=qc.search_clips,
                                           seconds=qc.search_seconds, reference=reference, spent=spent)

        def evaluate(nodes: list[str]) -> search.Trial:
            path = every if nodes == every_node else qdq.quantize(pre, work / "trial.onnx", qc, nodes, cache)
            figures, failures = judge.evaluate(ort_runner(path, ctx.threads))
            return search.Trial(tuple(nodes), figures, failures)

        result = _mixed_precision(qc, pre_model, every, candidates, spec, ctx, evaluate, adds)
        timings["search_s"] = result.seconds
        is_add = set(adds)
        added = [n for n in result.quantized if n in is_add]
        result.quantized = [n for n in result.quantized if n not in is_add]
        # An Add's rank is its layer's; keep what decided it (the trial that rejected it, or the budget).
        left_adds = {n: result.float_nodes.pop(n).split("; ", 1)[-1] for n in adds if n in result.float_nodes}
        if not result.quantized:
            raise GateError(out.name, ["no layer can be quantized within the gate on calibration clips"],
                            {"search": result.describe("log-mel distance vs FP32 (dB)"), "float_nodes": kept})
        final = [*result.quantized, *added]
        if sorted(final) == sorted(candidates):
            shutil.copyfile(every, work / "final.onnx")
            os.replace(work / "final.onnx", out)
        else:
            qdq.quantize(pre, out, qc, final, cache)
    try:
        for node in qdq.left_float(out, result.quantized):  # never claim INT8 for a float layer
            result.quantized.remove(node)
            result.float_nodes[node] = "ONNX Runtime's quantizer left it float"
        ops = qdq.integer_summary(out)
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    float_nodes = {**kept, **result.float_nodes}
    search_figures = result.describe("log-mel distance vs FP32 output, one layer quantized (dB)")
    search_figures["budget_reference"] = (f"the parent {parent.file} (quantize.search_reference=parent)"
                                          if reference is not None else "the PyTorch FP32 original")
    if spent is not None:
        search_figures["budget_spent_by_parent"] = spent
    if qc.integer_adds:
        search_figures["integer_adds"] = {"eligible": len(adds), "quantized": len(added), "left_float": left_adds}
    log.info("%s: %d layers INT8, %d float; %d of %d residual Adds INT8", out.name, len(result.quantized),
             len(float_nodes), len(added), len(adds))
    draft = Record(
        component=parent.component, graph=parent.graph, format="onnx", precision=PRECISION, file=out.name,
        sha256="", weights=parent.weights, stage="quantize-static", inputs=parent.inputs, outputs=parent.outputs,
        parent=parent.file, parent_sha256=parent.sha256, model=parent.model, contract=parent.contract,
        sparsity=parent.sparsity, config={**qc.to_dict(), "calibration_items": [c.id for c in clips]},
        parity={"reference": "PyTorch FP32 original on the held-out gate clips", "integer_ops": ops,
                "quantized_nodes": sorted(result.quantized), "float_nodes": float_nodes,
                "integer_adds": sorted(added), "search": search_figures,
                "timings_s": {k: round(v, 1) for k, v in timings.items()}},
        speed={k: v for k, v in (parent.speed or {}).items() if k in ("flops_reduction", "params_reduction")},
    )
    return Candidate([draft], {"integer_ops": ops, "quantized": len(result.quantized),
                               "float_nodes": len(float_nodes), "search": search_figures})


def _mixed_precision(qc: QuantizeConfig, pre_model: Any, every: Path, candidates: list[str], spec: Any,
                     ctx: PassContext, evaluate: Callable[[list[str]], search.Trial], adds: list[str],
                     ) -> search.SearchResult:
    mel_cfg = spec.module.generator.cfg.mel
    rate = mel_cfg.sample_rate
    macs: dict[str, float] = {}

    def ranking() -> list[tuple[str, float]]:
        t0 = time.perf_counter()
        qdq_model = qdq.load_graph(every)
        layers = emulate.qlayers(qdq_model)
        paths = emulate.module_paths(pre_model, spec.module, candidates)
        qadds = emulate.qadds(qdq_model)
        missing = sorted(set(adds) - set(qadds))
        if missing:
            raise ConfigError(f"the quantizer left Add(s) {', '.join(missing)} without Q/DQ on every input and output")
        batch = _batch(ctx.component.gate_clips("calib", qc.rank_seconds)[: qc.rank_clips])

        def distance(ref: np.ndarray, out: np.ndarray) -> float:
            return float(np.mean([metrics.log_mel_distance_db(a.ravel(), b.ravel(), rate)
                                  for a, b in zip(ref, out, strict=True)]))

        errors, work = emulate.layer_errors(spec.module, layers, paths, [batch], distance,
                                            _sibling_paths(pre_model, spec.module, candidates),
                                            {a: qadds[a] for a in adds},
                                            emulate.add_sources(pre_model, spec.module, adds))
        macs.update({n: work[n] for n in candidates})
        ranked = _ranking(errors, macs, qc.rank_by, pre_model, adds)
        log.info("ranked %d layers and %d Adds in %.1f s (emulated; most tolerant %s, least %s)", len(candidates),
                 len(adds), time.perf_counter() - t0, ranked[0][0], ranked[-1][0])
        return ranked

    result = search.search([*candidates, *adds], ranking, evaluate, qc.search, qc.search_max_trials)
    result.macs = macs
    return result


def _ranking(errors: dict[str, float], macs: dict[str, float], rank_by: str, pre_model: Any, adds: list[str],
             ) -> list[tuple[str, float]]:
    """Layers and Adds most tolerant first, each with its own emulated error in the ranking.

    An integer Add is worth what it keeps in integers, the layers it reads: it takes their MACs
    (`error_per_mac`) and ranks at the larger of its own error and theirs, so it never comes before
    them, and an Add that costs more than its layers sinks by what it costs. Measured on the real
    pruned HiFi-GAN (each alone, emulated; real ORT agrees to 1e-4 dB): an Add of the three
    lower-rate levels costs 0.06-0.39 dB log-mel on a calibration clip, about what its layers cost
    per MAC there, while the full-rate level's cost up to 3.9 dB for 32-channel layers (its residual
    stream follows the waveform's level over time, which one static 8-bit scale cannot), so they
    sink to the end instead of blocking the layers ranked after them. (Weighing an Add by the
    elements it saves instead ranked every Add after the layers, and the search took none: 14 %
    slower.)
    """
    if not adds:
        return search.rank(errors, macs, rank_by)
    producer = {out: n.name for n in pre_model.graph.node for out in n.output}
    nodes = {n.name: n for n in pre_model.graph.node}
    key, work, reads = dict(errors), dict(macs), {}
    for add in adds:  # graph order: what an Add reads is keyed before it
        reads[add] = [producer[i] for i in nodes[add].input if producer.get(i) in key]
        if not reads[add]:
            raise ConfigError(f"integer Add '{add}' reads no candidate layer")
        key[add] = max(errors[add], *(key[r] for r in reads[add]))
        work[add] = max(work[r] for r in reads[add])
    ranked = [name for name, _ in search.rank(key, work, rank_by)]
    for add in adds:  # a tie (an Add as costly as its layer) falls to the names: the Add goes after
        position = {name: k for k, name in enumerate(ranked)}
        last = max(reads[add], key=position.__getitem__)
        if position[add] < position[last]:
            ranked.remove(add)
            ranked.insert(ranked.index(last) + 1, add)
    return [(n, errors[n]) for n in ranked]


def _sibling_paths(pre_model: Any, module: torch.nn.Module, candidates: list[str]) -> dict[str, list[str]]:
    """Module paths of the layers sharing each candidate's input tensor (emulate.shared_inputs);
    readers that are not weighted layers (none in HiFi-GAN) are left out of the emulation."""
    weighted = set(qdq.node_weights(pre_model))
    shared = emulate.shared_inputs(pre_model, candidates)
    readers = sorted({r for rs in shared.values() for r in rs if r in weighted})
    paths = emulate.module_paths(pre_model, module, readers)
    return {node: [paths[r] for r in rs if r in paths] for node, rs in shared.items()}


def _batch(clips: list[SpeechClip]) -> torch.Tensor:
    frames = min(c.mel.shape[1] for c in clips)
    return torch.from_numpy(np.stack([c.mel[:, :frames] for c in clips]).astype(np.float32))
