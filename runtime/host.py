"""What this host can run: CPU features, CUDA, GPUs, TensorRT, ONNX Runtime providers.

Detection lives here and only here; everything else receives a `Host` value, so selection is a
pure function that tests can drive with simulated hosts.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Host:
    cpu_model: str = ""
    cores: int = 1
    cpu_flags: tuple[str, ...] = ()
    onnxruntime_providers: tuple[str, ...] = ()
    cuda_available: bool = False
    gpus: tuple[dict[str, Any], ...] = ()  # name, compute capability
    tensorrt_version: str | None = None
    cuda_version: str | None = None
    driver_version: str | None = None
    library_versions: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_INTERESTING_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16",
                      "amx_int8", "avx_vnni", "f16c")


def _cpuinfo() -> tuple[str, tuple[str, ...]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor(), ()
    model, flags = platform.processor(), ()
    for line in text.splitlines():
        if line.startswith("model name") and model in ("", platform.processor()):
            model = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            present = set(line.split(":", 1)[1].split())
            flags = tuple(f for f in _INTERESTING_FLAGS if f in present)
            break
    return model, flags


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def detect() -> Host:
    """Probe this machine (cheap: no engine is built, no GPU memory is touched beyond a query)."""
    import onnxruntime as ort
    import torch

    model, flags = _cpuinfo()
    gpus: list[dict[str, Any]] = []
    cuda = bool(torch.cuda.is_available())
    if cuda:
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            gpus.append({"name": torch.cuda.get_device_name(i), "compute_capability": f"{major}.{minor}"})
    versions = {d: v for d in ("torch", "onnx", "onnxruntime", "tensorrt", "cuda-python")
                if (v := _version(d))}
    return Host(
        cpu_model=model, cores=os.cpu_count() or 1, cpu_flags=flags,
        onnxruntime_providers=tuple(ort.get_available_providers()), cuda_available=cuda,
        gpus=tuple(gpus), tensorrt_version=_version("tensorrt"),
        cuda_version=torch.version.cuda if cuda else None, library_versions=versions,
    )
