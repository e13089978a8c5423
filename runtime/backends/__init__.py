"""One small interface, implemented by every engine (PyTorch, ONNX Runtime, OpenVINO, TensorRT)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from voxport.errors import BackendUnavailable, ConfigError
from voxport.pipeline.records import Record
from voxport.runtime.backends.base import Backend
from voxport.runtime.host import Host
from voxport.runtime.select import Selection

log = logging.getLogger(__name__)


def open_backend(record: Record, bundle_dir: Path, graph: str | None = None, **options) -> Backend:
    """Load `record` with the engine its format needs; `graph` picks one graph of a torch record."""
    if record.format == "torch":
        from voxport.runtime.backends.torch import TorchBackend

        backend: Backend = TorchBackend(graph=graph)
    elif record.format == "onnx":
        from voxport.runtime.backends.onnxruntime import OnnxRuntimeBackend

        backend = OnnxRuntimeBackend(**options)
    elif record.format == "trt":
        from voxport.runtime.backends.tensorrt import TensorRTBackend

        backend = TensorRTBackend(**options)
    elif record.format == "openvino":
        from voxport.runtime.backends.openvino import OpenVINOBackend

        backend = OpenVINOBackend(**options)
    else:  # Record validates formats; this guards hand-made records
        raise ConfigError(f"no backend for format '{record.format}'")
    backend.load(record, Path(bundle_dir))
    return backend


def open_first(choices: Sequence[Selection], bundle_dir: Path, graph: str, host: Host, threads: int = 0,
               strict: bool = False, cpu_arena: str | None = None) -> tuple[Backend, Selection, str]:
    """Load the first of `choices` (from runtime/select.py `ranked`) that loads on this host.

    One that fails (sha256 changed, ONNX Runtime fell back from CUDA, engine refused) gives way to
    the next, and the returned reason says which were refused and why; `strict` raises instead.
    An ONNX artifact opens with the session settings its record says the build timed it under, an
    OpenVINO IR with its record's precision; `threads` > 0 overrides only their intra-op threads
    (0 keeps the recorded value), `cpu_arena` ONNX Runtime's memory arena policy (a deployment
    choice, not a build measurement; None keeps the default).
    """
    refused: list[str] = []
    for choice in choices:
        record = choice.record
        options: dict[str, Any] = {}
        if record.format == "onnx":
            options = {"providers": choice.providers, "intra_op_threads": threads or None,
                       "cpu_arena": cpu_arena}
        elif record.format == "trt":
            options = {"host": host}
        elif record.format == "openvino":
            options = {"threads": threads or None}
        try:
            backend = open_backend(record, bundle_dir, graph=graph, **options)
        except BackendUnavailable as exc:
            if strict:
                raise
            log.warning("%s/%s: %s refused: %s", record.component, graph, record.file, exc)
            refused.append(f"{record.file} refused: {exc}")
            continue
        return backend, choice, choice.reason + (f" [{'; '.join(refused)}]" if refused else "")
    raise BackendUnavailable(f"graph '{graph}': no artifact could be loaded: {'; '.join(refused) or 'no choices'}")


__all__ = ["Backend", "open_backend", "open_first"]
