"""TensorRT backend: runs a serialized engine on CUDA, bound by tensor name.

An engine is tied to the GPU, TensorRT, CUDA and driver it was built with. The record carries that
fingerprint; the engine is loaded only if it matches this host, checked BEFORE the file is read,
so a mismatched engine is never deserialized. Buffers are torch CUDA tensors (torch is always
installed; pycuda does not build without libcuda), and the run is `execute_async_v3` on a torch
stream. TensorRT itself is imported only here, on first load.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from voxport.errors import BackendUnavailable, ConfigError
from voxport.export.profiles import shape_problem
from voxport.pipeline.records import Record
from voxport.runtime.backends.base import Backend, verified_artifact
from voxport.runtime.host import Host, detect, fingerprint_mismatches

log = logging.getLogger(__name__)


def check_engine_host(record: Record, host: Host) -> None:
    """Refuse, with every reason, an engine built for another GPU / TensorRT / CUDA / driver."""
    if record.format != "trt":
        raise BackendUnavailable(f"{record.file}: not a TensorRT engine (format '{record.format}')")
    problems = fingerprint_mismatches(record.host, host.fingerprint())
    if problems:
        raise BackendUnavailable(f"{record.file}: engine fingerprint does not match this host: " + "; ".join(problems))


def _torch_dtype(trt: Any, dtype: Any) -> Any:
    import torch

    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
             trt.int8: torch.int8, trt.bool: torch.bool}
    for name, torch_type in (("int64", torch.int64), ("bfloat16", torch.bfloat16), ("uint8", torch.uint8)):
        if hasattr(trt, name):  # newer TensorRT releases only
            table[getattr(trt, name)] = torch_type
    if dtype not in table:
        raise BackendUnavailable(f"engine tensor type {dtype} has no torch equivalent")
    return table[dtype]


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, host: Host | None = None, device: int = 0) -> None:
        self._host = host
        self._device = device
        self._engine: Any = None
        self._runtime: Any = None
        self._context: Any = None
        self._trt: Any = None
        self._stream: Any = None
        self._inputs: list[str] = []
        self._outputs: list[str] = []
        self._profiles: dict[str, Any] = {}
        self._label = ""
        self._keep_alive: list[Any] = []
        # One execution context holds one set of shapes and addresses: concurrent callers (the
        # service's workers and vocoder lanes) take turns; the GPU serializes their runs anyway.
        self._lock = threading.Lock()

    def load(self, record: Record, bundle_dir: Path) -> None:
        host = self._host or detect()
        check_engine_host(record, host)  # before touching the file
        path = verified_artifact(record, bundle_dir)
        try:
            import tensorrt as trt
            import torch
        except ImportError as exc:  # fingerprint matched a simulated or half-installed host
            raise BackendUnavailable(f"{record.file}: TensorRT cannot be imported here ({exc})") from None
        if not torch.cuda.is_available():
            raise BackendUnavailable(f"{record.file}: no CUDA device for the engine")
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise BackendUnavailable(f"{record.file}: TensorRT could not deserialize the engine (see its log)")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self._inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        expected_in, expected_out = [t.name for t in record.inputs], [t.name for t in record.outputs]
        if sorted(self._inputs) != sorted(expected_in) or sorted(self._outputs) != sorted(expected_out):
            raise BackendUnavailable(f"{record.file}: engine tensors {self._inputs} -> {self._outputs} differ "
                                     f"from the record's {expected_in} -> {expected_out}")
        self._trt, self._runtime, self._engine = trt, runtime, engine  # the runtime outlives its engine
        self._context = engine.create_execution_context()
        self._stream = torch.cuda.Stream(device=self._device)
        self._profiles = dict(record.host.get("profiles") or {})
        self._label = record.file
        log.info("loaded %s on %s", record.file, host.describe())

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._context is None:
            raise BackendUnavailable("tensorrt backend used before load() or after close()")
        import torch

        with self._lock, torch.cuda.stream(self._stream):  # copies, allocations and the run on one stream
            outputs = self._enqueue(feeds, torch.device("cuda", self._device))
            self._stream.synchronize()
        return {name: (t.float() if t.dtype in (torch.float16, torch.bfloat16) else t).cpu().numpy()
                for name, t in outputs.items()}

    def _enqueue(self, feeds: Mapping[str, np.ndarray], device: Any) -> dict[str, Any]:
        import torch

        trt, engine, context = self._trt, self._engine, self._context
        self._keep_alive = []  # input buffers must outlive the asynchronous run
        for name in self._inputs:
            if name not in feeds:
                raise ConfigError(f"{self._label}: missing input '{name}'")
            array = np.ascontiguousarray(feeds[name])
            problem = shape_problem(self._profiles, name, array.shape) if self._profiles else None
            if problem:
                raise ConfigError(f"{self._label}: {problem}")
            tensor = torch.from_numpy(array).to(device, _torch_dtype(trt, engine.get_tensor_dtype(name)))
            if not context.set_input_shape(name, tuple(tensor.shape)):
                raise ConfigError(f"{self._label}: TensorRT refused shape {tuple(tensor.shape)} for '{name}'")
            context.set_tensor_address(name, tensor.data_ptr())
            self._keep_alive.append(tensor)
        outputs = {}
        for name in self._outputs:
            shape = tuple(context.get_tensor_shape(name))
            out = torch.empty(shape, dtype=_torch_dtype(trt, engine.get_tensor_dtype(name)), device=device)
            context.set_tensor_address(name, out.data_ptr())
            outputs[name] = out
        if not context.execute_async_v3(self._stream.cuda_stream):
            raise BackendUnavailable(f"{self._label}: TensorRT execution failed (see its log)")
        return outputs

    @property
    def providers(self) -> list[str]:
        if self._engine is None:
            return []
        gpu = (self._host.gpus[0]["name"] if self._host and self._host.gpus else f"cuda:{self._device}")
        return [f"TensorRT {self._trt.__version__} on {gpu}"]

    def close(self) -> None:
        self._context = None
        self._engine = None
        self._runtime = None
        self._stream = None
        self._keep_alive = []
