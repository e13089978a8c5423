"""ONNX Runtime backend (CPU, CUDA), and the one place in voxport that opens an ONNX Runtime session.

Build-time validation and timing open their candidates here too (`OnnxRuntimeBackend.from_file`,
`open_session`), so the speeds a build records, and artifact selection ranks by, are measured
under the session settings the runtime serves with: the build records them in `speed.session`
and `load` reopens the artifact with them.

ONNX Runtime falls back from CUDA to CPU silently when a provider cannot be created; we read the
session's providers back and refuse a mismatch, so a log never says "CUDA" while a CPU computes.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from voxport.errors import BackendUnavailable, ConfigError
from voxport.pipeline.records import Record
from voxport.runtime.backends.base import Backend, verified_artifact

log = logging.getLogger(__name__)

# ONNX Runtime graph optimization levels by the names records use (speed.session). `all` adds
# layout transforms such as NHWC; `disabled` runs the graph as written (range instrumentation).
GRAPH_OPTIMIZATION_LEVELS = ("disabled", "basic", "extended", "all")

CPU_ARENA_POLICIES = ("keep", "shrink", "disabled")

# The key old records carry in speed.session for what is now `graph_optimization`.
_OLD_LEVEL_KEY = "graph_optimization_level"


def graph_optimization_level(name: str) -> object:
    """ORT's enum for one of GRAPH_OPTIMIZATION_LEVELS."""
    import onnxruntime as ort

    levels = {"disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    if name not in levels:
        raise ConfigError(f"unknown graph optimization level '{name}' for ONNX Runtime (known: {', '.join(levels)})")
    return levels[name]


@dataclass(frozen=True)
class SessionSettings:
    """How a session is configured: what the build times an artifact under, records in its
    `speed.session`, and what the runtime reopens it with."""

    graph_optimization: str = "all"
    intra_op_threads: int = 0  # 0 = ONNX Runtime's default (all cores)
    inter_op_threads: int = 1  # graphs run sequentially; the inter-op pool only idles
    # Busy-waiting workers starve whatever shares the cores after a run (PyTorch timed beside
    # ONNX Runtime in a stage, other engines and requests in serve); the latency they save is
    # below our per-call timings. Off means off in both pools.
    allow_spinning: bool = False
    # ONNX Runtime's CPU memory arena: `keep` holds what the largest run needed (fastest); `shrink`
    # returns it after every run (a service's RSS falls back between requests); `disabled` allocates
    # per run. Peak memory itself is bounded by the inputs (serve vocodes in bounded chunks).
    cpu_arena: str = "keep"

    def __post_init__(self) -> None:
        if self.graph_optimization not in GRAPH_OPTIMIZATION_LEVELS:
            raise ConfigError(f"unknown graph optimization level '{self.graph_optimization}' for ONNX Runtime "
                              f"(known: {', '.join(GRAPH_OPTIMIZATION_LEVELS)})")
        for name in ("intra_op_threads", "inter_op_threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"ONNX Runtime {name} must be an integer >= 0, got {value!r}")
        if self.cpu_arena not in CPU_ARENA_POLICIES:
            raise ConfigError(f"ONNX Runtime cpu_arena must be one of {', '.join(CPU_ARENA_POLICIES)}, "
                              f"got {self.cpu_arena!r}")
        if not isinstance(self.allow_spinning, bool):
            raise ConfigError(f"ONNX Runtime allow_spinning must be true or false, got {self.allow_spinning!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> SessionSettings:
        """Settings from a record's `speed.session` (None or {} gives the defaults).

        Old records carry only `{"graph_optimization_level": ...}`; the fields they lack take the
        defaults. Keys that are not settings (the timing medians recorded beside them) are ignored.
        """
        data = dict(data or {})
        if _OLD_LEVEL_KEY in data:
            data.setdefault("graph_optimization", data.pop(_OLD_LEVEL_KEY))
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def with_overrides(self, **overrides: Any) -> SessionSettings:
        """These settings with single fields replaced; a None value keeps the field."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError(f"unknown ONNX Runtime session setting(s) {unknown} (known: {sorted(names)})")
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})


DEFAULT_SETTINGS = SessionSettings()


def session_options(settings: SessionSettings, optimized_model_filepath: Path | str | None = None,
                    profile_prefix: Path | str | None = None) -> Any:
    """ORT SessionOptions for `settings` (errors only: sessions log at severity 3). `profile_prefix`:
    ORT's profiler on, its JSON trace written to `<prefix>_<time>.json` (`voxport profile`)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = graph_optimization_level(settings.graph_optimization)
    opts.intra_op_num_threads = settings.intra_op_threads
    opts.inter_op_num_threads = settings.inter_op_threads
    opts.log_severity_level = 3
    opts.enable_cpu_mem_arena = settings.cpu_arena != "disabled"
    spin = "1" if settings.allow_spinning else "0"
    opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
    opts.add_session_config_entry("session.inter_op.allow_spinning", spin)
    if optimized_model_filepath is not None:  # qdq.runtime_op_counts reads the graph ORT runs
        opts.optimized_model_filepath = str(optimized_model_filepath)
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(profile_prefix)
    return opts


def open_session(
    model: Path | str | bytes,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    settings: SessionSettings = DEFAULT_SETTINGS,
    optimized_model_filepath: Path | str | None = None,
    profile_prefix: Path | str | None = None,
) -> Any:
    """An onnxruntime.InferenceSession over a file or a serialized model, configured by `settings`
    (`profile_prefix`: ORT's profiler on, see `session_options`).

    Refuses providers this host lacks, and a session that silently runs on other providers than
    asked (ONNX Runtime drops CUDA for CPU without an error).
    """
    import onnxruntime as ort

    requested = list(providers)
    label = "serialized model" if isinstance(model, bytes) else Path(model).name
    available = ort.get_available_providers()
    missing = [p for p in requested if p not in available]
    if missing:
        raise BackendUnavailable(
            f"{label}: ONNX Runtime providers {missing} are not available here (available: {available})"
        )
    source = model if isinstance(model, bytes) else str(model)
    opts = session_options(settings, optimized_model_filepath, profile_prefix)
    session = ort.InferenceSession(source, sess_options=opts, providers=requested)
    actual = session.get_providers()
    if actual[: len(requested)] != requested:
        raise BackendUnavailable(
            f"{label}: asked ONNX Runtime for {requested} but the session runs on {actual}; "
            "refusing the silent fallback"
        )
    return session


def recorded_settings(record: Record, providers: Sequence[str]) -> SessionSettings:
    """The settings `record`'s stage timed the artifact under (`speed.session`), else the defaults.
    GPU providers get graph optimization `all`: the CPU measurement says nothing about them."""
    try:
        settings = SessionSettings.from_dict((record.speed or {}).get("session"))
    except ConfigError as exc:  # BackendUnavailable: the runtime falls back to the next artifact
        raise BackendUnavailable(f"{record.file}: its record's speed.session is unusable: {exc}") from exc
    if any(p != "CPUExecutionProvider" for p in providers):
        return settings.with_overrides(graph_optimization="all")
    return settings


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(
        self,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        settings: SessionSettings | None = None,
        **overrides: Any,
    ) -> None:
        """`settings` replaces the record's settings outright; `overrides` (SessionSettings field
        names; None keeps the field) replace single fields of whichever settings apply, e.g.
        serve pinning `intra_op_threads`."""
        self._requested = list(providers)
        self._explicit = settings
        self._overrides = {k: v for k, v in overrides.items() if v is not None}
        DEFAULT_SETTINGS.with_overrides(**self._overrides)  # a wrong name fails here, not at load
        self._session: Any = None
        self._input_names: list[str] = []
        self._output_names: list[str] = []
        self._run_options: Any = None
        self.settings: SessionSettings | None = None  # what the open session uses

    @classmethod
    def from_file(
        cls,
        model: Path | str | bytes,
        settings: SessionSettings = DEFAULT_SETTINGS,
        providers: Sequence[str] = ("CPUExecutionProvider",),
    ) -> OnnxRuntimeBackend:
        """A build-time candidate that has no record yet (validation, timing): no sha256 check,
        opened with exactly `settings`."""
        backend = cls(providers, settings=settings)
        backend._open(model, settings)
        return backend

    def load(self, record: Record, bundle_dir: Path) -> None:
        path = verified_artifact(record, bundle_dir)
        settings = self._explicit if self._explicit is not None else recorded_settings(record, self._requested)
        settings = settings.with_overrides(**self._overrides)
        self._open(path, settings)
        log.info("loaded %s on %s with session settings %s%s", record.file, self.providers, settings.to_dict(),
                 f" (overriding {sorted(self._overrides)})" if self._overrides else "")

    def _open(self, model: Path | str | bytes, settings: SessionSettings) -> None:
        session = open_session(model, self._requested, settings)
        self._session = session
        self.settings = settings
        self._run_options = None
        if settings.cpu_arena == "shrink":  # give the arena's chunks back after every run
            import onnxruntime as ort

            self._run_options = ort.RunOptions()
            self._run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        self._input_names = [i.name for i in session.get_inputs()]
        self._output_names = [o.name for o in session.get_outputs()]

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._session is None:
            raise BackendUnavailable("onnxruntime backend used before load() or after close()")
        outputs = self._session.run(None, {n: feeds[n] for n in self._input_names}, self._run_options)
        return dict(zip(self._output_names, outputs, strict=True))

    @property
    def session(self) -> Any:
        """The open onnxruntime.InferenceSession (None before load or after close)."""
        return self._session

    @property
    def graph_optimization(self) -> str | None:
        return self.settings.graph_optimization if self.settings is not None else None

    @property
    def providers(self) -> list[str]:
        return list(self._session.get_providers()) if self._session is not None else []

    def close(self) -> None:
        self._session = None
