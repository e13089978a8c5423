"""A stand-in for the parts of Triton that voxport_tts/model.py relies on, to run it without a server.

Not a server and not a mock of our code: a small emulation of Triton's side of the contract, over a
written repository's real `model.onnx` files, opened with the runtime's ONNX Runtime backend:

- `triton_python_backend_utils` (Tensor, InferenceRequest(...).exec(), InferenceResponse,
  TritonError, Logger, get_input_tensor_by_name / get_output_tensor_by_name, the request and
  response flags) as a module to put in `sys.modules` before importing model.py;
- each BLS call is checked against the callee's parsed config.pbtxt as Triton checks a request
  (known input names, data types, ranks, fixed dims, max_batch_size, requested outputs) and run on
  the model's ONNX graph;
- implicit state, as Triton's sequence batcher keeps it: a sequence must start with
  SEQUENCE_START, which sets every state to its zero `initial_state`; each request gets the state
  inputs from the previous request's state outputs; SEQUENCE_END forgets the sequence; a request
  of an unknown sequence, or without a correlation id, is an error;
- the decoupled response sender of the Python model, which must send exactly one FINAL flag.

Used by tests/test_package_triton.py to run the BLS loop against the packaged graphs and compare
its audio with `voxport clone` (runtime.cloner.VoiceCloner).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from voxport.errors import PackageError
from voxport.export.triton.validate import parse_config

SEQUENCE_START, SEQUENCE_END = 1, 2  # TRITONSERVER_REQUEST_FLAG_SEQUENCE_*
RESPONSE_FINAL = 1  # TRITONSERVER_RESPONSE_COMPLETE_FINAL
MEMORY_CPU = 0  # TRITONSERVER_MEMORY_CPU
_NUMPY = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_FP64": np.float64, "TYPE_INT64": np.int64,
          "TYPE_INT32": np.int32, "TYPE_INT8": np.int8, "TYPE_UINT8": np.uint8, "TYPE_BOOL": np.bool_,
          "TYPE_STRING": np.object_}


class Tensor:
    def __init__(self, name: str, array: Any) -> None:
        self._name, self._array = name, np.asarray(array)

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class TritonError:
    def __init__(self, message: str) -> None:
        self._message = message

    def message(self) -> str:
        return self._message


class InferenceResponse:
    def __init__(self, output_tensors: list[Tensor] | None = None, error: TritonError | None = None) -> None:
        self._outputs, self._error = list(output_tensors or []), error

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error

    def output_tensors(self) -> list[Tensor]:
        return self._outputs


class Server:
    """The graph models of one repository: configs parsed with tritonclient's schema, ONNX sessions
    opened on first use, implicit state per correlation id."""

    def __init__(self, repository: Path) -> None:
        self.root = Path(repository)
        self.configs: dict[str, dict[str, Any]] = {}
        for path in sorted(self.root.glob("*/config.pbtxt")):
            config = parse_config(path.read_text(), str(path))
            if config is None:
                raise PackageError("the Triton stand-in needs tritonclient to parse config.pbtxt files")
            self.configs[config["name"]] = config
        self._sessions: dict[str, Any] = {}
        self.sequences: dict[tuple[str, int], dict[str, np.ndarray]] = {}
        self.calls: dict[str, int] = {}

    def session(self, model: str) -> Any:
        from voxport.runtime.backends.onnxruntime import open_session

        if model not in self._sessions:
            self._sessions[model] = open_session(self.root / model / "1" / "model.onnx")
        return self._sessions[model]

    def _check(self, model: str, config: Mapping[str, Any], inputs: Mapping[str, np.ndarray],
               requested: list[str]) -> str | None:
        batched = int(config.get("max_batch_size", 0))
        declared = {e["name"]: e for e in config.get("input", [])}
        for name, array in inputs.items():
            entry = declared.get(name)
            if entry is None:
                return f"unexpected inference input '{name}' for model '{model}'"
            if array.dtype != np.dtype(_NUMPY[entry["data_type"]]):
                return f"input '{name}' of model '{model}' is {array.dtype}, the config says {entry['data_type']}"
            dims = [int(d) for d in entry.get("dims", [])]
            shape = list(array.shape[1:] if batched else array.shape)
            if batched and not 1 <= array.shape[0] <= batched:
                return f"input '{name}' batch size {array.shape[0]} exceeds max_batch_size {batched} of '{model}'"
            if len(shape) != len(dims) or any(d not in (-1, s) for d, s in zip(dims, shape, strict=True)):
                return f"input '{name}' of model '{model}' has shape {list(array.shape)}, the config says {dims}"
        missing = [n for n, e in declared.items() if n not in inputs and not e.get("optional")]
        if missing:
            return f"model '{model}' expects input(s) {missing}"
        outputs = {e["name"] for e in config.get("output", [])}
        unknown = [n for n in requested if n not in outputs]
        return f"unknown output(s) {unknown} requested from '{model}'" if unknown else None

    def infer(self, model: str, inputs: Mapping[str, np.ndarray], requested: list[str], correlation_id: int = 0,
              flags: int = 0) -> InferenceResponse:
        config = self.configs.get(model)
        if config is None:
            return InferenceResponse(error=TritonError(f"model '{model}' is not in the repository"))
        problem = self._check(model, config, inputs, requested)
        if problem:
            return InferenceResponse(error=TritonError(problem))
        feeds = dict(inputs)
        states = config.get("sequence_batching", {}).get("state", [])
        key = (model, int(correlation_id))
        if states:
            if not correlation_id:
                return InferenceResponse(error=TritonError(f"'{model}' is stateful: a correlation id is required"))
            if flags & SEQUENCE_START:
                self.sequences[key] = {
                    s["input_name"]: np.zeros([int(d) for d in s["initial_state"][0]["dims"]],
                                              dtype=_NUMPY[s["data_type"]]) for s in states}
            elif key not in self.sequences:
                return InferenceResponse(error=TritonError(f"sequence {correlation_id} of '{model}' was not started"))
            feeds.update(self.sequences[key])
        names = requested + [s["output_name"] for s in states if s["output_name"] not in requested]
        values = self.session(model).run(names, feeds)
        out = dict(zip(names, values, strict=True))
        self.calls[model] = self.calls.get(model, 0) + 1
        if states:
            self.sequences[key] = {s["input_name"]: out[s["output_name"]] for s in states}
            if flags & SEQUENCE_END:
                del self.sequences[key]
        return InferenceResponse([Tensor(n, out[n]) for n in requested])


class ResponseSender:
    def __init__(self) -> None:
        self.responses: list[InferenceResponse] = []
        self.final = 0

    def send(self, response: InferenceResponse | None = None, flags: int = 0) -> None:
        if self.final:
            raise PackageError("a response was sent after the FINAL flag")
        if response is not None:
            self.responses.append(response)
        if flags & RESPONSE_FINAL:
            self.final += 1


class Request:
    """A client request to the Python model, checked against its config like a BLS call."""

    def __init__(self, inputs: Mapping[str, Any]) -> None:
        self.inputs = {name: Tensor(name, value) for name, value in inputs.items()}
        self.sender = ResponseSender()

    def get_response_sender(self) -> ResponseSender:
        return self.sender


def utils_module(server: Server) -> types.ModuleType:
    """A `triton_python_backend_utils` whose BLS calls go to `server`."""
    module = types.ModuleType("triton_python_backend_utils")

    class PreferredMemory:  # every tensor here is a host numpy array
        def __init__(self, memory_type: int, device_id: int = 0) -> None:
            if memory_type != MEMORY_CPU:
                raise PackageError("the stand-in only has host memory")

    class InferenceRequest:
        def __init__(self, model_name: str, requested_output_names: list[str], inputs: list[Tensor],
                     correlation_id: int = 0, flags: int = 0, preferred_memory: PreferredMemory | None = None,
                     **_: Any) -> None:
            self.model_name, self.requested = model_name, list(requested_output_names)
            self.inputs, self.correlation_id, self.flags = inputs, correlation_id, flags

        def exec(self) -> InferenceResponse:
            return server.infer(self.model_name, {t.name(): t.as_numpy() for t in self.inputs}, self.requested,
                                self.correlation_id, self.flags)

    class Logger:
        lines: list[str] = []

        @classmethod
        def log_info(cls, message: str) -> None:
            cls.lines.append(message)

        log_warn = log_error = log_verbose = log_info

    def get_input_tensor_by_name(request: Request, name: str) -> Tensor | None:
        return request.inputs.get(name)

    def get_output_tensor_by_name(response: InferenceResponse, name: str) -> Tensor | None:
        return next((t for t in response.output_tensors() if t.name() == name), None)

    module.__dict__.update(
        Tensor=Tensor, InferenceRequest=InferenceRequest, InferenceResponse=InferenceResponse,
        PreferredMemory=PreferredMemory, TRITONSERVER_MEMORY_CPU=MEMORY_CPU,
        TritonError=TritonError, Logger=Logger, get_input_tensor_by_name=get_input_tensor_by_name,
        get_output_tensor_by_name=get_output_tensor_by_name,
        TRITONSERVER_REQUEST_FLAG_SEQUENCE_START=SEQUENCE_START, TRITONSERVER_REQUEST_FLAG_SEQUENCE_END=SEQUENCE_END,
        TRITONSERVER_RESPONSE_COMPLETE_FINAL=RESPONSE_FINAL)
    return module


class PythonModel:
    """voxport_tts/1/model.py of a repository, loaded over the stand-in and initialized."""

    def __init__(self, repository: Path, name: str = "voxport_tts") -> None:
        self.server = Server(repository)
        self.config = self.server.configs[name]
        version_dir = Path(repository) / name / "1"
        path = list(sys.path)
        sys.modules["triton_python_backend_utils"] = utils_module(self.server)
        for module in [m for m in sys.modules if m == "voxport_frontend" or m.startswith("voxport_frontend.")]:
            del sys.modules[module]  # another repository's copy may be loaded
        try:
            spec = importlib.util.spec_from_file_location(f"triton_model_{name}", version_dir / "model.py")
            assert spec is not None and spec.loader is not None
            self.module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(self.module)
        finally:  # model.py holds what it imported; the process's import state is left as it was
            sys.path[:] = path
            sys.modules.pop("triton_python_backend_utils", None)
        self.model = self.module.TritonPythonModel()
        self.model.initialize({"model_name": name, "model_repository": str(Path(repository) / name),
                               "model_version": "1"})

    def request(self, **inputs: Any) -> list[InferenceResponse]:
        """One client request; returns every response the model sent (the last one carried FINAL)."""
        problem = self.server._check(self.config["name"], self.config, inputs, [])
        if problem:
            raise PackageError(problem)
        request = Request(inputs)
        if self.model.execute([request]) is not None:
            raise PackageError("a decoupled model's execute must return None")
        if request.sender.final != 1:
            raise PackageError(f"the model sent {request.sender.final} FINAL flags, not 1")
        return request.sender.responses
