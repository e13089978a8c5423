"""The CI regression check: this run's rows against a baseline run's, by row id.

A row regresses when its median time exceeds the baseline's by more than `max_ratio`
(e.g. 1.25 = 25 % slower). Rows only in the baseline are reported as missing (an artifact left
the bundle, or the host cannot run it) and do not fail the check by themselves; rows only in this
run are new and have nothing to regress from. Compare runs of the same host class: the ratio of
absolute times across different machines measures the machines, not the code.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from voxport.errors import ConfigError, RegressionError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Regression:
    row_id: str
    baseline_s: float
    current_s: float

    @property
    def ratio(self) -> float:
        return self.current_s / self.baseline_s

    def describe(self) -> str:
        return (f"[{self.row_id}] median {self.current_s * 1e3:.1f} ms vs baseline "
                f"{self.baseline_s * 1e3:.1f} ms ({self.ratio:.2f}x)")


def load_baseline(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read bench baseline {path}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise ConfigError(f"{path} is not a `voxport bench` JSON (no 'rows' list)")
    return data


def compare(current: dict[str, Any], baseline: dict[str, Any], max_ratio: float,
            metric: str = "median_s") -> tuple[list[Regression], list[str]]:
    """(regressions, ids of baseline rows missing from `current`), rows matched by `id`."""
    if max_ratio < 1.0:
        raise ConfigError(f"bench.max_regression must be >= 1.0, got {max_ratio}")
    now = {row["id"]: row for row in current["rows"]}
    regressions, missing = [], []
    for old in baseline["rows"]:
        new = now.get(old["id"])
        if new is None:
            missing.append(old["id"])
            continue
        before, after = old.get(metric), new.get(metric)
        if before and after and after > before * max_ratio:
            regressions.append(Regression(old["id"], float(before), float(after)))
    if missing:
        log.warning("%d baseline row(s) not in this run: %s", len(missing), "; ".join(missing))
    return regressions, missing


def check(current: dict[str, Any], baseline_path: str | Path, max_ratio: float) -> list[str]:
    """Raise RegressionError naming every regressed row; return the missing row ids otherwise."""
    regressions, missing = compare(current, load_baseline(baseline_path), max_ratio)
    if regressions:
        raise RegressionError(regressions, max_ratio, str(baseline_path))
    return missing
