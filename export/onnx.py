"""Export one PyTorch graph to ONNX, then prove it matches PyTorch on real inputs.

The exporter is chosen explicitly: since torch 2.9 `torch.onnx.export` defaults to the dynamo
exporter (which needs onnxscript); the TorchScript exporter is deprecated but mature and gives
the same graphs for these models. Both are offered, the choice is config.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from voxport.errors import ConfigError
from voxport.evaluate import compare
from voxport.models.graph import GraphSpec
from voxport.pipeline.records import TensorSpec

log = logging.getLogger(__name__)

EXPORTERS = ("torchscript", "dynamo")


@dataclass(frozen=True)
class OnnxExportConfig:
    exporter: str = "torchscript"
    opset: int = 17

    def __post_init__(self) -> None:
        if self.exporter not in EXPORTERS:
            raise ConfigError(f"export.exporter must be one of {EXPORTERS}, got '{self.exporter}'")
        if not 13 <= self.opset <= 21:
            raise ConfigError(f"export.opset must be in 13..21, got {self.opset}")


def export_graph(spec: GraphSpec, path: Path, cfg: OnnxExportConfig) -> Path:
    """Write `spec` as ONNX to `path` atomically and check it with `onnx.checker` (full check)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".onnx", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    module = spec.module.eval()
    try:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            # The TorchScript exporter's deprecation notice is known and chosen; hide only that.
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*TorchScript.*")
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            # RNNs without explicit initial states: ONNX Runtime zero-initialises them for any
            # batch size, and validation runs batches of several sizes, so the warning is moot.
            warnings.filterwarnings("ignore", message="Exporting a model to ONNX with a batch_size")
            if cfg.exporter == "torchscript":
                torch.onnx.export(
                    module, spec.example_inputs, str(tmp), dynamo=False,
                    opset_version=cfg.opset, input_names=list(spec.input_names),
                    output_names=list(spec.output_names), dynamic_axes=spec.dynamic_axes,
                    do_constant_folding=True,
                )
            else:
                _export_dynamo(spec, tmp, cfg)
        model = onnx.load(str(tmp))
        onnx.checker.check_model(model, full_check=True)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _export_dynamo(spec: GraphSpec, tmp: Path, cfg: OnnxExportConfig) -> None:
    dims: dict[str, torch.export.Dim] = {}
    dynamic_shapes = []
    for name in spec.input_names:
        axes = spec.dynamic_axes.get(name, {})
        dynamic_shapes.append(
            {axis: dims.setdefault(label, torch.export.Dim(label, min=1, max=1 << 16))
             for axis, label in axes.items()} or None
        )
    program = torch.onnx.export(
        spec.module, spec.example_inputs, dynamo=True, opset_version=cfg.opset,
        input_names=list(spec.input_names), output_names=list(spec.output_names),
        dynamic_shapes=tuple(dynamic_shapes),
    )
    program.save(str(tmp))


def tensor_specs(spec: GraphSpec) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Input and output specs for the record: dtype and shape with symbolic dynamic axes."""
    with torch.no_grad():
        outputs = spec.module(*spec.example_inputs)

    def describe(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> tuple[TensorSpec, ...]:
        specs = []
        for name, t in zip(names, tensors, strict=True):
            axes = spec.dynamic_axes.get(name, {})
            shape = tuple(axes.get(i, int(s)) for i, s in enumerate(t.shape))
            specs.append(TensorSpec(name, str(t.detach().numpy().dtype), shape))
        return tuple(specs)

    return describe(spec.input_names, spec.example_inputs), describe(spec.output_names, outputs)


def torch_runner(spec: GraphSpec) -> Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]:
    """Run a GraphSpec's module on numpy feeds keyed by input name (the backend contract)."""
    module = spec.module.eval()

    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in spec.input_names]
        with torch.inference_mode():
            outs = module(*args)
        return {n: o.detach().numpy() for n, o in zip(spec.output_names, outs, strict=True)}

    return run


def validate_graph(
    spec: GraphSpec,
    run_artifact: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]],
    feeds: Sequence[Mapping[str, np.ndarray]],
    tolerances: Mapping[str, compare.Tolerance],
) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Run the same feeds through PyTorch and the artifact; worst-case figures and failures."""
    run_ref = torch_runner(spec)
    per_input, failures = [], []
    for i, feed in enumerate(feeds):
        figures, fails = compare.compare(
            run_ref(feed), run_artifact(feed), tolerances, label=f"{spec.artifact_stem}[{i}] "
        )
        per_input.append(figures)
        failures.extend(fails)
    return compare.worst(per_input), failures


# ONNX Runtime graph optimization levels by the names records use (speed.session).
GRAPH_OPTIMIZATION_LEVELS = ("basic", "extended", "all")


def graph_optimization_level(name: str) -> object:
    """ORT's enum for `basic` / `extended` / `all` (`all` adds layout transforms such as NHWC)."""
    import onnxruntime as ort

    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    if name not in levels:
        raise ConfigError(f"unknown ONNX Runtime graph optimization level '{name}' (known: {', '.join(levels)})")
    return levels[name]


def ort_runner(path: Path, threads: int = 0, optimization: str = "all",
               ) -> Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]:
    """A CPU ONNX Runtime session over feeds keyed by input name (validation inside a stage)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = graph_optimization_level(optimization)
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    # Spinning worker threads would steal the cores PyTorch is timed on in the same process.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    in_names = [i.name for i in session.get_inputs()]
    out_names = [o.name for o in session.get_outputs()]

    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(out_names, session.run(None, {n: feeds[n] for n in in_names}), strict=True))

    return run
