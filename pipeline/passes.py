"""Optimization stages: registry, context, and the rules every stage follows.

A stage is `run(parent: Record, cfg, ctx) -> Record`: it reads its parent artifact from the
bundle, writes a new artifact beside it, measures parity against the PyTorch FP32 original and
quality where a listener would notice, times itself against its parent in the same process, and
writes the record only if the gate passed. On a failed gate it deletes what it wrote and raises
`GateError` listing every metric. Stages never mutate their parent nor global torch settings.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from voxport.errors import ConfigError, GateError
from voxport.evaluate.corpus import Corpus
from voxport.pipeline.records import Record

log = logging.getLogger(__name__)


@dataclass
class StageContext:
    """What every stage may use: the bundle being built, real speech, gates and settings."""

    bundle_dir: Path
    corpus: Corpus
    records: list[Record]  # every record written so far in this build
    gates: dict[str, Any]  # conf `gates`: per component, per precision
    seed: int = 1234
    threads: int = 0  # 0 = engine default
    timing_repeats: int = 5
    timing_min_seconds: float = 0.0  # more rounds for short workloads (quality.side_by_side)
    cache: dict[str, Any] = field(default_factory=dict)  # per-build memo (e.g. FP32 quality baseline)
    skipped: list[dict[str, str]] = field(default_factory=list)  # stages that raised StageSkipped

    def source(self, component: str) -> Record:
        """The PyTorch FP32 original of a component: the reference for every comparison."""
        for r in self.records:
            if r.component == component and r.stage == "source":
                return r
        raise ConfigError(f"no PyTorch source record for '{component}' in this build")

    def find(self, component: str, graph: str, fmt: str, precision: str = "fp32") -> Record:
        for r in reversed(self.records):
            if (r.component, r.graph, r.format, r.precision) == (component, graph, fmt, precision):
                return r
        raise ConfigError(f"no {fmt} {precision} artifact of {component}/{graph} built before this stage")

    def gate(self, component: str, precision: str) -> dict[str, Any]:
        try:
            return dict(self.gates[component][precision])
        except KeyError:
            raise ConfigError(f"no gate configured for {component} {precision} (conf gates)") from None


def known_settings(config_cls: type, settings: Mapping[str, Any], section: str,
                   ignored: tuple[str, ...] = ("graph",)) -> dict[str, Any]:
    """The entries of `settings` that are fields of the dataclass `config_cls`; any other key (a
    typo in conf/ or on the command line) is an error naming it, never silently dropped."""
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(settings) - known - set(ignored))
    if unknown:
        raise ConfigError(f"{section}: unknown settings {unknown} (known: {sorted(known)})")
    return {k: v for k, v in settings.items() if k in known}


def artifact_name(parent_file: str, tag: str) -> str:
    """The file a stage derives from its parent: `vocoder_fp32.onnx` -> `vocoder_int8_static.onnx`;
    a parent made by an earlier stage keeps its name (`vocoder_pruned_obs_structured_10.onnx` ->
    `vocoder_pruned_obs_structured_10_int8_static.onnx`), so no stage ever writes over its parent."""
    path = Path(parent_file)
    return f"{path.stem.removesuffix('_fp32')}_{tag}{path.suffix}"


StageFn = Callable[[Record, Any, StageContext], Record]
_STAGES: dict[str, StageFn] = {}


def register(kind: str) -> Callable[[StageFn], StageFn]:
    def wrap(fn: StageFn) -> StageFn:
        _STAGES[kind] = fn
        return fn

    return wrap


def stage(kind: str) -> StageFn:
    """The stage function registered under `kind` (modules are imported on first use)."""
    if kind not in _STAGES:
        import importlib

        module = STAGE_MODULES.get(kind)
        if module is None:
            raise ConfigError(f"unknown stage '{kind}'; known: {', '.join(sorted(STAGE_MODULES))}")
        importlib.import_module(module)
    return _isolated(_STAGES[kind])


def _isolated(fn: StageFn) -> StageFn:
    """Run a stage without leaking global torch state (RNG, threads, grad mode) to its caller.

    Stages draw random numbers (initialisation, masks) and tune threads for timing; whatever they
    do, the process continues exactly as before, which the build and the tests rely on.
    """
    import functools

    import torch

    @functools.wraps(fn)
    def run(parent: Record, cfg: Any, ctx: StageContext) -> Record:
        threads, grad = torch.get_num_threads(), torch.is_grad_enabled()
        try:
            with torch.random.fork_rng(devices=[]):
                return fn(parent, cfg, ctx)
        finally:
            torch.set_num_threads(threads)
            torch.set_grad_enabled(grad)

    return run


# Where each stage kind lives; importing the module registers it.
STAGE_MODULES = {
    "quantize_dynamic": "voxport.quantize.dynamic",
    "quantize_static": "voxport.quantize.static",
    "bf16": "voxport.quantize.bf16",
    "prune_magnitude": "voxport.prune.magnitude",
    "prune_structured": "voxport.prune.structured",
    "fp16": "voxport.export.fp16",
    "tensorrt": "voxport.export.tensorrt",
}


def fail(artifact: str, failures: list[str], figures: dict[str, Any], written: list[Path]) -> None:
    """Delete what a stage wrote and raise GateError with every figure (never half an artifact)."""
    for path in written:
        Path(path).unlink(missing_ok=True)
    raise GateError(artifact, failures, figures)
