"""Pass `bf16`: a bfloat16 PyTorch artifact, offered only where the CPU computes bfloat16 natively.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from voxport.errors import ConfigError, StageSkipped
from voxport.models import registry
from voxport.pipeline.passes import Candidate, PassContext, artifact_name
from voxport.pipeline.records import Record

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


@dataclass(frozen=True)
class Bf16Config:
    graph: str = ""


CONFIG = Bf16Config


def transform(parent: Record, config: Bf16Config, ctx: PassContext) -> Candidate:
    native, why = native_bf16()
    if not native:
        raise StageSkipped(f"bf16 {parent.key}: {why}")
    if parent.format != "torch" or parent.graph == "*":
        raise ConfigError(f"bf16 is offered for single-graph PyTorch models (parent: torch), got {parent.format} "
                          f"{parent.key}")
    fp32 = registry.load_torch_artifact(ctx.bundle_dir / parent.file, parent.model)
    out = ctx.bundle_dir / artifact_name(parent.file, "bf16")
    registry.save_torch_artifact(copy.deepcopy(fp32).to(torch.bfloat16), out)
    draft = Record(
        component=parent.component, graph=parent.graph, format="torch", precision=PRECISION, file=out.name,
        sha256="", weights=parent.weights, stage="bf16", parent=parent.file, parent_sha256=parent.sha256,
        model={**parent.model, "dtype": "bfloat16"}, contract=parent.contract, config={"host": why})
    return Candidate([draft])
