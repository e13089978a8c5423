"""Triton `config.pbtxt` from an ONNX graph: tensor names, types and shapes read from the graph itself.

A config is built as a plain dict whose keys are the field names of Triton's `ModelConfig` protobuf
(`model_config.proto`), then written in protobuf text format by `to_pbtxt`. Enum values (data types,
instance kinds) are `Sym` so they are written bare. Writing the text ourselves keeps packaging free of
`tritonclient`; `validate.py` parses what was written with the schema `tritonclient` ships when it
is installed.

Shapes: a graph's symbolic axes (`dim_param`, e.g. "batch", "text") become -1. A graph is batchable
(Triton `max_batch_size` > 0, the batch axis then left out of `dims`) only when every input and
output has the same symbolic axis first and nowhere else, with at least one more axis: the
synthesizer's encoder and decoder step take their prenet masks as (2, batch, ...), so Triton cannot
batch them and they get `max_batch_size: 0` with full dims.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from voxport.errors import PackageError

# ONNX TensorProto element types -> Triton data types (model_config.proto DataType).
_ONNX_TO_TRITON = {
    1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 4: "TYPE_UINT16", 5: "TYPE_INT16", 6: "TYPE_INT32",
    7: "TYPE_INT64", 8: "TYPE_STRING", 9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64", 12: "TYPE_UINT32",
    13: "TYPE_UINT64", 16: "TYPE_BF16",
}


class Sym(str):
    """A protobuf enum value (TYPE_FP32, KIND_CPU): written without quotes."""


@dataclass(frozen=True)
class TensorIO:
    """One graph input or output: name, Triton data type, and shape (ints, or axis names for symbolic axes)."""

    name: str
    data_type: str
    shape: tuple[int | str, ...]

    def dims(self, batched: bool) -> list[int]:
        """Triton `dims`: -1 for symbolic axes; without the batch axis when the model is batched."""
        shape = self.shape[1:] if batched else self.shape
        return [d if isinstance(d, int) else -1 for d in shape]


def graph_io(model: Any) -> tuple[list[TensorIO], list[TensorIO]]:
    """(inputs, outputs) of an ONNX model (a ModelProto or a path; external weights are not read)."""
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}

    def spec(value: Any) -> TensorIO:
        tensor = value.type.tensor_type
        if tensor.elem_type not in _ONNX_TO_TRITON:
            raise PackageError(f"graph tensor '{value.name}' has ONNX element type {tensor.elem_type}, "
                               "which Triton has no data type for")
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim)
        return TensorIO(value.name, _ONNX_TO_TRITON[tensor.elem_type], shape)

    inputs = [spec(v) for v in model.graph.input if v.name not in initializers]
    return inputs, [spec(v) for v in model.graph.output]


def batch_axis(tensors: Iterable[TensorIO]) -> str | None:
    """The symbolic axis every tensor has first (and nowhere else, with more axes after it), else None.

    Give it the axes the export declared (the record's tensor specs): quantizers rename the axes of
    the graphs they write (the static INT8 vocoder's `wav` is ('ConvTranspose_149_o0__d0', 1, ...)
    where its FP32 parent says ('batch', 1, 'samples')), though the tensor is the same."""
    tensors = list(tensors)
    first = {t.shape[0] if t.shape else None for t in tensors}
    if len(first) != 1:
        return None
    axis = first.pop()
    if not isinstance(axis, str) or axis == "?":
        return None
    ok = all(len(t.shape) >= 2 and axis not in t.shape[1:] for t in tensors)
    return axis if ok else None


def tensor_entries(tensors: Iterable[TensorIO], batched: bool, skip: Iterable[str] = ()) -> list[dict[str, Any]]:
    skip = set(skip)
    return [{"name": t.name, "data_type": Sym(t.data_type), "dims": t.dims(batched)}
            for t in tensors if t.name not in skip]


def instance_group(kind: str, count: int) -> list[dict[str, Any]]:
    if kind not in ("KIND_CPU", "KIND_GPU"):
        raise PackageError(f"instance kind must be KIND_CPU or KIND_GPU, got {kind}")
    return [{"count": int(count), "kind": Sym(kind)}]


def string_parameters(values: Mapping[str, Any]) -> list[dict[str, Any]]:
    """`parameters` map entries (Triton backends read them as strings)."""
    return [{"key": k, "value": {"string_value": str(v)}} for k, v in values.items()]


def graph_model_config(
    name: str, inputs: Sequence[TensorIO], outputs: Sequence[TensorIO], *, backend: str, max_batch_size: int,
    kind: str, count: int, states: Sequence[tuple[TensorIO, TensorIO, list[int]]] = (),
    parameters: Mapping[str, Any] | None = None, queue_delay_us: int = 500, idle_us: int = 5_000_000,
) -> dict[str, Any]:
    """The config of one graph model.

    max_batch_size > 0 (only for graphs whose declared axes `batch_axis` accepts) adds a dynamic batcher; `states`
    (input, output, initial dims) make it stateful: a sequence batcher whose implicit state Triton
    keeps between the requests of a sequence, zero at its start. State tensors are not listed as
    inputs or outputs (Triton feeds them; a client never sends them).
    """
    if max_batch_size > 0 and any(not t.shape or isinstance(t.shape[0], int) for t in [*inputs, *outputs]):
        raise PackageError(f"{name}: max_batch_size {max_batch_size} needs a symbolic batch axis first in every tensor")
    batched = max_batch_size > 0
    state_names = {s[0].name for s in states} | {s[1].name for s in states}
    config: dict[str, Any] = {
        "name": name, "backend": backend, "max_batch_size": int(max_batch_size),
        "input": tensor_entries(inputs, batched, state_names),
        "output": tensor_entries(outputs, batched, state_names),
    }
    if states:
        config["sequence_batching"] = {
            "max_sequence_idle_microseconds": int(idle_us),
            "state": [{
                "input_name": i.name, "output_name": o.name, "data_type": Sym(i.data_type),
                "dims": i.dims(batched),
                "initial_state": [{"data_type": Sym(i.data_type), "dims": list(initial), "zero_data": True,
                                   "name": f"zero {i.name}"}],
            } for i, o, initial in states],
        }
    elif batched:
        config["dynamic_batching"] = {"max_queue_delay_microseconds": int(queue_delay_us)}
    config["instance_group"] = instance_group(kind, count)
    if parameters:
        config["parameters"] = string_parameters(parameters)
    return config


def to_pbtxt(config: Mapping[str, Any], header: Sequence[str] = ()) -> str:
    """Protobuf text format of a config dict; `header` lines are written as `#` comments first."""
    lines = [f"# {line}".rstrip() for line in header]
    lines.extend(_fields(config, 0))
    return "\n".join(lines) + "\n"


def _scalar(value: Any) -> str:
    if isinstance(value, Sym):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))  # ASCII, C-style escapes: what protobuf text format reads
    raise PackageError(f"cannot write {type(value).__name__} {value!r} into a config.pbtxt")


def _fields(message: Mapping[str, Any], depth: int) -> list[str]:
    pad = "  " * depth
    lines: list[str] = []
    for key, value in message.items():
        if isinstance(value, Mapping):
            lines += [f"{pad}{key} {{", *_fields(value, depth + 1), f"{pad}}}"]
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            lines.append(f"{pad}{key} [")
            for i, item in enumerate(value):
                lines += [f"{pad}  {{", *_fields(item, depth + 2), f"{pad}  }}" + ("," if i < len(value) - 1 else "")]
            lines.append(f"{pad}]")
        elif isinstance(value, list):
            lines.append(f"{pad}{key}: [ {', '.join(_scalar(v) for v in value)} ]")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return lines
