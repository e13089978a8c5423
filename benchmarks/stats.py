"""Timing arithmetic: percentiles, real-time factor, ×real-time, and one row's summary.

RTF = compute seconds / audio seconds (lower is better; < 1 is faster than real time);
×real-time = audio seconds / compute seconds (its inverse, the figure many published tables use).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics.

    Same definition as numpy's default ("linear"): rank = q/100 · (n − 1).
    """
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in 0..100, got {q}")
    ordered = sorted(values)
    rank = q / 100.0 * (len(ordered) - 1)
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def rtf(compute_s: float, audio_s: float | None) -> float | None:
    """Real-time factor: compute seconds per second of audio (None when there is no audio)."""
    return compute_s / audio_s if audio_s else None


def x_realtime(compute_s: float, audio_s: float | None) -> float | None:
    """Seconds of audio per compute second (None when there is no audio or no time)."""
    return audio_s / compute_s if audio_s and compute_s > 0 else None


def summarize(times_s: Sequence[float], audio_s: float | None) -> dict[str, Any]:
    """median, p95, min, max, mean of the timed runs, and RTF / ×real-time of the median."""
    median = percentile(times_s, 50.0)
    p95 = percentile(times_s, 95.0)
    return {
        "runs": len(times_s), "median_s": median, "p95_s": p95, "min_s": min(times_s),
        "max_s": max(times_s), "mean_s": sum(times_s) / len(times_s),
        "rtf": rtf(median, audio_s), "rtf_p95": rtf(p95, audio_s), "x_realtime": x_realtime(median, audio_s),
    }


def speed_ratio(reference_s: float | None, row_s: float | None) -> float | None:
    """How many times faster a row is than the reference (> 1 = faster), None if either is missing."""
    if not reference_s or not row_s:
        return None
    return reference_s / row_s
