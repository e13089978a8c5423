"""TensorRT optimization profiles derived from data: min / opt / max of every dynamic axis.

An engine only accepts shapes inside its profile and is fastest at `opt`, so the ranges come from
the lengths real inputs have: mel frames of the corpus' recordings (vocoder, postnet), symbol
counts of the text fragments the synthesizer will read (encoder, decoder step), and partial
counts of reference utterances (speaker encoder). Everything here except `corpus_lengths` is a
pure function of numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from voxport.errors import ConfigError
from voxport.pipeline.records import TensorSpec

Range = tuple[int, int, int]  # (min, opt, max)


@dataclass(frozen=True)
class ProfileConfig:
    """How lengths become a range: percentiles of the data, headroom above the longest, rounding."""

    min_percentile: float = 0.0
    opt_percentile: float = 50.0
    max_percentile: float = 100.0
    max_headroom: float = 1.25  # the longest input seen x this: room for inputs a little longer
    round_to: int = 8  # max rounded up to a multiple (kernels like aligned sizes)
    batch: Range = (1, 1, 1)  # batch axis of graphs whose batch is not data (all but the encoder)
    overrides: dict[str, Range] = field(default_factory=dict)  # axis label -> (min, opt, max)

    def __post_init__(self) -> None:
        if not 0 <= self.min_percentile <= self.opt_percentile <= self.max_percentile <= 100:
            raise ConfigError("profile percentiles must satisfy 0 <= min <= opt <= max <= 100")
        if self.max_headroom < 1.0 or self.round_to < 1:
            raise ConfigError("profile.max_headroom must be >= 1 and profile.round_to >= 1")
        for label, rng in {"batch": self.batch, **self.overrides}.items():
            _check_range(label, tuple(rng))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> ProfileConfig:
        data = dict(data or {})
        if "batch" in data:
            data["batch"] = tuple(int(v) for v in data["batch"])
        data["overrides"] = {k: tuple(int(v) for v in r) for k, r in (data.get("overrides") or {}).items()}
        return cls(**data)


def _check_range(label: str, rng: tuple[int, ...]) -> None:
    if len(rng) != 3 or not 1 <= rng[0] <= rng[1] <= rng[2]:
        raise ConfigError(f"profile range for '{label}' must be [min, opt, max] with "
                          f"1 <= min <= opt <= max, got {list(rng)}")


def length_range(values: Sequence[int], cfg: ProfileConfig) -> Range:
    """(min, opt, max) of an axis from observed lengths."""
    data = np.asarray(list(values), dtype=np.float64)
    if data.size == 0 or not np.all(np.isfinite(data)) or data.min() < 1:
        raise ConfigError("cannot derive a profile from no lengths (or lengths < 1)")
    lo = max(1, math.floor(np.percentile(data, cfg.min_percentile)))
    hi = math.ceil(np.percentile(data, cfg.max_percentile) * cfg.max_headroom)
    hi = max(lo, math.ceil(hi / cfg.round_to) * cfg.round_to)
    opt = min(max(lo, round(float(np.percentile(data, cfg.opt_percentile)))), hi)
    return (lo, opt, hi)


def axis_ranges(lengths: Mapping[str, Sequence[int]], cfg: ProfileConfig) -> dict[str, Range]:
    """Range of every axis label: configured override, else derived from its lengths."""
    ranges: dict[str, Range] = {"batch": tuple(cfg.batch)}
    for label, values in lengths.items():
        ranges[label] = length_range(values, cfg)
    for label, rng in cfg.overrides.items():
        ranges[label] = tuple(int(v) for v in rng)
    return ranges


def profile_shapes(inputs: Sequence[TensorSpec], ranges: Mapping[str, Range]) -> dict[str, dict[str, list[int]]]:
    """Per input: {"min": shape, "opt": shape, "max": shape}; symbolic axes take their range."""
    profiles: dict[str, dict[str, list[int]]] = {}
    for spec in inputs:
        shapes: dict[str, list[int]] = {"min": [], "opt": [], "max": []}
        for dim in spec.shape:
            if isinstance(dim, str):
                if dim not in ranges:
                    raise ConfigError(f"input '{spec.name}' has axis '{dim}' but no profile range for it "
                                      f"(have {sorted(ranges)}): add tensorrt.profile.overrides.{dim}")
                lo, opt, hi = ranges[dim]
            else:
                lo = opt = hi = int(dim)
            shapes["min"].append(int(lo))
            shapes["opt"].append(int(opt))
            shapes["max"].append(int(hi))
        profiles[spec.name] = shapes
    return profiles


def shape_problem(profiles: Mapping[str, Mapping[str, Sequence[int]]], name: str,
                  shape: Sequence[int]) -> str | None:
    """Why `shape` does not fit the engine's profile for input `name` (None: it fits)."""
    if name not in profiles:
        return f"the engine has no input '{name}'"
    lo, hi = profiles[name]["min"], profiles[name]["max"]
    if len(shape) != len(lo) or any(not a <= s <= b for s, a, b in zip(shape, lo, hi, strict=True)):
        return (f"input '{name}' shape {list(shape)} is outside the engine's profile {list(lo)}..{list(hi)}; "
                "rebuild with a wider tensorrt.profile")
    return None
