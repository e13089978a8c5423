"""Passes: the one registry of optimization steps, and the contract every pass follows.

A pass only transforms. Its module defines a typed config (`CONFIG`, a frozen dataclass whose
defaults live in conf/) and `transform(parent, config, ctx) -> Candidate`: it reads its parent
artifact, writes the candidate's file(s) into the bundle being built, and describes them as draft
records. It does not gate, time or write records: the engine (pipeline/engine.py) asks the
component to judge the candidate, times it, and writes the records, or removes the candidate's
files when it fails. A pass may consult its component (calibration inputs, the gate a
mixed-precision search needs on calibration speech), never compare component names.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from voxport.errors import ConfigError
from voxport.pipeline.records import Record

if TYPE_CHECKING:
    from voxport.evaluate.components import Component


@dataclass(frozen=True)
class PassKind:
    """One kind of optimization step: where it lives and how the engine treats its candidates."""

    name: str
    module: str  # defines CONFIG (dataclass) and transform(parent, config, ctx) -> Candidate
    settings: str | None = None  # conf node shared by every pass of the kind (`quantize`, `prune`)
    requires: tuple[str, ...] = ()  # host capabilities without which it cannot run at all
    exact: bool = False  # an exact transform: judged by FP32 parity against its parent, not by ear
    timed: bool = True  # timed side by side against PyTorch FP32 (and its parent)
    # Another engine for an artifact that already passed: where it is not faster than that parent
    # (gate `require_speedup`), the stage is skipped with the measured figures, not failed.
    alternative: bool = False

    def load(self) -> Any:
        return importlib.import_module(self.module)

    def config(self, settings: Mapping[str, Any]) -> Any:
        """The pass's typed config from its conf node merged with the preset entry; a key the
        dataclass lacks (a typo in conf/ or on the command line) is an error naming it."""
        cls = self.load().CONFIG
        from_settings = getattr(cls, "from_settings", None)
        if from_settings is not None:
            return from_settings(settings)
        return cls(**known_settings(cls, settings, self.settings or self.name))

    def transform(self) -> Callable[[Record, Any, PassContext], Candidate]:
        return isolated(self.load().transform)

    def key_fields(self, config: Any) -> dict[str, Any]:
        """The part of `config` that decides the candidate (the stage cache's key)."""
        fields = getattr(self.load(), "KEY_FIELDS", None)
        data = config.to_dict() if hasattr(config, "to_dict") else dataclasses.asdict(config)
        return {k: v for k, v in data.items() if fields is None or k in fields}


PASSES: dict[str, PassKind] = {kind.name: kind for kind in (
    PassKind("onnx_export", "voxport.export.onnx", settings="export", exact=True),
    PassKind("quantize_dynamic", "voxport.quantize.dynamic", settings="quantize"),
    PassKind("quantize_static", "voxport.quantize.static", settings="quantize"),
    PassKind("bf16", "voxport.quantize.bf16"),
    PassKind("prune_magnitude", "voxport.prune.magnitude", settings="prune"),
    PassKind("prune_structured", "voxport.prune.structured", settings="prune"),
    PassKind("fp16", "voxport.export.fp16", settings="fp16"),
    PassKind("openvino", "voxport.export.openvino", settings="openvino", alternative=True),
    PassKind("tensorrt", "voxport.export.tensorrt", settings="tensorrt", requires=("cuda", "tensorrt")),
)}


def pass_kind(name: str) -> PassKind:
    if name not in PASSES:
        raise ConfigError(f"unknown stage '{name}'; known: {', '.join(sorted(PASSES))}")
    return PASSES[name]


@dataclass
class PassContext:
    """What a pass may use: the bundle being built, its component, and the records so far."""

    bundle_dir: Path
    component: Component
    records: list[Record]
    seed: int = 1234
    threads: int = 0

    def record(self, file: str) -> Record | None:
        """The record of `file` in this build (e.g. the torch model an ONNX parent came from)."""
        return next((r for r in self.records if r.file == file), None)


@dataclass
class Candidate:
    """What a pass made: draft records (sha256 set; no quality or speed yet) of files it wrote
    into the bundle, in the order the engine should judge and write them."""

    records: list[Record]
    notes: dict[str, Any] = field(default_factory=dict)  # facts for the log and the failure message

    @property
    def files(self) -> list[Path]:
        return [Path(r.file) for r in self.records]


def known_settings(config_cls: type, settings: Mapping[str, Any], section: str,
                   ignored: tuple[str, ...] = ("graph",)) -> dict[str, Any]:
    """The entries of `settings` that are fields of the dataclass `config_cls`; any other key is an
    error naming it, never silently dropped. Lists become tuples (configs are frozen)."""
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(settings) - known - set(ignored))
    if unknown:
        raise ConfigError(f"{section}: unknown settings {unknown} (known: {sorted(known)})")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items() if k in known}


def artifact_name(parent_file: str, tag: str, suffix: str | None = None) -> str:
    """The file a pass derives from its parent: `vocoder_fp32.onnx` -> `vocoder_int8_static.onnx`;
    a parent made by an earlier pass keeps its name (`vocoder_pruned_obs_structured_10.onnx` ->
    `vocoder_pruned_obs_structured_10_int8_static.onnx`), so no pass ever writes over its parent."""
    path = Path(parent_file)
    return f"{path.stem.removesuffix('_fp32')}_{tag}{suffix or path.suffix}"


def isolated(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` run without leaking global torch state (RNG, threads, grad mode) to its caller.

    Passes draw random numbers (initialisation, masks) and tune threads, and so does judging
    (building a module to load weights into draws its initial weights); whatever they do, the
    process continues exactly as before, which the build and the tests rely on.
    """
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        import torch

        threads, grad = torch.get_num_threads(), torch.is_grad_enabled()
        try:
            with torch.random.fork_rng(devices=[]):
                return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
            torch.set_grad_enabled(grad)

    return run
