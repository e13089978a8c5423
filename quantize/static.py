"""Stage `quantize_static`: ONNX Runtime static INT8 (QDQ) of the vocoder, calibrated on real speech.

Naive all-conv INT8 of the real HiFi-GAN is audibly broken (copy synthesis log-mel distance
9.5 dB vs 2.9 for FP32, PESQ 1.7 vs 2.8), so the layers to quantize are searched
(quantize/search.py) against the listener-side gate; ConvTranspose (no integer kernel) and the
output layer stay float by default. The artifact must hold integer kernels in the graph ONNX
Runtime actually runs, pass the gate on HELD-OUT wideband recordings relative to FP32, and, with
`require_speedup`, be faster than its FP32 parent, measured side by side in this process.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from voxport.errors import ConfigError
from voxport.evaluate import metrics, quality
from voxport.evaluate.inputs import SpeechClip, speech_clips
from voxport.export.onnx import ort_runner, torch_runner
from voxport.models import audio, registry
from voxport.models.checkpoint import sha256_file
from voxport.pipeline.passes import StageContext, artifact_name, fail, register
from voxport.pipeline.records import Record, now_iso, tool_versions, write_record
from voxport.quantize import emulate, qdq, search
from voxport.quantize.config import QuantizeConfig

log = logging.getLogger(__name__)

PRECISION = "int8-static"
# ONNX Runtime graph optimization levels the artifact is timed under (see measure_speed).
SESSION_LEVELS = ("all", "extended")


@register("quantize_static")
def run(parent: Record, cfg: Mapping[str, Any], ctx: StageContext) -> Record:
    qc = QuantizeConfig.from_cfg(cfg)
    if parent.format != "onnx" or parent.component != "vocoder":
        raise ConfigError(f"quantize_static quantizes the vocoder's ONNX graph; got {parent.format} {parent.key}")
    gate = ctx.gate(parent.component, PRECISION)
    # The network the parent ONNX was exported from: the PyTorch original, or a model an earlier
    # stage made (a pruned vocoder), whose layers the search must rank.
    origin = torch_origin(parent, ctx)
    module = registry.load_torch_artifact(ctx.bundle_dir / origin.file, origin.model)
    spec = registry.graph_specs(module, origin.model)[parent.graph]
    source = ctx.source(parent.component)
    reference_spec = spec if origin is source else registry.graph_specs(
        registry.load_torch_artifact(ctx.bundle_dir / source.file, source.model), source.model)[parent.graph]
    mel_cfg, rate = module.cfg.mel, module.cfg.mel.sample_rate
    parent_path = ctx.bundle_dir / parent.file
    out = ctx.bundle_dir / artifact_name(parent.file, "int8_static")
    run_fp32 = ort_runner(parent_path, ctx.threads)
    # Quality is always judged against the ORIGINAL FP32 model, so losses of chained stages add up
    # inside one gate instead of each stage spending the whole budget again.
    original = original_export(ctx, parent)
    run_original = run_fp32 if original is parent else ort_runner(ctx.bundle_dir / original.file, ctx.threads)
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="voxport-int8-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        pre = qdq.preprocess(parent_path, work / "pre.onnx")
        pre_model = qdq.load_graph(pre)
        candidates, kept = qdq.candidate_nodes(pre_model, qc)
        if not candidates:
            raise ConfigError(f"{parent.file}: no {'/'.join(qc.op_types)} node left to quantize after exclusions")
        feeds, calib_ids = calibration_feeds(ctx, mel_cfg, qc)
        cache = work / "ranges.json"
        # Quantizing every candidate once both calibrates (ranges cached for every later variant)
        # and gives the exact scales ORT chose, which the ranking emulates.
        every = qdq.quantize(pre, work / "all.onnx", qc, candidates, cache, feeds)
        timings["calibration_s"] = time.perf_counter() - t0
        result = _mixed_precision(qc, pre, pre_model, every, cache, candidates, spec, run_original, ctx, gate, work)
        timings["search_s"] = result.seconds
        if not result.quantized:
            fail(out.name, ["no layer can be quantized within the gate on calibration clips"],
                 {"search": result.describe("log-mel distance vs FP32 (dB)"), "float_nodes": kept}, [])
        if sorted(result.quantized) == sorted(candidates):
            shutil.copyfile(every, work / "final.onnx")
            os.replace(work / "final.onnx", out)
        else:
            qdq.quantize(pre, out, qc, result.quantized, cache)
    written = [out]
    try:
        for node in qdq.left_float(out, result.quantized):  # never claim INT8 for a float layer
            result.quantized.remove(node)
            result.float_nodes[node] = "ONNX Runtime's quantizer left it float"
        ops = qdq.integer_summary(out)
        run_q = ort_runner(out, ctx.threads)
        clips = quality.gate_clips(ctx.corpus, mel_cfg, qc.gate_seconds)
        baseline = vocoder_baseline(ctx, original, run_original, clips, rate)
        figures, failures, _ = quality.vocoder_gate(run_original, run_q, clips, rate, gate, baseline)
        if qdq.integer_op_total(ops["runtime"]) == 0:
            failures.append(f"INT8 silently stayed float: ONNX Runtime runs no integer kernel "
                            f"(file ops {ops['file']}, runtime ops {ops['runtime']})")
        speed: dict[str, Any] = {"measured": False, "why": "quality gate failed"}
        if not failures:
            speed = measure_speed(reference_spec, run_fp32, out, ctx, mel_cfg, qc.timing_seconds)
            if gate.get("require_speedup") and speed["speedup_vs_parent"] <= 1.0:
                failures.append(f"not faster than its parent: {speed['speedup_vs_parent']:.2f}x "
                                f"{parent.file} (gate require_speedup)")
        float_nodes = {**kept, **result.float_nodes}
        parity = {
            "reference": f"ONNX Runtime FP32 {original.file} on the held-out gate clips",
            "wav_snr_db_vs_fp32_min": figures["wav_snr_db_vs_fp32_min"],
            "mr_stft_distance_vs_fp32_max": figures["mr_stft_distance_vs_fp32_max"],
            "integer_ops": ops, "quantized_nodes": sorted(result.quantized), "float_nodes": float_nodes,
            "search": result.describe("log-mel distance vs FP32 output, one layer quantized (dB)"),
            "timings_s": {k: round(v, 1) for k, v in timings.items()},
        }
        if failures:
            fail(out.name, failures, {"quality": figures, "speed": speed, "integer_ops": ops,
                                      "quantized": len(result.quantized), "float_nodes": len(float_nodes),
                                      "search": parity["search"]}, written)
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    log.info("%s: %d layers INT8, %d float; log-mel +%.2f dB, PESQ drop %.2f; %.2fx PyTorch FP32 "
             "(ORT FP32 %.2fx)", out.name, len(result.quantized), len(float_nodes),
             figures["log_mel_distance_increase_db"], figures["pesq_drop"], speed["speedup_vs_torch_fp32"],
             speed["ort_fp32_speedup_vs_torch_fp32"])
    record = Record(
        component=parent.component, graph=parent.graph, format="onnx", precision=PRECISION, file=out.name,
        sha256=sha256_file(out), weights=parent.weights, stage="quantize-static", inputs=parent.inputs,
        outputs=parent.outputs, parent=parent.file, parent_sha256=parent.sha256, model=parent.model,
        contract=parent.contract, config={**qc.to_dict(), "calibration_items": calib_ids},
        parity=parity, quality={**figures, "passed": True}, speed=speed, tools=tool_versions(),
        created=now_iso(),
    )
    write_record(record, ctx.bundle_dir)
    return record


def torch_origin(parent: Record, ctx: StageContext) -> Record:
    """The PyTorch record `parent` was exported from (its `parent` field), else the original."""
    for r in ctx.records:
        if r.format == "torch" and r.file == parent.parent and r.component == parent.component:
            return r
    return ctx.source(parent.component)


def original_export(ctx: StageContext, parent: Record) -> Record:
    """The FP32 ONNX export of the PyTorch original for `parent`'s graph (the oldest such record)."""
    for r in ctx.records:
        if (r.component, r.graph, r.format, r.precision, r.stage) == (parent.component, parent.graph, "onnx",
                                                                      "fp32", "export"):
            return r
    return parent


def _mixed_precision(qc: QuantizeConfig, pre: Path, pre_model: Any, every: Path, cache: Path,
                     candidates: list[str], spec: Any, run_fp32: Any, ctx: StageContext,
                     gate: Mapping[str, Any], work: Path) -> search.SearchResult:
    mel_cfg = spec.module.generator.cfg.mel
    rate = mel_cfg.sample_rate
    macs: dict[str, float] = {}

    def ranking() -> list[tuple[str, float]]:
        t0 = time.perf_counter()
        layers = emulate.qlayers(qdq.load_graph(every))
        paths = emulate.module_paths(pre_model, spec.module, candidates)
        batch = _batch(quality.gate_clips(ctx.corpus, mel_cfg, qc.rank_seconds, split="calib")[: qc.rank_clips])

        def distance(ref: np.ndarray, out: np.ndarray) -> float:
            return float(np.mean([metrics.log_mel_distance_db(a.ravel(), b.ravel(), rate)
                                  for a, b in zip(ref, out, strict=True)]))

        errors, layer_macs = emulate.layer_errors(spec.module, layers, paths, [batch], distance,
                                                  _sibling_paths(pre_model, spec.module, candidates))
        macs.update(layer_macs)
        ranked = search.rank(errors, macs, qc.rank_by)
        log.info("ranked %d layers in %.1f s (emulated; most tolerant %s, least %s)", len(ranked),
                 time.perf_counter() - t0, ranked[0][0], ranked[-1][0])
        return ranked

    clips = quality.gate_clips(ctx.corpus, mel_cfg, qc.search_seconds, split="calib")[: qc.search_clips]
    baseline = quality.copy_synthesis_quality(run_fp32, clips, rate) if qc.search != "none" else {}
    search_gate = {**gate, "max_log_mel_increase_db": gate["max_log_mel_increase_db"] * qc.search_margin,
                   "max_pesq_drop": gate["max_pesq_drop"] * qc.search_margin}

    def evaluate(nodes: list[str]) -> search.Trial:
        path = every if len(nodes) == len(candidates) else qdq.quantize(pre, work / "trial.onnx", qc, nodes, cache)
        figures, failures, _ = quality.vocoder_gate(run_fp32, ort_runner(path, ctx.threads), clips, rate,
                                                    search_gate, baseline)
        return search.Trial(tuple(nodes), {k: v for k, v in figures.items() if k != "gate"}, failures)

    result = search.search(candidates, ranking, evaluate, qc.search, qc.search_max_trials)
    result.macs = macs
    return result


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


def calibration_feeds(ctx: StageContext, mel_cfg: audio.MelConfig, qc: QuantizeConfig,
                      ) -> tuple[list[dict[str, np.ndarray]], list[str]]:
    """`calibration_clips` real clips of the calib split, every one cropped to the same number of
    frames (ORT's histogram calibrators fail on ragged inputs). Wideband recordings come first:
    most of the corpus is 8 kHz telephone speech, whose empty upper bands would under-state the
    activation ranges that held-out wideband speech reaches."""
    frames = int(qc.crop_seconds * mel_cfg.sample_rate) // mel_cfg.hop_length
    pool = [*quality.gate_clips(ctx.corpus, mel_cfg, qc.crop_seconds, split="calib"),
            *speech_clips(ctx.corpus, mel_cfg, 4 * qc.calibration_clips, qc.crop_seconds, split="calib")]
    picked: dict[str, SpeechClip] = {}
    for clip in pool:
        if clip.id not in picked and clip.mel.shape[1] >= frames and len(picked) < qc.calibration_clips:
            picked[clip.id] = clip
    if not picked:
        raise ConfigError(f"no calibration clip of the calib split lasts quantize.crop_seconds={qc.crop_seconds}")
    return [{"mel": c.mel[None, :, :frames].astype(np.float32)} for c in picked.values()], list(picked)


def vocoder_baseline(ctx: StageContext, parent: Record, run_fp32: Any, clips: list[SpeechClip], rate: int,
                     ) -> dict[str, Any]:
    """FP32 copy-synthesis quality on the gate clips, computed once per build and parent."""
    key = f"vocoder-baseline:{parent.sha256}:{','.join(c.id for c in clips)}"
    if key not in ctx.cache:
        ctx.cache[key] = quality.copy_synthesis_quality(run_fp32, clips, rate)
    return ctx.cache[key]


def timing_feed(ctx: StageContext, mel_cfg: audio.MelConfig, seconds: float) -> tuple[dict[str, np.ndarray], float]:
    """The mel of `seconds` of one real held-out recording (the longest-enough real one)."""
    items = sorted(ctx.corpus.items(split="eval"),
                   key=lambda i: (i.source == "espeak-ng", i.duration_s < seconds, i.id))
    wav = ctx.corpus.audio(items[0], mel_cfg.sample_rate)[: int(seconds * mel_cfg.sample_rate)]
    wav = wav[: len(wav) // mel_cfg.hop_length * mel_cfg.hop_length]
    return {"mel": audio.mel_spectrogram(wav, mel_cfg)[None].astype(np.float32)}, len(wav) / mel_cfg.sample_rate


def measure_speed(spec: Any, run_fp32: Any, artifact: Path, ctx: StageContext, mel_cfg: audio.MelConfig,
                  seconds: float) -> dict[str, Any]:
    """Artifact vs PyTorch FP32 vs its ORT FP32 parent, interleaved in this process.

    The artifact is timed under ONNX Runtime's `all` and `extended` graph optimizations, and the
    faster one is recorded in `speed.session` for the runtime to use. `all` adds the NHWC layout
    transform, which inserts transposes around the float residual adds: on an AVX2 host without
    VNNI it made INT8 HiFi-GAN 10 % slower in one run (1.19 s vs 1.08 s for 3 s of audio) and 2 %
    faster in another, and hosts with other integer kernels differ again. So it is measured here,
    on the host that builds, rather than assumed.
    """
    feed, audio_s = timing_feed(ctx, mel_cfg, seconds)
    runners = {"torch_fp32": torch_runner(spec), "parent": run_fp32,
               **{f"artifact:{level}": ort_runner(artifact, ctx.threads, level) for level in SESSION_LEVELS}}
    t = quality.side_by_side(runners, feed, ctx.timing_repeats, min_seconds=ctx.timing_min_seconds)
    level = min(SESSION_LEVELS, key=lambda lv: t[f"artifact:{lv}"]["median_s"])
    speed = quality.speed_from_timings(t, audio_s, f"artifact:{level}", "parent")
    return {**speed, "ort_fp32_speedup_vs_torch_fp32": speed["torch_fp32_median_s"] / speed["parent_median_s"],
            "session": {"graph_optimization_level": level,
                        "medians_s": {lv: t[f"artifact:{lv}"]["median_s"] for lv in SESSION_LEVELS}},
            "measured": True}
