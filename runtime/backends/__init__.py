"""One small interface, implemented by every engine (PyTorch, ONNX Runtime, TensorRT)."""

from __future__ import annotations

from pathlib import Path

from voxport.errors import ConfigError
from voxport.records import Record
from voxport.runtime.backends.base import Backend


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
    else:  # Record validates formats; this guards hand-made records
        raise ConfigError(f"no backend for format '{record.format}'")
    backend.load(record, Path(bundle_dir))
    return backend


__all__ = ["Backend", "open_backend"]
