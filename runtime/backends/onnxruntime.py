"""ONNX Runtime backend (CPU, CUDA).

ONNX Runtime falls back from CUDA to CPU silently when a provider cannot be created; we read the
session's providers back and refuse a mismatch, so a log never says "CUDA" while a CPU computes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from voxport.errors import BackendUnavailable
from voxport.export.onnx import GRAPH_OPTIMIZATION_LEVELS, graph_optimization_level
from voxport.pipeline.records import Record
from voxport.runtime.backends.base import Backend, verified_artifact

log = logging.getLogger(__name__)


def session_level(record: Record, providers: Sequence[str]) -> str:
    """The graph optimization level to run `record` with: the one its stage measured fastest on
    CPU (`speed.session`), else ORT's full optimization. GPU providers always get `all`: the CPU
    measurement says nothing about them."""
    level = ((record.speed or {}).get("session") or {}).get("graph_optimization_level", "all")
    if any(p != "CPUExecutionProvider" for p in providers):
        return "all"
    if level not in GRAPH_OPTIMIZATION_LEVELS:
        raise BackendUnavailable(f"{record.file}: record asks for unknown graph optimization level '{level}'")
    return level


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(
        self,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        intra_op_threads: int = 0,
        inter_op_threads: int = 1,
    ) -> None:
        self._requested = list(providers)
        self._intra = intra_op_threads
        self._inter = inter_op_threads
        self._session = None
        self._input_names: list[str] = []
        self.graph_optimization = "all"

    def load(self, record: Record, bundle_dir: Path) -> None:
        import onnxruntime as ort

        path = verified_artifact(record, bundle_dir)
        available = ort.get_available_providers()
        missing = [p for p in self._requested if p not in available]
        if missing:
            raise BackendUnavailable(
                f"{record.file}: ONNX Runtime providers {missing} are not available here "
                f"(available: {available})"
            )
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self._intra
        opts.inter_op_num_threads = self._inter
        self.graph_optimization = session_level(record, self._requested)
        opts.graph_optimization_level = graph_optimization_level(self.graph_optimization)
        opts.log_severity_level = 3
        # No busy-waiting workers: on small hosts they starve the other engines (and requests)
        # sharing the cores; the latency they save is below our per-call timings.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(path), sess_options=opts, providers=self._requested)
        actual = session.get_providers()
        if actual[: len(self._requested)] != self._requested:
            raise BackendUnavailable(
                f"{record.file}: asked ONNX Runtime for {self._requested} but the session runs on "
                f"{actual}; refusing the silent fallback"
            )
        self._session = session
        self._input_names = [i.name for i in session.get_inputs()]
        log.info("loaded %s on %s (graph optimization: %s)", record.file, actual, self.graph_optimization)

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._session is None:
            raise BackendUnavailable("onnxruntime backend used before load() or after close()")
        outputs = self._session.run(None, {n: feeds[n] for n in self._input_names})
        names = [o.name for o in self._session.get_outputs()]
        return dict(zip(names, outputs, strict=True))

    @property
    def providers(self) -> list[str]:
        return list(self._session.get_providers()) if self._session is not None else []

    def close(self) -> None:
        self._session = None
