"""Pass `openvino`: an ONNX artifact as an OpenVINO IR, served by OpenVINO's CPU plugin.

Why another engine for the same graph: OpenVINO runs the integer convolutions of a static INT8
artifact as ONNX Runtime does, but fuses what follows them (LeakyReLU, the residual Add, the next
quantization) into the convolution, and its float convolutions (oneDNN brgemm kernels) are faster
on small channel counts. Measured on the default INT8 vocoder (3 s of speech, 2 AVX-512 VNNI cores,
side by side in one process): ONNX Runtime 170-175 ms, OpenVINO on the same QDQ file 152 ms, on
the file with its convolutions' outputs left float (below) 140 ms, and with bfloat16 float parts
131 ms.

**Where the Q/DQ pairs go.** The INT8 search writes ONNX Runtime's layout: a convolution's output is
quantized (Q/DQ) before the LeakyReLU or residual Add that reads it, because ONNX Runtime then runs
`QLinearConv -> QLinearLeakyRelu / QLinearAdd` in integers. OpenVINO cannot move that dequantization
through a LeakyReLU (the zero point does not commute with it), so it computes it in float between
the layers (11 ms of Convert and 11 ms of Subtract for the default vocoder). The layout OpenVINO and
TensorRT document for QDQ models quantizes the INPUTS of a convolution only; so the pass drops each
Q/DQ pair that quantizes a convolution's output for float readers only (`conv_outputs_float`): the
next quantization, where the next convolution reads, stays. That is one rounding fewer per layer,
so the artifact is closer to FP32 in log-mel terms (default vocoder held out: +0.14 dB / PESQ
+0.03 against +0.22 / -0.01 for the ONNX Runtime artifact), and it is judged against the original on
held-out speech like any other.

The IR is that graph as OpenVINO reads it (`Core.read_model`, no conversion options), weights
stored as they are (`compress_to_fp16=False`), so compiling the IR computes what compiling the graph
does, bit for bit (a test checks it). The `.bin` beside the `.xml` is a sidecar of the record
(cached and removed with it) and its sha256 is in the record, so the backend refuses a changed one
as it refuses a changed `.xml`.

`inference_precision` is the CPU plugin's INFERENCE_PRECISION_HINT, always set explicitly (OpenVINO's
own default is bfloat16 wherever the CPU has it): `f32` (default) keeps the float parts float32;
`bf16` runs them in bfloat16 and is only offered where the CPU computes it natively (elsewhere the
stage is skipped with the reason); `auto` is bf16 on such CPUs and f32 elsewhere, resolved when the
config is read, so the record and the stage cache say which. Default vocoder held out, with its
convolutions' outputs float: f32 +0.14 dB / PESQ +0.03 at 140 ms, bf16 +0.17 dB / PESQ +0.03 to
+0.08 over two layouts at 131 ms (gate 0.3 / 0.1): bfloat16's PESQ cost moves too much between
graphs that differ by one rounding to spend the gate's margin on it by default.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from voxport.errors import BackendUnavailable, ConfigError, StageSkipped
from voxport.models.checkpoint import sha256_file
from voxport.pipeline.passes import Candidate, PassContext, artifact_name, known_settings
from voxport.pipeline.records import Record

log = logging.getLogger(__name__)

INFERENCE_PRECISIONS = ("auto", "f32", "bf16")
PERFORMANCE_HINTS = ("LATENCY", "THROUGHPUT")
FILE_OPS = ("Conv", "ConvTranspose", "QuantizeLinear", "DequantizeLinear")  # counted in the IR's graph


@dataclass(frozen=True)
class OpenVINOConfig:
    inference_precision: str = "f32"  # f32 | bf16 (native bfloat16 CPUs only) | auto (bf16 where native)
    performance_hint: str = "LATENCY"  # one request at a time, every core on it
    conv_outputs_float: bool = True  # drop the Q/DQ pairs on INT8 convolutions' outputs (module docstring)
    graph: str = ""

    def __post_init__(self) -> None:
        if self.inference_precision not in INFERENCE_PRECISIONS:
            raise ConfigError(f"openvino.inference_precision must be one of {', '.join(INFERENCE_PRECISIONS)}, "
                              f"got '{self.inference_precision}'")
        if self.performance_hint not in PERFORMANCE_HINTS:
            raise ConfigError(f"openvino.performance_hint must be one of {', '.join(PERFORMANCE_HINTS)}, "
                              f"got '{self.performance_hint}'")

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> OpenVINOConfig:
        config = cls(**known_settings(cls, settings, "openvino", ignored=()))
        if config.inference_precision == "auto":  # resolved here: the record and the cache key say which
            try:
                native = native_bf16(require_openvino().Core())
            except BackendUnavailable:
                native = False  # the pass then skips, saying OpenVINO is missing
            config = dataclasses.replace(config, inference_precision="bf16" if native else "f32")
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


CONFIG = OpenVINOConfig
KEY_FIELDS = ("inference_precision", "performance_hint", "conv_outputs_float")


def require_openvino() -> Any:
    """The `openvino` module, or BackendUnavailable saying how to get it."""
    try:
        import openvino
    except ImportError as exc:
        raise BackendUnavailable(f"OpenVINO is not installed ({exc}); pip install openvino") from None
    return openvino


def native_bf16(core: Any) -> bool:
    """Whether OpenVINO's CPU plugin computes bfloat16 natively here (AVX512-BF16 or AMX)."""
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def compile_options(inference_precision: str, performance_hint: str, threads: int | None) -> dict[str, Any]:
    """The CPU plugin's configuration: every choice explicit (no plugin default assumed)."""
    options: dict[str, Any] = {"INFERENCE_PRECISION_HINT": inference_precision, "PERFORMANCE_HINT": performance_hint}
    if threads:
        options["INFERENCE_NUM_THREADS"] = int(threads)
    return options


def recorded_options(record: Record, threads: int | None) -> dict[str, Any]:
    """`compile_options` for an IR as its record says it was judged and timed."""
    config = record.config or {}
    return compile_options(str(config.get("inference_precision", "f32")),
                           str(config.get("performance_hint", "LATENCY")), threads)


def runtime_layers(compiled: Any) -> dict[str, int]:
    """What the compiled model executes: layer type and runtime precision, counted
    (`Convolution[u8]` is an integer convolution; `Convolution[f32]` a float one)."""
    counts: collections.Counter[str] = collections.Counter()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layer, precision = info["layerType"].astype(str), info["runtimePrecision"].astype(str)
        if layer not in ("Const", "Input", "Output"):
            counts[f"{layer}[{precision}]"] += 1
    return dict(sorted(counts.items()))


def conv_outputs_float(model: onnx.ModelProto) -> list[str]:
    """Drop, in place, each QuantizeLinear -> DequantizeLinear pair that quantizes a Conv's output
    for float readers only (none of them a Conv: that pair is the next layer's input quantization).
    Returns the Convs whose outputs now stay float."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    readers: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            readers[name].append(node)
    outputs = {o.name for o in graph.output}
    dropped: set[int] = set()
    renamed: dict[str, str] = {}
    convs = []
    for q in graph.node:
        conv = producer.get(q.input[0]) if q.op_type == "QuantizeLinear" else None
        if conv is None or conv.op_type != "Conv" or len(readers[q.input[0]]) != 1:
            continue
        dqs = readers[q.output[0]]
        if not dqs or any(d.op_type != "DequantizeLinear" for d in dqs) \
                or outputs & {q.output[0], *(d.output[0] for d in dqs)}:
            continue
        after = [r for d in dqs for r in readers[d.output[0]]]
        if not after or any(r.op_type in ("Conv", "QuantizeLinear") for r in after):
            continue
        dropped.update(id(n) for n in (q, *dqs))
        renamed.update({d.output[0]: q.input[0] for d in dqs})
        convs.append(conv.name)
    kept = [n for n in graph.node if id(n) not in dropped]
    for node in kept:
        for i, name in enumerate(node.input):
            node.input[i] = renamed.get(name, name)
    del graph.node[:]
    graph.node.extend(kept)
    return convs


def _save_ir(ov: Any, model: onnx.ModelProto, xml: Path) -> None:
    """Write `xml` and its `.bin` into place only when both are complete (a temp dir, then renames:
    the weights first, so a reader that finds the `.xml` finds its weights)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{xml.stem}.", dir=xml.parent))
    try:
        onnx.save(model, str(tmp / "graph.onnx"))
        ov.save_model(ov.Core().read_model(str(tmp / "graph.onnx")), str(tmp / xml.name), compress_to_fp16=False)
        os.replace(tmp / xml.with_suffix(".bin").name, xml.with_suffix(".bin"))
        os.replace(tmp / xml.name, xml)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def transform(parent: Record, cfg: OpenVINOConfig, ctx: PassContext) -> Candidate:
    """The ONNX `parent` as an OpenVINO IR; the engine judges it (gate of its precision) and times it
    side by side against PyTorch FP32 and its parent on ONNX Runtime."""
    if parent.format != "onnx":
        raise ConfigError(f"openvino stage needs an ONNX parent, got {parent.file} ({parent.format})")
    try:
        ov = require_openvino()
    except BackendUnavailable as exc:
        raise StageSkipped(f"openvino {parent.key}: {exc}") from None
    if cfg.inference_precision == "bf16" and not native_bf16(ov.Core()):
        raise StageSkipped(f"openvino {parent.key}: this CPU has no native bfloat16 (OpenVINO would emulate it); "
                           "openvino.inference_precision=f32 runs here")
    xml = ctx.bundle_dir / artifact_name(parent.file, "openvino", ".xml")
    weights = xml.with_suffix(".bin")
    model = onnx.load(str(ctx.bundle_dir / parent.file))
    float_outputs = conv_outputs_float(model) if cfg.conv_outputs_float else []
    _save_ir(ov, model, xml)
    try:
        compiled = ov.Core().compile_model(str(xml), "CPU", compile_options(cfg.inference_precision,
                                                                            cfg.performance_hint, ctx.threads))
        layers = runtime_layers(compiled)
        del compiled
    except Exception:
        xml.unlink(missing_ok=True)
        weights.unlink(missing_ok=True)
        raise
    precision = "bf16" if cfg.inference_precision == "bf16" and parent.precision == "fp32" else parent.precision
    in_file = collections.Counter(n.op_type for n in model.graph.node)  # the graph the IR holds
    ops = {"file": {k: in_file[k] for k in FILE_OPS if in_file[k]}, "runtime": layers}
    log.info("openvino %s (%s): %s; %d INT8 convolution outputs left float", parent.key, cfg.inference_precision,
             ", ".join(f"{k} {v}" for k, v in layers.items() if "Convolution" in k), len(float_outputs))
    draft = Record(
        component=parent.component, graph=parent.graph, format="openvino", precision=precision, file=xml.name,
        sha256="", weights=parent.weights, stage="openvino", inputs=parent.inputs, outputs=parent.outputs,
        parent=parent.file, parent_sha256=parent.sha256, model=parent.model, contract=parent.contract,
        config={**cfg.to_dict(), "openvino": ov.__version__.split("-")[0], "sidecars": [weights.name],
                "weights_sha256": sha256_file(weights), "float_conv_outputs": float_outputs},
        parity={"reference": "PyTorch FP32 original on the held-out gate clips", "integer_ops": ops,
                **{k: v for k, v in (parent.parity or {}).items() if k in ("quantized_nodes", "float_nodes")}},
    )
    return Candidate([draft], {"label": f"{parent.key} OpenVINO {cfg.inference_precision}", "integer_ops": ops})
