"""What this host can run: CPU features, CUDA, GPUs, TensorRT, ONNX Runtime providers.

Detection lives here and only here; everything else receives a `Host` value, so selection is a
pure function that tests can drive with simulated hosts. `Host.fingerprint()` is what a TensorRT
engine is tied to, and `fingerprint_mismatches` the one rule deciding whether an engine may load.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from voxport.errors import BackendUnavailable


@dataclass(frozen=True)
class Host:
    cpu_model: str = ""
    cores: int = 1
    cpu_flags: tuple[str, ...] = ()
    onnxruntime_providers: tuple[str, ...] = ()
    cuda_available: bool = False
    gpus: tuple[dict[str, Any], ...] = ()  # name, compute capability, memory (device 0 serves)
    tensorrt_version: str | None = None
    tensorrt_error: str | None = None  # installed but not importable (e.g. a stub wheel)
    cuda_version: str | None = None  # CUDA runtime torch was built with
    driver_version: str | None = None  # NVIDIA driver release, e.g. "550.54.14"
    library_versions: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def tensorrt_usable(self) -> bool:
        return bool(self.tensorrt_version) and self.tensorrt_error is None and self.cuda_available

    @property
    def onnxruntime_cuda(self) -> bool:
        # onnxruntime-gpu lists CUDA even where its libraries cannot load; the backend checks the
        # session's providers after creating it, this only says it is worth trying.
        return self.cuda_available and "CUDAExecutionProvider" in self.onnxruntime_providers

    @property
    def native_bf16(self) -> bool:
        return any(f in self.cpu_flags for f in ("avx512_bf16", "amx_bf16"))

    def fingerprint(self) -> dict[str, Any]:
        """What a TensorRT engine built here is tied to (device 0: the device engines run on)."""
        gpu = self.gpus[0] if self.gpus else {}
        return {"gpu": gpu.get("name"), "compute_capability": gpu.get("compute_capability"),
                "tensorrt": self.tensorrt_version, "cuda": self.cuda_version, "driver": self.driver_version}

    def describe(self) -> str:
        """One line: CPU, GPU and engines, for logs and `voxport doctor`."""
        gpu = ", ".join(f"{g['name']} (sm {g['compute_capability']})" for g in self.gpus) or "no GPU"
        trt = self.tensorrt_version or "no TensorRT"
        return f"{self.cpu_model} x{self.cores}; {gpu}; CUDA {self.cuda_version or '-'}; {trt}"




def _numbers(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version))


def fingerprint_mismatches(engine: Mapping[str, Any], host: Mapping[str, Any]) -> list[str]:
    """Why an engine built with fingerprint `engine` must not load on `host` (empty: it may).

    TensorRT engines are specific to the GPU model, its compute capability and the exact TensorRT
    version that built them; the CUDA major version must agree; the driver may be newer than the
    one the engine was built with, never older.
    """
    problems = []
    if not host.get("gpu"):
        return ["this host has no CUDA GPU"]
    if not host.get("tensorrt"):
        return ["TensorRT is not usable on this host"]
    for key in ("gpu", "compute_capability", "tensorrt"):
        if engine.get(key) != host.get(key):
            problems.append(f"{key} {engine.get(key)!r} (engine) != {host.get(key)!r} (host)")
    built_cuda, host_cuda = str(engine.get("cuda") or ""), str(host.get("cuda") or "")
    if _numbers(built_cuda)[:1] != _numbers(host_cuda)[:1]:
        problems.append(f"CUDA {built_cuda or '?'} (engine) and {host_cuda or '?'} (host) differ in major version")
    built_drv, host_drv = str(engine.get("driver") or ""), str(host.get("driver") or "")
    if built_drv and (not host_drv or _numbers(host_drv) < _numbers(built_drv)):
        problems.append(f"driver {host_drv or 'unknown'} (host) is older than {built_drv} (engine)")
    return problems


_INTERESTING_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
                      "avx512_fp16", "avx_vnni", "amx_bf16", "amx_int8", "amx_tile")


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


def parse_driver_version(text: str) -> str | None:
    """The driver release from /proc/driver/nvidia/version ("... Kernel Module  550.54.14  ...")."""
    match = re.search(r"Kernel Module(?: for \S+)?\s+(\d+(?:\.\d+)+)", text)
    return match.group(1) if match else None


def _driver_version() -> str | None:
    try:
        return parse_driver_version(Path("/proc/driver/nvidia/version").read_text())
    except OSError:
        return None


def _tensorrt() -> tuple[str | None, str | None]:
    """(version, error): (None, None) when absent; an error when installed but not importable."""
    if importlib.util.find_spec("tensorrt") is None:
        return None, None
    try:
        import tensorrt
    except Exception as exc:  # a stub wheel fails with a missing libnvonnxparser, say so verbatim
        installed = _version("tensorrt") or _version("tensorrt-cu12") or _version("tensorrt-cu13") or "?"
        return installed, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return str(tensorrt.__version__), None


# Present wherever an NVIDIA driver is: Linux hosts and GPU containers, WSL2 (/dev/dxg), Jetson.
_NVIDIA_DRIVER_PATHS = ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg",
                        "/dev/nvhost-ctrl-gpu")


def _cuda_probe() -> Any:
    """The torch module to ask about CUDA, or None where CUDA cannot be there.

    Importing torch costs seconds and hundreds of MB, and a process serving ONNX Runtime artifacts
    otherwise never loads it; so without an NVIDIA driver on the machine (nothing for CUDA to run
    on) the answer is "no CUDA" without torch. Where a driver is present torch still probes:
    its CUDA runtime version is part of the fingerprint TensorRT engines were built against, and
    the TensorRT backend allocates through torch anyway. Already imported, it is simply asked.
    """
    torch = sys.modules.get("torch")
    if torch is not None:
        return torch
    if not any(os.path.exists(p) for p in _NVIDIA_DRIVER_PATHS) or importlib.util.find_spec("torch") is None:
        return None
    import torch

    return torch


def detect() -> Host:
    """Probe this machine (cheap: no engine is built, no GPU memory is touched beyond a query;
    torch is imported only where an NVIDIA driver is present, see `_cuda_probe`)."""
    import onnxruntime as ort

    model, flags = _cpuinfo()
    gpus: list[dict[str, Any]] = []
    torch = _cuda_probe()
    cuda = torch is not None and bool(torch.cuda.is_available())
    if cuda:
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append({"name": props.name, "compute_capability": f"{props.major}.{props.minor}",
                         "memory_mb": int(props.total_memory // (1 << 20))})
    trt_version, trt_error = _tensorrt()
    versions = {d: v for d in ("torch", "onnx", "onnxruntime", "onnxruntime-gpu", "openvino", "tensorrt", "cuda-python")
                if (v := _version(d))}
    return Host(
        cpu_model=model, cores=os.cpu_count() or 1, cpu_flags=flags,
        onnxruntime_providers=tuple(ort.get_available_providers()), cuda_available=cuda,
        gpus=tuple(gpus), tensorrt_version=trt_version, tensorrt_error=trt_error,
        cuda_version=torch.version.cuda if cuda else None,
        driver_version=_driver_version() if cuda else None, library_versions=versions,
    )


# What a build target may need from the host, and how to say it is missing.
REQUIREMENTS = {
    "cuda": (lambda h: h.cuda_available, "no CUDA device (torch.cuda.is_available() is False)"),
    "tensorrt": (lambda h: bool(h.tensorrt_version) and h.tensorrt_error is None,
                 "TensorRT is not installed (pip install 'voxport[gpu]' on a CUDA host)"),
    "onnxruntime-cuda": (lambda h: "CUDAExecutionProvider" in h.onnxruntime_providers,
                         "ONNX Runtime has no CUDAExecutionProvider (install onnxruntime-gpu instead of onnxruntime)"),
}


def missing_requirements(requires: Iterable[str], host: Host) -> list[str]:
    """Each requirement this host does not meet, as a phrase (empty: all met)."""
    missing = []
    for name in requires:
        if name not in REQUIREMENTS:
            raise BackendUnavailable(f"unknown host requirement '{name}' (known: {', '.join(REQUIREMENTS)})")
        ok, why = REQUIREMENTS[name]
        if not ok(host):
            if name == "tensorrt" and host.tensorrt_error:
                why = f"TensorRT {host.tensorrt_version} is installed but cannot be imported ({host.tensorrt_error})"
            missing.append(why)
    return missing


def require_target(target: Mapping[str, Any], host: Host | None = None,
                   stages: Mapping[str, Iterable[str]] | None = None) -> None:
    """Refuse, in one line and before any work, a build target (or planned stage kinds, each with
    the host capabilities it requires: pipeline/passes.py) this host cannot serve."""
    own = set(target.get("requires") or [])
    needs = {kind: tuple(req) for kind, req in (stages or {}).items()}
    kinds = sorted(k for k, req in needs.items() if not set(req) <= own)  # beyond the target's
    needed = [*(target.get("requires") or []), *(r for k in kinds for r in needs[k])]
    requires = list(dict.fromkeys(needed))  # in order, once each
    if not requires:
        return
    missing = missing_requirements(requires, host or detect())
    if missing:
        what = f"target '{target.get('name')}'" + (f" with {', '.join(kinds)} stages" if kinds else "")
        raise BackendUnavailable(f"{what} cannot be built on this host: " + "; ".join(missing))
