"""Mixed precision found automatically: quantize as many layers as the quality gate allows.

1. Rank the candidate layers by the error each adds when quantized ALONE (the caller measures it:
   PyTorch emulation of ORT's QDQ for the vocoder's convolutions, real ORT artifacts for the
   encoder's few LSTM / MatMul nodes), most tolerant first.
2. Bisection on the length of the ranked prefix: each candidate is a REAL artifact evaluated with
   the real gate metrics on calibration clips (never the held-out ones, which judge the result).
   Errors of separate layers add up roughly monotonically, so the longest passing prefix is found
   in log2(n) trials.
0. Everything first: if quantizing every candidate passes, nothing is ranked.
3. `greedy` then tries to add the layers ranked after the first failing one, by group testing
   (a group that fails is split in halves) while the trial budget lasts: the ranking's metric is
   not the gate's (PESQ reacts to some layers that barely move the log-mel distance), so a
   layer ranked late may still fit and one ranked early may be the one that hurts.

Every layer left float gets its reason: its sensitivity, and the trial that rejected it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from voxport.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class Trial:
    """One candidate node set, built as a real artifact and measured on calibration clips."""

    quantized: tuple[str, ...]
    figures: dict[str, Any]
    failures: list[str]
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.failures

    def summary(self) -> dict[str, Any]:
        keep = ("log_mel_distance_increase_db", "pesq_drop", "embedding_cosine_min", "decisions_changed",
                "mel_snr_db_min", "stop_agreement_min")
        return {"quantized": len(self.quantized), "passed": self.passed, "seconds": round(self.seconds, 2),
                **{k: self.figures[k] for k in keep if k in self.figures}, "failures": self.failures}


@dataclass
class SearchResult:
    ranking: list[tuple[str, float]]  # (node, error when quantized alone), most tolerant first
    quantized: list[str]
    float_nodes: dict[str, str] = field(default_factory=dict)  # node -> why it stayed float
    trials: list[Trial] = field(default_factory=list)
    seconds: float = 0.0
    macs: dict[str, float] = field(default_factory=dict)  # node -> multiply-accumulates (if known)

    def describe(self, metric: str) -> dict[str, Any]:
        out = {"ranking_metric": metric, "ranking": [[n, round(e, 5)] for n, e in self.ranking],
               "quantized": len(self.quantized), "kept_float": len(self.float_nodes),
               "trials": [t.summary() for t in self.trials], "seconds": round(self.seconds, 1)}
        if self.macs:  # what bounds the speed-up: the share of the candidates' compute in INT8
            out["quantized_mac_fraction"] = round(sum(self.macs.get(n, 0.0) for n in self.quantized)
                                                  / sum(self.macs.values()), 4)
        return out


def rank(errors: Mapping[str, float], macs: Mapping[str, float] | None = None, by: str = "error",
         ) -> list[tuple[str, float]]:
    """Candidates most tolerant first; `error_per_mac` favours layers that save the most compute
    per unit of error (ties broken by name, so the order is reproducible)."""
    if by == "error_per_mac":
        if not macs:
            raise ConfigError("quantize.rank_by=error_per_mac needs MAC counts for every layer")
        total = sum(macs.values())
        order = sorted(errors, key=lambda n: (errors[n] / max(macs[n] / total, 1e-12), n))
    else:
        order = sorted(errors, key=lambda n: (errors[n], n))
    return [(n, float(errors[n])) for n in order]


def search(candidates: Sequence[str], ranking: Callable[[], list[tuple[str, float]]],
           evaluate: Callable[[list[str]], Trial], mode: str, max_trials: int) -> SearchResult:
    """Quantize every candidate if that passes; else the longest passing prefix of `ranking()`
    (bisection), then greedy additions (`greedy`).

    `evaluate(nodes)` builds the artifact quantizing exactly `nodes` and returns its Trial;
    `ranking()` is only computed when quantizing everything fails. Mode `none` quantizes every
    candidate without trials (the final gate alone decides).
    """
    start = time.perf_counter()
    result = SearchResult([], list(candidates))
    if mode == "none" or not candidates:
        result.seconds = time.perf_counter() - start
        return result

    def run(nodes: list[str]) -> Trial:
        t0 = time.perf_counter()
        trial = evaluate(nodes)
        trial.seconds = time.perf_counter() - t0
        result.trials.append(trial)
        log.info("search trial %d: %d/%d layers quantized -> %s", len(result.trials), len(nodes),
                 len(candidates), "pass" if trial.passed else "; ".join(trial.failures))
        return trial

    first = run(list(candidates))
    if first.passed:
        result.seconds = time.perf_counter() - start
        return result
    result.ranking = ranking()
    names = [n for n, _ in result.ranking]
    if sorted(names) != sorted(candidates):
        raise ConfigError("search: the ranking does not cover exactly the candidate layers")
    lo, hi, hi_trial = 0, len(names), first  # prefix of length lo passes; length hi fails
    rejected_by: dict[str, Trial] = {}
    while hi - lo > 1 and len(result.trials) < max_trials:
        mid = (lo + hi) // 2
        trial = run(names[:mid])
        if trial.passed:
            lo = mid
        else:
            hi, hi_trial = mid, trial
    if hi == lo + 1:
        rejected_by[names[lo]] = hi_trial
    chosen = names[:lo]
    if mode == "greedy":
        # Group testing over the layers ranked after the first failing one: add a whole group if
        # it passes, else split it (most tolerant half first). A few bad layers among many
        # harmless ones are found in a logarithmic number of trials, not one trial per layer.
        pending = [names[lo + 1:]] if lo + 1 < len(names) else []
        while pending and len(result.trials) < max_trials:
            group = pending.pop(0)
            trial = run([*chosen, *group])
            if trial.passed:
                chosen.extend(group)
            elif len(group) == 1:
                rejected_by[group[0]] = trial
            else:
                pending[:0] = [group[: len(group) // 2], group[len(group) // 2:]]
    errors = dict(result.ranking)
    for position, name in enumerate(names):
        if name in chosen:
            continue
        why = f"error alone {errors[name]:.4g} (rank {position + 1} of {len(names)})"
        trial = rejected_by.get(name)
        if trial is not None:
            why += f"; adding it failed the gate on calibration clips: {'; '.join(trial.failures)}"
        elif mode == "bisect" and hi == lo + 1:
            why += "; ranked after the first layer that failed the gate"
        else:
            why += "; not tried (search budget spent: quantize.search_max_trials)"
        result.float_nodes[name] = why
    result.quantized = chosen
    result.seconds = time.perf_counter() - start
    return result
