"""Stage `bf16`: a bfloat16 PyTorch artifact, offered only where the CPU computes bfloat16 natively.

Measured on an AVX512-BF16 host, bfloat16 HiFi-GAN was 1.8x faster than FP32 and inaudible
(log-mel 3.0 vs 2.9 dB, PESQ unchanged), although its waveform SNR vs FP32 is only 20-25 dB.
Without avx512_bf16 / AMX, oneDNN emulates bfloat16 and the artifact would be slower than FP32,
so on such a host the stage is SKIPPED (StageSkipped, logged and listed in the manifest), not
failed: nothing is wrong with the build, the host just cannot profit.

The artifact is the state dict in bfloat16 (half the size); the record's `model.dtype` makes
`models/registry.load_torch_artifact` rebuild the module in bfloat16 with float32 inputs and
outputs at its boundary, so every caller keeps the float32 contract.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from voxport.errors import ConfigError, StageSkipped
from voxport.evaluate import quality
from voxport.export.onnx import torch_runner
from voxport.models import registry
from voxport.models.checkpoint import sha256_file
from voxport.pipeline.passes import StageContext, artifact_name, fail, register
from voxport.pipeline.records import Record, now_iso, tool_versions, write_record

log = logging.getLogger(__name__)

PRECISION = "bf16"
NATIVE_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def native_bf16() -> tuple[bool, str]:
    """(native, why): oneDNN's own verdict and the CPU flags that make bfloat16 fast."""
    flags = sorted(cpu_flags() & set(NATIVE_FLAGS))
    onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if flags and onednn:
        return True, f"CPU flags {', '.join(flags)}; oneDNN bfloat16 supported"
    return False, (f"this CPU has none of {', '.join(NATIVE_FLAGS)} (oneDNN bfloat16 supported: {onednn}); "
                   "bfloat16 would be emulated and slower than FP32")


def _to_bf16(x: Any) -> Any:
    return x.to(torch.bfloat16) if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def _to_f32(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.float() if x.is_floating_point() else x
    if isinstance(x, tuple):
        return tuple(_to_f32(v) for v in x)
    return x


def to_bf16(module: torch.nn.Module) -> torch.nn.Module:
    """The module in bfloat16, taking and returning float32 (boundary casts in hooks)."""
    module = module.to(torch.bfloat16).eval()
    module.register_forward_pre_hook(lambda m, args: tuple(_to_bf16(a) for a in args))
    module.register_forward_hook(lambda m, args, out: _to_f32(out))
    return module


@register("bf16")
def run(parent: Record, cfg: Mapping[str, Any], ctx: StageContext) -> Record:
    native, why = native_bf16()
    if not native:
        raise StageSkipped(f"bf16 {parent.key}: {why}")
    if parent.format != "torch" or parent.component != "vocoder":
        raise ConfigError(f"bf16 is offered for the PyTorch vocoder (parent: torch), got {parent.format} {parent.key}")
    gate = ctx.gate(parent.component, PRECISION)
    fp32 = registry.load_torch_artifact(ctx.bundle_dir / parent.file, parent.model)
    model = {**parent.model, "dtype": "bfloat16"}
    out = ctx.bundle_dir / artifact_name(parent.file, "bf16")
    registry.save_torch_artifact(copy.deepcopy(fp32).to(torch.bfloat16), out)
    try:
        run_ref = torch_runner(registry.graph_specs(fp32, parent.model)["vocoder"])
        module = registry.load_torch_artifact(out, model)
        spec = registry.graph_specs(module, model)["vocoder"]
        run_test = torch_runner(spec)
        mel_cfg = fp32.cfg.mel
        clips = quality.gate_clips(ctx.corpus, mel_cfg, 3.0)
        figures, failures, _ = quality.vocoder_gate(run_ref, run_test, clips, mel_cfg.sample_rate, gate)
        from voxport.quantize.static import timing_feed

        feed, audio_s = timing_feed(ctx, mel_cfg, float(cfg.get("timing_seconds", 3.0)))
        speed = quality.speed_figures(run_ref, None, run_test, feed, audio_s, ctx.timing_repeats,
                                      ctx.timing_min_seconds)
        if gate.get("require_speedup") and speed["speedup_vs_torch_fp32"] <= 1.0:
            failures.append(f"not faster than PyTorch FP32: {speed['speedup_vs_torch_fp32']:.2f}x")
        if failures:
            fail(out.name, failures, {"quality": figures, "speed": speed}, [out])
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    record = Record(
        component=parent.component, graph=parent.graph, format="torch", precision=PRECISION, file=out.name,
        sha256=sha256_file(out), weights=parent.weights, stage="bf16", parent=parent.file,
        parent_sha256=parent.sha256, model=model, contract=parent.contract, config={**dict(cfg), "host": why},
        parity={"wav_snr_db_vs_fp32_min": figures["wav_snr_db_vs_fp32_min"]},
        quality={**figures, "passed": True}, speed={**speed, "measured": True}, tools=tool_versions(),
        created=now_iso(),
    )
    write_record(record, ctx.bundle_dir)
    return record
