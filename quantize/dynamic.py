"""Pass `quantize_dynamic`: INT8 weights, activations quantized at run time (LSTM / GRU / Linear).

Two flavours, chosen by the parent: an ONNX parent gets ONNX Runtime's `quantize_dynamic`
(DynamicQuantizeLSTM, MatMulInteger / DynamicQuantizeMatMul), a torch parent gets
`torch.ao.quantization.quantize_dynamic` (format `torch`, see quantize/torch_dynamic.py).

The layers to quantize are searched as for the vocoder (quantize/search.py): everything first;
if that fails the gate on calibration inputs, each layer is ranked by the error it adds alone
(real artifacts: these graphs have a handful of layers) and the longest passing prefix is kept.
The GE2E encoder is the case in point: naive INT8 drops its embedding cosine to about 0.33
because its raw power-mel input sits below one INT8 step, and the search keeps the first LSTM
layer float. The exported encoder already has one ONNX LSTM node per layer (ONNX's LSTM is
single-layer), so ONNX Runtime needs no re-export; PyTorch's 3-layer nn.LSTM is split.

The search consults the component's gate on calibration inputs (evaluate/components/): the
encoder's cosine vs FP32 and same/different-speaker decisions, the synthesizer decoder step's mel
SNR and stop-step agreement over fixed decoder steps; the engine judges the result on held-out ones.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from voxport.errors import ConfigError, GateError
from voxport.export.onnx import ort_runner, tensor_specs, torch_runner
from voxport.models import registry
from voxport.pipeline.passes import Candidate, PassContext, artifact_name
from voxport.pipeline.records import Record
from voxport.quantize import qdq, search, torch_dynamic
from voxport.quantize.config import DYNAMIC_FIELDS, QuantizeConfig
from voxport.runtime.backends.base import Runner

log = logging.getLogger(__name__)

PRECISION = "int8-dynamic"


CONFIG = QuantizeConfig
KEY_FIELDS = DYNAMIC_FIELDS
SEARCHES = True  # the search aims at the gate: a changed gate is a new search (the stage cache's key)


def transform(parent: Record, qc: QuantizeConfig, ctx: PassContext) -> Candidate:
    graph = parent.graph if parent.graph != "*" else qc.graph
    specs = ctx.component.reference_specs()
    if graph not in specs:
        raise ConfigError(f"{parent.component} has no graph '{graph}' (has {sorted(specs)})")
    judge = ctx.component.search_judge(graph, PRECISION, qc.search_margin)
    if parent.format == "onnx":
        flavour: OrtFlavour | TorchFlavour = OrtFlavour(parent, ctx, qc)
    elif parent.format == "torch":
        module = registry.load_torch_artifact(ctx.bundle_dir / parent.file, parent.model)
        flavour = TorchFlavour(parent, module, specs[graph], graph, ctx)
    else:
        raise ConfigError(f"quantize_dynamic takes an onnx or torch parent, got {parent.format}")

    def evaluate(nodes: list[str]) -> search.Trial:
        figures, failures = judge.evaluate(flavour.runner(nodes))
        return search.Trial(tuple(nodes), figures, failures)

    def ranking() -> list[tuple[str, float]]:
        errors = {node: judge.error(evaluate([node]).figures) for node in flavour.candidates}
        return search.rank(errors, flavour.macs(judge.steps), qc.rank_by)

    with flavour:  # trial artifacts live in a temporary directory until the chosen one is written
        result = search.search(flavour.candidates, ranking, evaluate, qc.search, qc.search_max_trials)
        result.macs = flavour.macs(judge.steps)
        if not result.quantized:
            raise GateError(flavour.out.name, ["no layer can be quantized within the gate on calibration inputs"],
                            {"search": result.describe(judge.error_name)})
        flavour.write(result.quantized)
    try:
        _check_really_quantized(flavour, result)
        ops = flavour.integer_ops(result.quantized)
    except BaseException:
        flavour.out.unlink(missing_ok=True)
        raise
    log.info("%s: %d of %d layers INT8 (float: %s)", flavour.out.name, len(result.quantized),
             len(flavour.candidates), ", ".join(result.float_nodes) or "none")
    ins, outs = flavour.io(specs[graph])
    draft = Record(
        component=parent.component, graph=graph, format=parent.format, precision=PRECISION,
        file=flavour.out.name, sha256="", weights=parent.weights, stage="quantize-dynamic",
        inputs=ins, outputs=outs, parent=parent.file, parent_sha256=parent.sha256,
        model=flavour.model(result.quantized), contract=parent.contract,
        config={**qc.to_dict(), "graph": graph, "engine": flavour.engine},
        parity={"reference": "PyTorch FP32 original on held-out inputs", "integer_ops": ops,
                "quantized_nodes": sorted(result.quantized), "float_nodes": result.float_nodes,
                "search": result.describe(judge.error_name), **flavour.extra},
    )
    return Candidate([draft], {"integer_ops": ops, "search": draft.parity["search"]})


def _check_really_quantized(flavour: OrtFlavour | TorchFlavour, result: search.SearchResult) -> None:
    """A layer the quantizer silently left float is recorded as float, with that reason."""
    if not isinstance(flavour, OrtFlavour):
        return
    for node in qdq.left_float(flavour.out, result.quantized):
        log.warning("%s: ONNX Runtime left %s float", flavour.out.name, node)
        result.quantized.remove(node)
        result.float_nodes[node] = "ONNX Runtime's quantizer left it float (no dynamic INT8 kernel for it)"


class OrtFlavour:
    """ONNX Runtime `quantize_dynamic` of the parent ONNX graph, restricted to chosen nodes."""

    engine = "onnxruntime"

    def __init__(self, parent: Record, ctx: PassContext, qc: QuantizeConfig) -> None:
        self.parent, self.ctx, self.qc = parent, ctx, qc
        self.out = ctx.bundle_dir / artifact_name(parent.file, "int8_dynamic")
        self._tmp = tempfile.TemporaryDirectory(prefix="voxport-dyn-")
        # ORT's recommended pre-processing; node names are read from its result.
        self.src = qdq.preprocess(ctx.bundle_dir / parent.file, Path(self._tmp.name) / "pre.onnx")
        model = qdq.load_graph(self.src)
        inits = {i.name for i in model.graph.initializer}
        # Only layers with constant weights can hold INT8 weights (attention's activation x
        # activation MatMul cannot).
        self.candidates = [n.name for n in model.graph.node if n.op_type in qc.dynamic_op_types
                           and len(n.input) > 1 and n.input[1] in inits]
        self.extra: dict[str, Any] = {}
        self._model = model

    def macs(self, steps: int) -> dict[str, float]:
        return qdq.weight_macs(self._model, self.candidates, steps)

    def __enter__(self) -> OrtFlavour:
        return self

    def __exit__(self, *exc: object) -> None:
        self._tmp.cleanup()

    def _quantize(self, nodes: list[str], dst: Path) -> Path:
        from onnxruntime.quantization import quantize_dynamic

        _, weight = qdq.quant_types(self.qc)
        fd, tmp = tempfile.mkstemp(prefix=f".{dst.stem}.", suffix=".onnx", dir=dst.parent)
        os.close(fd)
        try:
            # ORT turns each Gemm into '<name>_MatMul' before quantizing: name both, or it stays float.
            named = [*nodes, *(f"{n}_MatMul" for n in nodes)]
            quantize_dynamic(str(self.src), tmp, op_types_to_quantize=list(self.qc.dynamic_op_types),
                             nodes_to_quantize=named, per_channel=False, reduce_range=self.qc.reduce_range,
                             weight_type=weight, extra_options={"MatMulConstBOnly": True})
            os.replace(tmp, dst)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return dst

    def runner(self, nodes: list[str]) -> Runner:
        return ort_runner(self._quantize(nodes, Path(self._tmp.name) / "trial.onnx"), self.ctx.threads)

    def write(self, nodes: list[str]) -> None:
        self._quantize(nodes, self.out)

    def integer_ops(self, nodes: list[str]) -> dict[str, dict[str, int]]:
        return qdq.integer_summary(self.out)

    def model(self, nodes: list[str]) -> dict[str, Any]:
        return self.parent.model

    def io(self, spec: Any) -> tuple[tuple, tuple]:
        return self.parent.inputs, self.parent.outputs


class TorchFlavour:
    """`torch.ao` dynamic quantization of the PyTorch original, saved as FP32 weights + recipe."""

    engine = "torch"

    def __init__(self, parent: Record, module: torch.nn.Module, spec: Any, graph: str, ctx: PassContext) -> None:
        self.parent, self.fp32, self.graph = parent, module, graph
        self.out = ctx.bundle_dir / f"{spec.artifact_stem}_int8_dynamic.pt"
        # The graph's layers live under one submodule (the decoder step's under `decoder`); a
        # multi-layer nn.LSTM is split so that each layer can be chosen on its own.
        self.scope = ctx.component.torch_scope(graph)
        self.split = torch_dynamic.has_multilayer_lstm(module)
        self._probe = torch_dynamic.split_lstms(copy.deepcopy(module)) if self.split else module
        self.candidates = torch_dynamic.candidates(self._probe, self.scope)
        self.extra: dict[str, Any] = {}
        if self.split:
            self.extra["split_lstm_max_abs_vs_fp32"] = _split_parity(module, spec)

    def macs(self, steps: int) -> dict[str, float]:
        return torch_dynamic.module_macs(self._probe, self.candidates, steps)

    def __enter__(self) -> TorchFlavour:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def _runner(self, module: torch.nn.Module) -> Runner:
        return torch_runner(registry.graph_specs(module, self.parent.model)[self.graph])

    def runner(self, nodes: list[str]) -> Runner:
        return self._runner(torch_dynamic.apply_recipe(self.fp32, torch_dynamic.recipe(nodes, self.split)))

    def write(self, nodes: list[str]) -> None:
        registry.save_torch_artifact(self.fp32, self.out)

    def integer_ops(self, nodes: list[str]) -> dict[str, dict[str, int]]:
        """Rebuild exactly as the runtime will (file + recipe) and count the INT8 modules."""
        module = registry.load_torch_artifact(self.out, self.model(nodes))
        return {"runtime": torch_dynamic.count_quantized(module), "file": {}}

    def model(self, nodes: list[str]) -> dict[str, Any]:
        return {**self.parent.model, "dynamic_int8": torch_dynamic.recipe(nodes, self.split)}

    def io(self, spec: Any) -> tuple[tuple, tuple]:
        return tensor_specs(spec)


def _split_parity(module: torch.nn.Module, spec: Any) -> float:
    """The split-LSTM encoder must compute what the original does (same weights, same order)."""
    split = torch_dynamic.split_lstms(copy.deepcopy(module))
    (mels,) = spec.example_inputs
    with torch.inference_mode():
        diff = float((module(mels) - split(mels)).abs().max())
    if diff > 1e-5:
        raise ConfigError(f"split LSTM differs from the original by {diff:.2e}")
    return diff
