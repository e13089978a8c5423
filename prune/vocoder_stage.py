"""What every vocoder pruning stage does after the surgery: write, export, validate, gate, time.

1. save the pruned generator as a torch artifact and rebuild it from disk, exactly as the runtime
   will (from the record's model config, which carries any new inner widths);
2. gate it like any lossy artifact: copy synthesis of held-out recordings, log-mel distance and
   wideband PESQ relative to the FP32 model (`gates.vocoder.fp32`);
3. export it to ONNX with the settings of the build's FP32 export and check parity against the
   pruned PyTorch model on real speech (same float64-referenced SNR as the FP32 export);
4. time torch FP32, torch pruned, ONNX FP32 and ONNX pruned side by side in one process, and
   count FLOPs per second of audio and parameters.
Any failure deletes both files and raises (GateError lists every figure); on success both records
are written: the torch one joins `ctx.records` here, the ONNX one is returned to the build.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from voxport.errors import ConfigError
from voxport.evaluate import inputs, parity, quality
from voxport.export.onnx import OnnxExportConfig, export_graph, ort_runner, tensor_specs, torch_runner
from voxport.models import registry
from voxport.models.checkpoint import sha256_file
from voxport.models.vocoder import HiFiGANGenerator
from voxport.pipeline.passes import StageContext, fail
from voxport.pipeline.records import Record, now_iso, tool_versions, write_record
from voxport.prune.flops import vocoder_flops_per_second

log = logging.getLogger(__name__)


def load_parent(parent: Record, ctx: StageContext) -> HiFiGANGenerator:
    """A fresh module from the parent's torch artifact (vocoder only: its gate is the one we have)."""
    if parent.component != "vocoder" or parent.format != "torch" or parent.precision != "fp32":
        raise ConfigError(f"pruning stages start from the PyTorch FP32 vocoder (parent: torch); got "
                          f"{parent.component} {parent.format} {parent.precision} ({parent.file})")
    return registry.load_torch_artifact(ctx.bundle_dir / parent.file, parent.model)


def target_sparsity(cfg: dict[str, Any], fallback: float) -> float:
    """`sparsity` if set (stage entry or `prune.sparsity=`), else the preset's `default_sparsity`."""
    value = cfg.get("sparsity")
    value = cfg.get("default_sparsity", fallback) if value is None else value
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"prune.sparsity must be a number, got {value!r}") from None


def _export_config(ctx: StageContext) -> OnnxExportConfig:
    try:
        done = ctx.find("vocoder", "vocoder", "onnx", "fp32").config
        return OnnxExportConfig(exporter=str(done["exporter"]), opset=int(done["opset"]))
    except (ConfigError, KeyError):
        return OnnxExportConfig()


def _gate(parent_module: HiFiGANGenerator, pruned_spec: Any, cfg: dict[str, Any], ctx: StageContext,
          parent: Record) -> tuple[dict[str, Any], list[str]]:
    mel_cfg = parent_module.cfg.mel
    seconds, n_clips = float(cfg.get("gate_seconds", 3.0)), int(cfg.get("gate_clips", 0))
    clips = quality.gate_clips(ctx.corpus, mel_cfg, seconds)
    clips = clips[:n_clips] if n_clips > 0 else clips
    key = ("vocoder_gate_baseline", parent.sha256, seconds, tuple(c.id for c in clips))
    run_fp32 = torch_runner(registry.graph_specs(parent_module, parent.model)["vocoder"])
    figures, failures, baseline = quality.vocoder_gate(
        run_fp32, torch_runner(pruned_spec), clips, mel_cfg.sample_rate, ctx.gate("vocoder", "fp32"),
        ctx.cache.get(key))
    ctx.cache[key] = baseline  # the FP32 copy synthesis is the same for every stage of this build
    return figures, failures


def _speed(parent_module: HiFiGANGenerator, parent: Record, pruned_spec: Any, onnx_path: Path,
           cfg: dict[str, Any], ctx: StageContext) -> tuple[dict[str, Any], dict[str, Any]]:
    """Speed of the pruned torch and ONNX artifacts vs PyTorch FP32 and vs their parents, one run."""
    mel_cfg = parent_module.cfg.mel
    clip = inputs.speech_clips(ctx.corpus, mel_cfg, 1, float(cfg.get("timing_seconds", 3.0)))[0]
    feed = {"mel": clip.mel[None].astype(np.float32)}
    seconds = clip.mel.shape[-1] * mel_cfg.hop_length / mel_cfg.sample_rate
    runners = {"torch_fp32": torch_runner(registry.graph_specs(parent_module, parent.model)["vocoder"]),
               "torch_pruned": torch_runner(pruned_spec), "onnx_pruned": ort_runner(onnx_path, ctx.threads)}
    try:
        fp32_onnx = ctx.find("vocoder", "vocoder", "onnx", "fp32")
        runners["onnx_fp32"] = ort_runner(ctx.bundle_dir / fp32_onnx.file, ctx.threads)
    except ConfigError:
        pass  # no FP32 ONNX export in this build: the ONNX artifact is compared with torch only
    t = quality.side_by_side(runners, feed, max(1, int(ctx.timing_repeats)),
                              min_seconds=ctx.timing_min_seconds)

    def figures(name: str, parent_name: str) -> dict[str, Any]:
        out = {**quality.speed_from_timings(t, seconds, name, parent_name), "threads": ctx.threads}
        if parent_name in t:
            out["parent_speedup_vs_torch_fp32"] = out["torch_fp32_median_s"] / out["parent_median_s"]
        return out

    return figures("torch_pruned", "torch_fp32"), figures("onnx_pruned", "onnx_fp32")


def finish_vocoder_stage(parent: Record, pruned: HiFiGANGenerator, cfg: dict[str, Any], ctx: StageContext,
                         stem: str, sparsity: float, details: dict[str, Any]) -> Record:
    """Write, export, validate, gate and time a pruned vocoder; see the module docstring."""
    torch_path, onnx_path = ctx.bundle_dir / f"{stem}.pt", ctx.bundle_dir / f"{stem}.onnx"
    written: list[Path] = [torch_path, onnx_path]
    model = registry.describe("hifigan", pruned.cfg)
    try:
        registry.save_torch_artifact(pruned, torch_path)
        module = registry.load_torch_artifact(torch_path, model)  # as the runtime will rebuild it
        spec = registry.graph_specs(module, model)["vocoder"]
        parent_module = load_parent(parent, ctx)
        counts, base = vocoder_flops_per_second(module), vocoder_flops_per_second(parent_module)
        size = {**counts, "parent_flops_per_audio_second": base["flops_per_audio_second"],
                "parent_params": base["params"],
                "flops_reduction": 1.0 - counts["flops_per_audio_second"] / base["flops_per_audio_second"],
                "params_reduction": 1.0 - counts["params"] / base["params"]}
        # The listener gate first: a refused model is not worth an export.
        quality_figures, failures = _gate(parent_module, spec, cfg, ctx, parent)
        figures = {"pruning": details, "size": size, "quality": quality_figures}
        if failures:
            tuned = "fine-tuned" if details.get("finetune") else "no fine-tune"
            fail(f"{stem} ({details['method']}, sparsity {sparsity:.2f}, {tuned})", failures, figures, written)
        export_graph(spec, onnx_path, _export_config(ctx))
        feeds = inputs.vocoder_feeds(inputs.speech_clips(
            ctx.corpus, module.cfg.mel, int(cfg.get("parity_clips", 2)), float(cfg.get("parity_seconds", 1.0))))
        onnx_parity, parity_failures = parity.vocoder(
            spec, ort_runner(onnx_path, ctx.threads), feeds, {"min_snr_db": float(cfg.get("onnx_min_snr_db", 100.0))})
        if parity_failures:
            fail(f"{stem} (ONNX export of the pruned vocoder)", parity_failures,
                 {**figures, "onnx_parity": onnx_parity},
                 written)
        speed_torch, speed_onnx = _speed(parent_module, parent, spec, onnx_path, cfg, ctx)
        if quality_figures["gate"].get("require_speedup") and speed_torch["speedup_vs_torch_fp32"] <= 1.0:
            fail(stem, [f"not faster than PyTorch FP32 ({speed_torch['speedup_vs_torch_fp32']:.2f}x)"],
                 {**figures, "speed": speed_torch}, written)
    except BaseException:
        for path in written:
            Path(path).unlink(missing_ok=True)
        raise
    config = {**cfg, "pruning": details, "size": size}
    common = dict(component="vocoder", graph="vocoder", precision="fp32", weights=parent.weights, stage="prune",
                  model=model, contract=parent.contract, config=config, sparsity=float(sparsity),
                  quality={**quality_figures, "passed": True}, tools=tool_versions())
    torch_record = Record(format="torch", file=torch_path.name, sha256=sha256_file(torch_path),
                          parent=parent.file, parent_sha256=parent.sha256,
                          speed={**speed_torch, **size}, created=now_iso(), **common)
    ins, outs = tensor_specs(spec)
    onnx_record = Record(format="onnx", file=onnx_path.name, sha256=sha256_file(onnx_path), inputs=ins,
                         outputs=outs, parent=torch_path.name, parent_sha256=torch_record.sha256, parity=onnx_parity,
                         speed={**speed_onnx, **size}, created=now_iso(), **common)
    write_record(torch_record, ctx.bundle_dir)
    write_record(onnx_record, ctx.bundle_dir)
    ctx.records.append(torch_record)  # the build appends the returned (ONNX) record itself
    log.info("%s: FLOPs -%.1f %%, params -%.1f %%, torch %.2fx / ONNX %.2fx PyTorch FP32, log-mel +%.2f dB, "
             "PESQ drop %.2f", stem, 100 * size["flops_reduction"], 100 * size["params_reduction"],
             speed_torch["speedup_vs_torch_fp32"], speed_onnx["speedup_vs_torch_fp32"],
             quality_figures["log_mel_distance_increase_db"], quality_figures["pesq_drop"])
    return onnx_record
