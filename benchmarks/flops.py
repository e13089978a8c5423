"""Vocoder FLOPs per mel frame, counted from the model a record describes.

Counting reuses `voxport.prune.flops.count_macs` (forward hooks on every Conv1d /
ConvTranspose1d: 2 FLOPs per multiply-accumulate, biases and activations left out) on an
untrained module rebuilt from the record's `model` config: FLOPs depend on shapes, not weights.
HiFi-GAN's work is exactly linear in the number of frames ("same" padding everywhere), so one
short pass gives FLOPs per frame. Structured pruning shrinks `resblock_inner_channels` in that
config and therefore the count; unstructured sparsity leaves dense kernels and the count as is.
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from typing import Any

log = logging.getLogger(__name__)

_FRAMES = 16  # long enough that no layer is an edge case; the count is linear in frames


def vocoder_flops_per_frame(model: dict[str, Any]) -> float | None:
    """FP32 FLOPs the generator performs per input mel frame (None if it cannot be counted here)."""
    return _count(json.dumps(model, sort_keys=True))


@lru_cache(maxsize=8)
def _count(model_json: str) -> float | None:
    try:
        from voxport.prune.flops import count_macs
    except ImportError:
        log.warning("voxport.prune.flops is not installed: vocoder FLOP/s figures are left out")
        return None
    import torch

    from voxport.models import registry

    model = json.loads(model_json)
    module = registry.build_module(model)
    mel = torch.zeros(1, module.cfg.num_mels, _FRAMES)
    return count_macs(module, (mel,)).flops / _FRAMES


def achieved(flops_per_frame: float | None, frames: int, seconds: float, peak_flops: float,
             cores: int, threads: int) -> dict[str, float | None]:
    """Achieved FLOP/s of one timed row, as a fraction of the host's peak and of the threads' share."""
    if not flops_per_frame or seconds <= 0:
        return {"flops": None, "flops_per_s": None, "peak_fraction": None, "peak_fraction_threads": None}
    rate = flops_per_frame * frames / seconds
    share = peak_flops * min(threads, cores) / cores if cores else 0.0
    return {"flops": flops_per_frame * frames, "flops_per_s": rate,
            "peak_fraction": rate / peak_flops if peak_flops else None,
            "peak_fraction_threads": rate / share if share else None}
