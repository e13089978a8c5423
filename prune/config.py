"""The settings of the pruning passes: conf `prune` merged with the preset entry, checked once."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from voxport.errors import ConfigError

IMPORTANCES = ("obs", "l1")
ALLOCATIONS = ("global", "uniform", "gate")
FINETUNE_TARGETS = ("fp32", "recording")


@dataclass(frozen=True)
class PruneConfig:
    sparsity: float | None = None  # None: the preset's default_sparsity (magnitude: weights zeroed;
    default_sparsity: float | None = None  # structured: share of the vocoder's FLOPs removed)
    scope: str = "global"  # unstructured: global | layer
    exclude: tuple[str, ...] = ()  # unstructured: layer-name prefixes kept dense
    importance: str = "obs"  # structured: obs | l1
    allocation: str = "global"  # structured: global | uniform
    damp: float = 1e-3  # structured obs: ridge damping of the activation second moments
    calibration_clips: int = 12  # real speech of the calib split (statistics, fine-tune)
    calibration_seconds: float = 3.0
    # allocation `gate`: each pair probed alone at this share of its channels, scored by the gate
    sensitivity_probe: float = 0.5
    sensitivity_clips: int = 4  # calibration clips (calib split) of each probe
    sensitivity_seconds: float = 1.5
    sensitivity_pesq_weight: float = 0.0  # + this x the PESQ drop's share of the gate in a probe's cost
    # allocation `gate`: per upsampling level, the time one resblock FLOP costs there relative to the
    # others (None: FLOPs are the cost); `sparsity` is then a share of the time-weighted FLOPs
    level_time_weights: tuple[float, ...] | None = None
    # Distillation fine-tune after structured pruning (prune/finetune.py): the FP32 model teaches.
    finetune_steps: int = 0  # Adam steps (fixed: the run is deterministic); 0 = off
    finetune_seconds: float = 600.0  # wall-time cap; when hit, training stops and the record says so
    finetune_lr: float = 3e-6
    finetune_target: str = "fp32"  # fp32 (the teacher's output) | recording
    finetune_crop_frames: int = 32  # frames the loss sees per crop
    finetune_context_frames: int = 8  # frames of context on each side of a crop, not in the loss
    finetune_batch: int = 4
    finetune_stft_weight: float = 0.0  # weight of the multi-resolution STFT term beside the gate's log-mel
    # Block-wise distillation after structured pruning (prune/distill.py): per level, a least-squares
    # re-fit of every convs2 from the student's own activations, then `distill_steps` Adam steps.
    distill: bool = False
    distill_steps: int = 0  # Adam steps per level after the re-fit (fixed: the run is deterministic)
    distill_seconds: float = 600.0  # wall-time cap; when hit, training stops and the record says so
    distill_lr: float = 1e-5
    distill_clips: int = 16  # calibration clips (calib split, wideband first) the crops come from
    distill_crops: int = 32  # random crops drawn once (seeded); activations cached per level
    distill_crop_frames: int = 32
    distill_batch: int = 4
    distill_damp: float = 0.1  # ridge of the re-fit, towards the pair's current (OBS) weights
    graph: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "exclude", tuple(str(p) for p in self.exclude or ()))
        if self.level_time_weights is not None:
            weights = tuple(self.level_time_weights)
            if not weights or any(isinstance(w, bool) or not isinstance(w, int | float) or not w > 0 for w in weights):
                raise ConfigError(f"prune.level_time_weights must be null or a list of numbers > 0 (one per "
                                  f"upsampling level), got {list(weights)!r}")
            object.__setattr__(self, "level_time_weights", tuple(float(w) for w in weights))
            if self.allocation != "gate":
                raise ConfigError("prune.level_time_weights needs prune.allocation 'gate' (pairs ranked by what the "
                                  f"gate hears per unit of time saved), got '{self.allocation}'")
        for name, allowed in (("importance", IMPORTANCES), ("allocation", ALLOCATIONS),
                              ("finetune_target", FINETUNE_TARGETS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"prune.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("sparsity", "default_sparsity"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int | float) and 0.0 <= value < 1.0):
                raise ConfigError(f"prune.{name} must be a number in [0, 1), got {value!r}")
        if self.calibration_clips < 1 or self.calibration_seconds <= 0:
            raise ConfigError("prune.calibration_clips must be >= 1 and calibration_seconds > 0")
        zero_ok = ("distill_steps", "finetune_steps", "finetune_context_frames")
        ints = ("distill_clips", "distill_crops", "distill_crop_frames", "distill_batch", "sensitivity_clips",
                "finetune_crop_frames", "finetune_batch", *zero_ok)
        for name in ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name in zero_ok else 1):
                raise ConfigError(f"prune.{name} must be an integer >= {0 if name in zero_ok else 1}, "
                                  f"got {value!r}")
        if not (isinstance(self.sensitivity_probe, int | float) and 0.0 < self.sensitivity_probe < 1.0):
            raise ConfigError(f"prune.sensitivity_probe must be a number in (0, 1), got {self.sensitivity_probe!r}")
        for name in ("finetune_stft_weight", "sensitivity_pesq_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise ConfigError(f"prune.{name} must be a number >= 0, got {value!r}")
        if self.distill_batch > self.distill_crops:
            raise ConfigError(f"prune.distill_batch ({self.distill_batch}) cannot exceed prune.distill_crops "
                              f"({self.distill_crops})")
        for name in ("distill_seconds", "distill_lr", "distill_damp", "finetune_seconds", "finetune_lr",
                     "sensitivity_seconds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ConfigError(f"prune.{name} must be a number > 0, got {value!r}")
        if not isinstance(self.distill, bool):
            raise ConfigError(f"prune.distill must be true or false, got {self.distill!r}")

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> PruneConfig:
        from voxport.pipeline.passes import known_settings

        return cls(**known_settings(cls, settings, "prune", ignored=()))

    def target(self, fallback: float) -> float:
        """`sparsity` if set (entry or `prune.sparsity=`), else the preset's, else the pass's default."""
        for value in (self.sparsity, self.default_sparsity):
            if value is not None:
                return float(value)
        return fallback

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
