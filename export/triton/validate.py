"""Offline checks of a written Triton model repository, with no Triton server.

- Every `config.pbtxt` parses with the protobuf schema `tritonclient` ships
  (`tritonclient.grpc.model_config_pb2.ModelConfig` + `google.protobuf.text_format`), when
  `tritonclient` is installed (the `triton` / `test` extras); without it the parse is skipped with
  a log line and the graph checks below run on the configs as written.
- For a graph model: every config input/output exists in its ONNX graph with the same data type and
  rank (the batch axis counted when `max_batch_size` > 0), fixed dims equal and symbolic ones -1;
  every graph input is either a config input or a state input; every state pair exists in the graph.
Every mismatch found is listed in one `PackageError`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from voxport.errors import PackageError
from voxport.export.triton.configs import TensorIO, graph_io

log = logging.getLogger(__name__)


def protobuf_schema() -> Any | None:
    """tritonclient's ModelConfig message class, or None when tritonclient is not installed."""
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        return None
    return model_config_pb2.ModelConfig


def parse_config(text: str, where: str = "config.pbtxt") -> dict[str, Any] | None:
    """The config as a dict (proto field names) parsed by tritonclient's schema; None without tritonclient.
    A text the schema refuses is a PackageError naming the file and the parser's message."""
    schema = protobuf_schema()
    if schema is None:
        return None
    from google.protobuf import json_format, text_format

    try:
        message = text_format.Parse(text, schema())
    except text_format.ParseError as exc:
        raise PackageError(f"{where} does not parse with Triton's ModelConfig schema: {exc}") from None
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def _dims(entry: Mapping[str, Any]) -> list[int]:
    return [int(d) for d in entry.get("dims", [])]  # MessageToDict writes int64 as strings


def check_graph_config(config: Mapping[str, Any], inputs: Sequence[TensorIO], outputs: Sequence[TensorIO]) -> list[str]:
    """Every way `config` (proto field names) disagrees with the graph's inputs and outputs."""
    name = config.get("name", "?")
    batched = int(config.get("max_batch_size", 0)) > 0
    problems: list[str] = []
    graph = {"input": {t.name: t for t in inputs}, "output": {t.name: t for t in outputs}}

    def compare(entry: Mapping[str, Any], tensor: TensorIO, kind: str) -> None:
        dims = _dims(entry)
        shape = tensor.shape[1:] if batched else tensor.shape
        if str(entry.get("data_type")) != tensor.data_type:
            problems.append(f"{name}: {kind} {tensor.name} is {entry.get('data_type')} in the config, "
                            f"{tensor.data_type} in the graph")
        if batched and (not tensor.shape or isinstance(tensor.shape[0], int)):
            problems.append(f"{name}: {kind} {tensor.name} has no symbolic first axis to batch "
                            f"({list(tensor.shape)}) but max_batch_size is {config.get('max_batch_size')}")
        if len(dims) != len(shape):
            problems.append(f"{name}: {kind} {tensor.name} has rank {len(dims) + batched} in the config "
                            f"(dims {dims}{' + batch' if batched else ''}), {len(tensor.shape)} in the graph")
            return
        for d, g in zip(dims, shape, strict=True):
            if (isinstance(g, int) and d != g) or (not isinstance(g, int) and d != -1):
                problems.append(f"{name}: {kind} {tensor.name} dims {dims} do not match the graph's {list(shape)}")
                break

    for kind in ("input", "output"):
        for entry in config.get(kind, []):
            tensor = graph[kind].get(entry["name"])
            if tensor is None:
                problems.append(f"{name}: config {kind} '{entry['name']}' is not a {kind} of the graph")
            else:
                compare(entry, tensor, kind)
    states = config.get("sequence_batching", {}).get("state", [])
    for state in states:
        i, o = state.get("input_name"), state.get("output_name")
        if i not in graph["input"] or o not in graph["output"]:
            problems.append(f"{name}: state pair {i} -> {o} is not an input/output pair of the graph")
            continue
        compare(state, graph["input"][i], "state input")
        compare(state, graph["output"][o], "state output")
        initial = state.get("initial_state", [])  # repeated in model_config.proto; one is used
        if len(initial) != 1 or not (initial[0].get("zero_data") or initial[0].get("data_file")):
            problems.append(f"{name}: state {i} needs one initial state (zero_data or data_file)")
        elif any(d < 1 for d in _dims(initial[0])):
            problems.append(f"{name}: state {i} initial dims {_dims(initial[0])} must be fixed")
    fed = {e["name"] for e in config.get("input", [])} | {s.get("input_name") for s in states}
    missing = sorted(set(graph["input"]) - fed)
    if missing:
        problems.append(f"{name}: graph input(s) {missing} are neither config inputs nor state inputs")
    return problems


def validate_repository(root: Path, graphs: Mapping[str, Path],
                        written: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, bool]:
    """Check every model directory of `root`; `graphs` maps model name -> its ONNX graph (a plan's
    parent graph for TensorRT); `written` the config dicts the files were written from, checked
    against the graphs when tritonclient cannot parse the files. Returns {model: parsed by
    tritonclient's schema}. Raises PackageError listing every problem."""
    problems: list[str] = []
    parsed: dict[str, bool] = {}
    if protobuf_schema() is None:
        log.info("tritonclient is not installed: config.pbtxt files are not parsed with Triton's schema "
                 "(pip install 'voxport[triton]' to check them); graph checks still run")
    for model_dir in sorted(p for p in Path(root).iterdir() if (p / "config.pbtxt").is_file()):
        text = (model_dir / "config.pbtxt").read_text()
        try:
            config = parse_config(text, f"{model_dir.name}/config.pbtxt")
        except PackageError as exc:
            problems.append(str(exc))
            continue
        parsed[model_dir.name] = config is not None
        if config is None and written is not None:
            config = written.get(model_dir.name)
        if config is not None and config.get("name") != model_dir.name:
            problems.append(f"{model_dir.name}/config.pbtxt names the model '{config.get('name')}'")
        if model_dir.name in graphs and config is not None:
            problems += check_graph_config(config, *graph_io(graphs[model_dir.name]))
    missing = sorted(set(graphs) - {p.name for p in Path(root).iterdir()})
    if missing:
        problems.append(f"model(s) {missing} have no directory in {root}")
    if problems:
        raise PackageError(f"{len(problems)} problem(s) in the Triton repository: " + "; ".join(problems))
    return parsed
