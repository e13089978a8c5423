"""The settings of every quantization stage: conf `quantize` merged with the stage entry.

One dataclass for the static, dynamic and search settings, because Hydra composes them as one
node (`quantize.calibration=entropy` must reach the static stage, `quantize.engine=torch` the
dynamic one); every value is checked here, so a typo fails before any work starts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from voxport.errors import ConfigError

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
SEARCHES = ("none", "bisect", "greedy")
RANK_BY = ("error", "error_per_mac")
ENGINES = ("onnxruntime", "torch")
SEARCH_REFERENCES = ("original", "parent")
INT8_TYPES = ("int8", "uint8")


@dataclass(frozen=True)
class QuantizeConfig:
    # Static INT8 (ONNX Runtime QDQ)
    calibration: str = "minmax"
    percentile: float = 99.999
    histogram_bins: int = 512  # entropy / percentile histograms (entropy tries bins/2 - 63 thresholds)
    per_channel: bool = True
    reduce_range: bool = False  # 7-bit weights: avoids U8S8 saturation on CPUs without VNNI
    calibration_clips: int = 8
    crop_seconds: float = 1.0  # ORT's histogram calibrators need every input the same length
    op_types: tuple[str, ...] = ("Conv",)
    exclude_op_types: tuple[str, ...] = ("ConvTranspose",)
    exclude_nodes: tuple[str, ...] = ()
    keep_output_layer_float: bool = True
    weight_type: str = "int8"
    activation_type: str = "uint8"
    # Mixed precision search
    search: str = "greedy"
    rank_by: str = "error_per_mac"  # the search maximises speed: favour layers with the most compute
    rank_clips: int = 2
    rank_seconds: float = 0.4
    search_clips: int = 4
    search_seconds: float = 1.5
    search_margin: float = 0.7  # fraction of the gate the search must meet on calibration clips
    search_max_trials: int = 12
    # What the static search measures its budget against on calibration clips: the PyTorch FP32
    # `original` (the whole chain must fit margin x gate there), or the stage's `parent` (only
    # what INT8 adds must fit; a pruned parent's own cost is judged by the final held-out gate).
    # Either way the artifact itself is gated against the original on held-out clips.
    search_reference: str = "original"
    # The residual Adds reading a candidate layer join the mixed-precision search; the accepted ones
    # run in INT8 (ORT's QLinearAdd), so a residual stack stays in integers between its convolutions
    # instead of dequantizing, adding in float and requantizing around every layer. Each Add is
    # ranked by its own emulated error, never before its layer (quantize/static.py _ranking).
    integer_adds: bool = False
    # Dynamic INT8
    engine: str = "onnxruntime"
    dynamic_op_types: tuple[str, ...] = ("LSTM", "MatMul", "Gemm")
    # From the stage entry
    graph: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.integer_adds, bool):
            raise ConfigError(f"quantize.integer_adds must be true or false, got {self.integer_adds!r}")
        for name in ("op_types", "exclude_op_types", "exclude_nodes", "dynamic_op_types"):
            object.__setattr__(self, name, tuple(str(v) for v in getattr(self, name) or ()))
        checks = [("calibration", CALIBRATION_METHODS), ("search", SEARCHES), ("rank_by", RANK_BY),
                  ("engine", ENGINES), ("search_reference", SEARCH_REFERENCES), ("weight_type", INT8_TYPES),
                  ("activation_type", INT8_TYPES)]
        for name, allowed in checks:
            if getattr(self, name) not in allowed:
                raise ConfigError(f"quantize.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not 0.0 < self.percentile <= 100.0:
            raise ConfigError(f"quantize.percentile must be in (0, 100], got {self.percentile}")
        if not 0.0 < self.search_margin <= 1.0:
            raise ConfigError(f"quantize.search_margin must be in (0, 1], got {self.search_margin}")
        if self.histogram_bins < 256:
            raise ConfigError(f"quantize.histogram_bins must be >= 256, got {self.histogram_bins}")
        for name in ("calibration_clips", "rank_clips", "search_clips"):
            if getattr(self, name) < 1:
                raise ConfigError(f"quantize.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("crop_seconds", "rank_seconds", "search_seconds"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"quantize.{name} must be > 0, got {getattr(self, name)}")

    @classmethod
    def from_cfg(cls, cfg: Mapping[str, Any] | QuantizeConfig) -> QuantizeConfig:
        if isinstance(cfg, QuantizeConfig):
            return cfg
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ConfigError(f"unknown quantize setting(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**dict(cfg))

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> QuantizeConfig:
        return cls.from_cfg(settings)

    @property
    def quantized_op_types(self) -> tuple[str, ...]:
        """Op types the static quantizer calibrates and may quantize (the nodes it is given decide)."""
        return (*self.op_types, *(("Add",) if self.integer_adds and "Add" not in self.op_types else ()))

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


# The settings that decide each pass's artifact (the stage cache's key): `quantize.calibration=entropy`
# reruns the static pass only, not the dynamic ones that share the `quantize` node.
_SEARCH = ("search", "rank_by", "rank_clips", "rank_seconds", "search_clips", "search_seconds", "search_margin",
           "search_max_trials", "graph")
STATIC_FIELDS = ("calibration", "percentile", "histogram_bins", "per_channel", "reduce_range", "calibration_clips",
                 "crop_seconds", "op_types", "exclude_op_types", "exclude_nodes", "keep_output_layer_float",
                 "weight_type", "activation_type", "search_reference", "integer_adds", *_SEARCH)
DYNAMIC_FIELDS = ("engine", "dynamic_op_types", "reduce_range", "weight_type", *_SEARCH)
