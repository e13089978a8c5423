"""Compare an artifact's outputs with its PyTorch original, output by output.

As Optimum's validate(): same named inputs to both, check output names, then shapes, then
values; one log line per output; collect every failure, then raise one named error.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from voxport.errors import ParityError
from voxport.evaluate import metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tolerance:
    """Per-output acceptance: every given bound must hold (None = not checked)."""

    min_snr_db: float | None = None
    min_cosine: float | None = None
    max_abs: float | None = None


def compare(
    reference: Mapping[str, np.ndarray],
    test: Mapping[str, np.ndarray],
    tolerances: Mapping[str, Tolerance],
    label: str = "",
) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Figures per output (max_abs, snr_db, cosine) and the list of failed checks."""
    figures: dict[str, dict[str, float]] = {}
    failures: list[str] = []
    missing = sorted(set(reference) - set(test))
    if missing:
        failures.append(f"{label}outputs missing from the artifact: {missing}")
    for name in sorted(set(reference) & set(test)):
        ref, out = np.asarray(reference[name]), np.asarray(test[name])
        if ref.shape != out.shape:
            failures.append(f"{label}{name}: shape {out.shape} != reference {ref.shape}")
            continue
        ref64, out64 = ref.astype(np.float64), out.astype(np.float64)
        fig = {
            "max_abs": metrics.max_abs_diff(ref64, out64),
            "snr_db": metrics.snr_db(ref64, out64),
            "cosine": metrics.cosine(ref64, out64),
        }
        figures[name] = fig
        tol = tolerances.get(name, Tolerance())
        if tol.min_snr_db is not None and fig["snr_db"] < tol.min_snr_db:
            failures.append(f"{label}{name}: SNR {fig['snr_db']:.1f} dB < {tol.min_snr_db} dB")
        if tol.min_cosine is not None and fig["cosine"] < tol.min_cosine:
            failures.append(f"{label}{name}: cosine {fig['cosine']:.7f} < {tol.min_cosine}")
        if tol.max_abs is not None and fig["max_abs"] > tol.max_abs:
            failures.append(f"{label}{name}: max abs diff {fig['max_abs']:.3g} > {tol.max_abs}")
        log.info(
            "%s%s: max_abs=%.3g snr=%.1f dB cos=%.7f",
            label, name, fig["max_abs"], fig["snr_db"], fig["cosine"],
        )
    return figures, failures


def worst(figures_per_input: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Worst case over several inputs: max of max_abs, min of snr and cosine, per output."""
    out: dict[str, dict[str, float]] = {}
    for figures in figures_per_input:
        for name, fig in figures.items():
            agg = out.setdefault(name, {"max_abs": 0.0, "snr_db": float("inf"), "cosine": 1.0})
            agg["max_abs"] = max(agg["max_abs"], fig["max_abs"])
            agg["snr_db"] = min(agg["snr_db"], fig["snr_db"])
            agg["cosine"] = min(agg["cosine"], fig["cosine"])
    return out


def raise_if_failed(artifact: str, failures: list[str], figures: dict) -> None:
    if failures:
        raise ParityError(artifact, failures, figures)
