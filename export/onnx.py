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
from voxport.models.graph import GraphSpec
from voxport.models.vocoder import UPSAMPLING
from voxport.pipeline.passes import Candidate, PassContext
from voxport.pipeline.records import Record, TensorSpec
from voxport.runtime.backends.onnxruntime import OnnxRuntimeBackend, SessionSettings

log = logging.getLogger(__name__)

EXPORTERS = ("torchscript", "dynamo")


@dataclass(frozen=True)
class OnnxExportConfig:
    exporter: str = "torchscript"
    opset: int = 17
    # The vocoder's upsamplers in the graph: `transposed` (ConvTranspose, as trained) or `polyphase`
    # (the same function as a stride-1 Conv + interleave, which ONNX Runtime can run in INT8:
    # models/vocoder.py PolyphaseUpsample). Graphs without upsamplers have nothing to rewrite.
    upsampling: str = "transposed"

    def __post_init__(self) -> None:
        if self.exporter not in EXPORTERS:
            raise ConfigError(f"export.exporter must be one of {EXPORTERS}, got '{self.exporter}'")
        if not 13 <= self.opset <= 21:
            raise ConfigError(f"export.opset must be in 13..21, got {self.opset}")
        if self.upsampling not in UPSAMPLING:
            raise ConfigError(f"export.upsampling must be one of {UPSAMPLING}, got '{self.upsampling}'")


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


def ort_runner(path: Path, threads: int = 0, optimization: str = "all",
               ) -> Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]:
    """A CPU ONNX Runtime session over feeds keyed by input name (validation inside a stage),
    opened by the runtime's backend so what a stage measures is what serving runs."""
    settings = SessionSettings(graph_optimization=optimization, intra_op_threads=threads)
    return OnnxRuntimeBackend.from_file(path, settings).infer


def torch_half_runner(spec: GraphSpec) -> Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]:
    """The graph in torch float16 on CPU: float inputs cast to half, float outputs back to float32."""
    import copy

    module = copy.deepcopy(spec.module).half().eval()

    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = []
        for name in spec.input_names:
            t = torch.from_numpy(np.ascontiguousarray(feeds[name]))
            args.append(t.half() if t.is_floating_point() else t)
        with torch.inference_mode():
            outs = module(*args)
        return {n: (o.float() if o.is_floating_point() else o).numpy()
                for n, o in zip(spec.output_names, outs, strict=True)}

    return run


# ---------------------------------------------------------------------------------------------
# The pass `onnx_export`: every graph of a PyTorch FP32 model (the original, or one a pass made)

CONFIG = OnnxExportConfig
# Size figures of a pruned parent that its export carries (the summary shows the FLOP cut).
SIZE_FIGURES = ("flops_per_audio_second", "params", "parent_flops_per_audio_second", "parent_params",
                "flops_reduction", "params_reduction")


def transform(parent: Record, config: OnnxExportConfig, ctx: PassContext) -> Candidate:
    """One FP32 ONNX file per graph of the torch `parent` (or the graph `config.graph` names),
    rebuilt from the saved artifact exactly as the runtime will, rather than from a live module.
    The engine judges them together (the synthesizer's three graphs run one host loop)."""
    from voxport.models import registry

    if parent.format != "torch" or parent.precision != "fp32":
        raise ConfigError(f"onnx_export needs a PyTorch FP32 parent, got {parent.file} ({parent.format} "
                          f"{parent.precision})")
    module = registry.load_torch_artifact(ctx.bundle_dir / parent.file, parent.model)
    model = dict(parent.model)
    if config.upsampling != "transposed" and model["network"] == "hifigan":
        # The record says which form the graph holds, so whatever rebuilds its PyTorch twin (the
        # INT8 search's layer emulation) rebuilds the same layers; parity is still measured
        # against the parent as trained.
        model["graph_form"] = {"upsampling": config.upsampling}
    specs = registry.graph_specs(module, model)
    stem = Path(parent.file).stem.removesuffix("_fp32")
    records = []
    for name, spec in specs.items():
        if parent.graph != "*" and name != parent.graph:
            continue
        # The original's graphs are `<graph stem>_fp32.onnx`; a model a pass made keeps its name.
        file = f"{spec.artifact_stem}_fp32.onnx" if parent.stage == "source" else f"{stem}.onnx"
        if parent.stage != "source" and len(specs) > 1:
            file = f"{stem}_{name}.onnx"
        path = export_graph(spec, ctx.bundle_dir / file, config)
        ins, outs = tensor_specs(spec)
        records.append(Record(
            component=parent.component, graph=name, format="onnx", precision="fp32", file=path.name, sha256="",
            weights=parent.weights, stage="export", inputs=ins, outputs=outs, parent=parent.file,
            parent_sha256=parent.sha256, model=model, contract=parent.contract, sparsity=parent.sparsity,
            config={"exporter": config.exporter, "opset": config.opset,
                    **({"upsampling": config.upsampling} if "graph_form" in model else {})},
            speed={k: v for k, v in (parent.speed or {}).items() if k in SIZE_FIGURES}))
    return Candidate(records, {"label": f"{parent.component} ONNX FP32"})
