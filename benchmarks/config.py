"""The `bench:` node (conf/bench/default.yaml) as a validated dataclass."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from voxport.errors import ConfigError
from voxport.pipeline.schema import build


@dataclass(frozen=True)
class E2EConfig:
    # One end-to-end job per preference order (runtime/select.py tiers); conf: all PyTorch, and
    # `${target.preference}`, what the runtime serves.
    preferences: tuple[tuple[str, ...], ...] = (("torch",), ("cpu", "torch"))
    strict: bool = False  # `${target.strict}`: refuse any fallback from each order's first tier
    lengths: tuple[str, ...] = ("short", "medium")
    ttfa_lengths: tuple[str, ...] = ("medium",)
    reference_s: float = 3.0  # reference recording (speaker embedding) length
    first_chunk_s: float = 0.5  # emulated first chunk where the runtime has no stream()


@dataclass(frozen=True)
class BenchConfig:
    bundle: str
    out: str = "benchmarks/results"
    threads: int = 0  # 0: usable cores
    warmup: int = 1
    repeats: int = 5
    min_repeats: int = 3
    budget_s: float = 10.0
    lengths: tuple[str, ...] = ("short", "medium", "long")
    seconds: dict[str, float] = field(default_factory=lambda: {"short": 1.0, "medium": 3.0, "long": 6.0})
    components: tuple[str, ...] = ("speaker_encoder", "synthesizer", "vocoder")
    e2e: E2EConfig = field(default_factory=E2EConfig)
    cuda: bool | str = "auto"  # auto: GPU rows where CUDA exists | false: CPU rows only
    isolate: bool = True
    job_timeout_s: float = 900.0
    max_regression: float = 1.25

    def __post_init__(self) -> None:
        unknown = sorted({*self.lengths, *self.e2e.lengths, *self.e2e.ttfa_lengths} - set(self.seconds))
        if unknown or self.warmup < 1 or not 1 <= self.min_repeats <= self.repeats:
            raise ConfigError(f"bench: lengths without seconds {unknown}, or warmup < 1, or not "
                              f"1 <= min_repeats <= repeats")
        if str(self.cuda).lower() not in ("auto", "false"):
            raise ConfigError(f"bench.cuda must be auto or false, got {self.cuda!r}")

    @property
    def allow_cuda(self) -> bool:
        return str(self.cuda).lower() != "false"

    @classmethod
    def from_cfg(cls, node: Any) -> BenchConfig:
        return build(cls, node, "bench")
