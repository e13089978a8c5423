"""Speed, measured side by side in one process: interleaved rounds, rotated order, medians.

Every speed figure a record carries comes from here, so the build's ratios (which artifact
selection ranks by) are measured the same way for every artifact.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from voxport.runtime.backends.base import Runner


def side_by_side(runners: Mapping[str, Runner], feed: Mapping[str, np.ndarray], repeats: int = 5,
                 warmup: int = 1, min_seconds: float = 0.0, max_repeats: int = 200) -> dict[str, dict[str, float]]:
    """Interleaved timed runs (round-robin, so drift and noise hit every runner alike).

    The order rotates every round: an engine leaves work behind it (PyTorch's OpenMP workers keep
    spinning for a while after a call), which would always slow whichever runner comes next.
    At least `repeats` rounds, and more for short workloads (a speaker-encoder call takes
    milliseconds) until the slowest runner has been timed for about `min_seconds`: a median of five
    millisecond runs on a shared host is mostly scheduler noise.
    """
    slowest = 0.0
    for run in runners.values():
        for _ in range(warmup):
            start = time.perf_counter()
            run(feed)
            slowest = max(slowest, time.perf_counter() - start)
    rounds = max(repeats, min(max_repeats, math.ceil(min_seconds / slowest) if slowest > 0 else repeats))
    times: dict[str, list[float]] = {name: [] for name in runners}
    order = list(runners.items())
    for i in range(rounds):
        for name, run in order[i % len(order):] + order[: i % len(order)]:
            start = time.perf_counter()
            run(feed)
            times[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "runs": len(t)}
            for name, t in times.items()}


def speed_from_timings(t: Mapping[str, Mapping[str, float]], audio_seconds: float, artifact: str,
                       parent: str | None = None, reference: str = "torch_fp32") -> dict[str, Any]:
    """The speed figures of runner `artifact` in a `side_by_side` table: medians, RTF and its ratio
    to the PyTorch FP32 `reference` (and to `parent`, when that was timed too)."""
    med, ref = t[artifact]["median_s"], t[reference]["median_s"]
    figures = {
        "audio_seconds": audio_seconds,
        "median_s": med,
        "torch_fp32_median_s": ref,
        "speedup_vs_torch_fp32": ref / med,
        "rtf": med / audio_seconds if audio_seconds else None,
        "repeats": t[artifact]["runs"],
    }
    if parent is not None and parent in t:
        figures["parent_median_s"] = t[parent]["median_s"]
        figures["speedup_vs_parent"] = t[parent]["median_s"] / med
    return figures
