"""L1 magnitude pruning, unstructured: zero the smallest weights, globally or per layer.

The artifact stays a plain dense state_dict with zeros in it (weight norm is already folded into
`weight` by the model loaders, so magnitudes are those of the weights that actually run).
Unstructured sparsity makes a model more compressible, never faster on dense kernels: PyTorch,
ONNX Runtime and TensorRT run the zeros like any other number (pytorch/pytorch#36214), so the
record's FLOPs stay those of the parent. That is why this is a compression experiment and the
structured stage is the one that buys speed. Without fine-tuning, HiFi-GAN fails the listener
gate long before 90 % (see the stage's gate), which the stage reports instead of writing.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from voxport.errors import ConfigError
from voxport.pipeline.passes import Candidate, PassContext
from voxport.pipeline.records import Record
from voxport.prune.common import load_parent, pruned_candidate
from voxport.prune.config import PruneConfig

log = logging.getLogger(__name__)

SCOPES = ("global", "layer")
_PRUNABLE = (nn.Conv1d, nn.ConvTranspose1d, nn.Linear, nn.LSTM)


def prunable_weights(module: nn.Module, exclude: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Weight matrices of Conv1d / ConvTranspose1d / Linear / LSTM layers by state_dict name.

    Biases stay: they are few and carry the operating point. `exclude` drops layers whose name
    starts with one of its prefixes (e.g. "conv_post" to keep the output layer dense).
    """
    out: dict[str, torch.Tensor] = {}
    for name, layer in module.named_modules():
        if not isinstance(layer, _PRUNABLE) or any(name.startswith(p) for p in exclude if p):
            continue
        for pname, param in layer.named_parameters(recurse=False):
            if pname == "weight" or pname.startswith("weight_"):
                out[f"{name}.{pname}"] = param
    return out


def weight_sparsity(module: nn.Module, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """Fraction of exact zeros over the prunable weights, overall and per tensor."""
    weights = prunable_weights(module, exclude)
    zeros = {name: int((w == 0).sum()) for name, w in weights.items()}
    total = sum(w.numel() for w in weights.values())
    return {"sparsity": sum(zeros.values()) / total if total else 0.0, "prunable_weights": total,
            "per_layer": {name: zeros[name] / w.numel() for name, w in weights.items()}}


def magnitude_prune(module: nn.Module, sparsity: float, scope: str = "global",
                    exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """Zero the `sparsity` fraction of smallest-|w| prunable weights of `module`, IN PLACE.

    global: one ranking over all prunable weights (layers with small weights lose more);
    layer:  every tensor loses the same fraction. Exactly round(sparsity * n) weights are zeroed
    per ranking (ties are broken by position), so the target is hit to one weight.
    Returns `weight_sparsity` of the result.
    """
    if scope not in SCOPES:
        raise ConfigError(f"prune.scope must be one of {SCOPES}, got '{scope}'")
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"prune.sparsity must be in [0, 1), got {sparsity}")
    weights = prunable_weights(module, exclude)
    if not weights:
        raise ConfigError(f"{type(module).__name__} has no prunable Conv/Linear/LSTM weights")
    with torch.no_grad():
        if scope == "layer":
            for w in weights.values():
                _zero_smallest(w.view(-1), round(sparsity * w.numel()))
        else:
            flat = torch.cat([w.detach().reshape(-1).abs() for w in weights.values()])
            mask = torch.ones_like(flat, dtype=torch.bool)
            mask[torch.argsort(flat, stable=True)[: round(sparsity * flat.numel())]] = False
            offset = 0
            for w in weights.values():
                n = w.numel()
                w.mul_(mask[offset : offset + n].view_as(w))
                offset += n
    return weight_sparsity(module, exclude)


def _zero_smallest(w: torch.Tensor, k: int) -> None:
    if k > 0:
        w[torch.argsort(w.abs(), stable=True)[:k]] = 0.0


CONFIG = PruneConfig


def transform(parent: Record, config: PruneConfig, ctx: PassContext) -> Candidate:
    """Unstructured L1 pruning of a PyTorch FP32 model to `sparsity` (default 0.3)."""
    sparsity = config.target(0.3)
    parent_module = load_parent(parent, ctx)
    module = load_parent(parent, ctx)  # a fresh copy to prune
    stats = magnitude_prune(module, sparsity, config.scope, config.exclude)
    log.info("%s: %.1f %% of %d prunable weights are zero (%s)", parent.component, 100 * stats["sparsity"],
             stats["prunable_weights"], config.scope)
    details = {"method": "l1_unstructured", "scope": config.scope, "target_sparsity": sparsity,
               "achieved_sparsity": stats["sparsity"], "prunable_weights": stats["prunable_weights"],
               "exclude": list(config.exclude)}
    stem = f"{parent.component}_pruned_l1_unstructured_{round(100 * sparsity)}"
    return pruned_candidate(parent, parent_module, module, config, ctx, stem, stats["sparsity"], details)
