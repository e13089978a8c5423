"""What every pruning pass does after the surgery: save the smaller model and describe it.

The pruned generator is saved as a torch artifact with the model config that rebuilds it (any new
inner widths included), and its FLOPs per second of audio and parameters are counted against its
parent's. Judging (the listener gate, `gates.<component>.fp32`) and timing are the engine's; the
ONNX export of the pruned model is the `onnx_export` pass that follows it in the preset.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from voxport.errors import ConfigError
from voxport.models import registry
from voxport.pipeline.passes import Candidate, PassContext
from voxport.pipeline.records import Record
from voxport.prune.config import PruneConfig
from voxport.prune.flops import vocoder_flops_per_second


def load_parent(parent: Record, ctx: PassContext) -> nn.Module:
    """A fresh module from the parent's torch artifact (the parent file is never touched)."""
    if parent.format != "torch" or parent.precision != "fp32":
        raise ConfigError(f"pruning passes start from a PyTorch FP32 model (parent: torch); got "
                          f"{parent.component} {parent.format} {parent.precision} ({parent.file})")
    return registry.load_torch_artifact(ctx.bundle_dir / parent.file, parent.model)


def pruned_candidate(parent: Record, parent_module: nn.Module, pruned: nn.Module, config: PruneConfig,
                     ctx: PassContext, stem: str, sparsity: float, details: dict[str, Any]) -> Candidate:
    path = ctx.bundle_dir / f"{stem}.pt"
    model = registry.describe(parent.model["network"], pruned.cfg)
    registry.save_torch_artifact(pruned, path)
    try:
        counts, base = vocoder_flops_per_second(pruned), vocoder_flops_per_second(parent_module)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    size = {**counts, "parent_flops_per_audio_second": base["flops_per_audio_second"], "parent_params": base["params"],
            "flops_reduction": 1.0 - counts["flops_per_audio_second"] / base["flops_per_audio_second"],
            "params_reduction": 1.0 - counts["params"] / base["params"]}
    draft = Record(
        component=parent.component, graph=parent.graph if parent.graph != "*" else config.graph, format="torch",
        precision="fp32", file=path.name, sha256="", weights=parent.weights, stage="prune", parent=parent.file,
        parent_sha256=parent.sha256, model=model, contract=parent.contract,
        config={**config.to_dict(), "pruning": details, "size": size,
                "sidecars": [details[k]["curve_png"] for k in ("distill", "finetune") if details.get(k)]},
        sparsity=float(sparsity), speed=size)
    tuned = ", ".join(f"{name}{' (TIME CAP HIT)' if details[key].get('time_cap_hit') else ''}"
                      for key, name in (("distill", "distilled"), ("finetune", "fine-tuned")) if details.get(key))
    tuned = tuned or "no fine-tune"
    return Candidate([draft], {"label": f"{stem} ({details['method']}, sparsity {sparsity:.2f}, {tuned})",
                               "pruning": details, "size": size})
