"""FP16 ONNX: the reference run finds the nodes FP16 cannot carry and the conversion keeps them
FP32; results pass onnx.checker's full check; real GE2E and HiFi-GAN weights stay faithful."""

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import compose_config, run_stage, stage_context
from onnx import TensorProto, helper

from voxport.errors import ConfigError
from voxport.export.fp16 import Fp16Config, precision_counts, prepare, to_fp16
from voxport.export.ranges import RangeLimits, fp32_nodes, instrumented
from voxport.runtime.backends.onnxruntime import SessionSettings, open_session

LIMITS = RangeLimits()


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """PyTorch's LSTM on a busy 2-core host: OpenMP barriers per time step cost seconds per call
    with 2 threads; these tests check accuracy, not speed. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _session(model: onnx.ModelProto):
    return open_session(model.SerializeToString(), settings=SessionSettings(intra_op_threads=1))


def _types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    return {v.name: v.type.tensor_type.elem_type
            for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}


def _node_output_type(model: onnx.ModelProto, name: str) -> int:
    node = next(n for n in model.graph.node if n.name == name)
    return _types(model)[node.output[0]]


def _model(nodes, inputs, outputs, inits=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


class Overflowing(torch.nn.Module):
    """Activations of ~1e5 between two well-scaled layers: FP16 (max 65504) overflows in the middle."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(8, 16)
        self.b = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        h = self.a(x) * 1.0e5
        return (self.b(torch.relu(h) * 1.0e-5),)


@pytest.fixture(scope="module")
def overflowing(tmp_path_factory: pytest.TempPathFactory) -> tuple[onnx.ModelProto, np.ndarray]:
    path = tmp_path_factory.mktemp("fp16") / "overflow.onnx"
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    torch.onnx.export(Overflowing().eval(), (x,), str(path), dynamo=False, opset_version=17, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    return prepare(onnx.load(str(path))), x.numpy()


def test_reference_run_keeps_overflowing_nodes_fp32(overflowing) -> None:
    model, x = overflowing
    run, ranges = instrumented(model)
    reference = run({"x": x})["y"]
    keep = fp32_nodes(model, ranges, LIMITS)
    ops = {n.name: n.op_type for n in model.graph.node}
    kept_ops = sorted(ops[name] for name in keep if name in ops)
    assert kept_ops.count("Mul") == 2 and "Relu" in kept_ops, keep  # *1e5, relu, *1e-5 carry ~1e5
    assert all("> 0.25 x 65504" in why or "smallest normal" in why for why in keep.values())  # 1e-5: subnormal
    assert not any(ops[name] == "Gemm" for name in keep), "well-scaled layers must stay FP16"

    converted, info = to_fp16(model, keep)
    onnx.checker.check_model(converted, full_check=True)
    for name in keep:
        if ops.get(name) in ("Mul", "Relu"):
            assert _node_output_type(converted, name) == TensorProto.FLOAT, name
    gemms = [n for n, op in ops.items() if op == "Gemm"]
    assert all(_node_output_type(converted, g) == TensorProto.FLOAT16 for g in gemms)
    assert precision_counts(converted)["fp16"] >= 2
    out = _session(converted).run(None, {"x": x})[0]
    assert np.isfinite(out).all()
    assert np.abs(out - reference).max() <= 2e-2 * np.abs(reference).max()

    # Without the reference run's verdict those tensors would be FP16, and real FP16 arithmetic
    # overflows on them (ONNX Runtime CPU would not show it: it computes FP16 nodes in FP32).
    naive, _ = to_fp16(model, {})
    big = max((o for n in model.graph.node if n.name in keep for o in n.output), key=lambda o: ranges[o].max_abs)
    assert _types(naive)[big] == TensorProto.FLOAT16 and ranges[big].max_abs > np.finfo(np.float16).max
    with torch.inference_mode():
        assert not torch.isfinite(Overflowing().half()(torch.from_numpy(x).half())[0]).all()


def test_tiny_activations_norm_ops_and_large_weights_are_kept() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1])
    tiny = helper.make_tensor("tiny", TensorProto.FLOAT, [], [1e-6])
    big = helper.make_tensor("big", TensorProto.FLOAT, [8], [1e5] * 8)
    nodes = [helper.make_node("Mul", ["x", "tiny"], ["t"], name="shrink"),
             helper.make_node("Exp", ["t"], ["e"], name="use_tiny"),
             helper.make_node("ReduceL2", ["x"], ["n2"], name="norm", axes=[1], keepdims=1),
             helper.make_node("Div", ["x", "big"], ["scaled"], name="by_big"),
             helper.make_node("ReduceSum", ["scaled"], ["s"], name="sum", keepdims=1),
             helper.make_node("Add", ["n2", "s"], ["a"], name="add"),
             helper.make_node("ReduceMean", ["e"], ["m"], name="mean", axes=[1], keepdims=1),
             helper.make_node("Add", ["a", "m"], ["y"], name="out")]
    model = prepare(_model(nodes, [x], [y], [tiny, big]))
    run, ranges = instrumented(model)
    feed = {"x": (np.random.default_rng(0).standard_normal((4, 8)) * 100).astype(np.float32)}
    reference = run(feed)["y"]
    keep = fp32_nodes(model, ranges, LIMITS)
    assert "smallest normal" in keep["shrink"] and "smallest normal" in keep["use_tiny"]
    assert "squares internally" in keep["norm"]
    assert "by_big" in keep and "reaches 1e+05" in keep["by_big"]
    assert "sum" not in keep and "out" not in keep
    converted, _ = to_fp16(model, keep)
    onnx.checker.check_model(converted, full_check=True)
    out = _session(converted).run(None, feed)[0]
    assert np.allclose(out, reference, rtol=2e-3)


def test_huge_graph_input_is_not_rounded_through_fp16() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])
    k = helper.make_tensor("k", TensorProto.FLOAT, [], [1e-3])
    model = prepare(_model([helper.make_node("Mul", ["x", "k"], ["s"], name="scale"),
                            helper.make_node("Relu", ["s"], ["y"], name="relu")], [x], [y], [k]))
    feed = {"x": np.array([1e5, 2.5e5, -3.0, 7.0], np.float32)}
    run, ranges = instrumented(model)
    run(feed)
    keep = fp32_nodes(model, ranges, LIMITS)
    assert list(keep) == ["scale"] and "|x| reaches 2.5e+05" in keep["scale"]
    converted, _ = to_fp16(model, keep)
    out = _session(converted).run(None, feed)[0]
    assert np.allclose(out, [100.0, 250.0, 0.0, 0.007], rtol=1e-3)


def test_outputs_read_inside_the_graph_and_float_casts_convert_cleanly() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])
    h = helper.make_tensor_value_info("h", TensorProto.FLOAT, ["n"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])
    nodes = [helper.make_node("Relu", ["x"], ["h"]),  # unnamed on purpose
             helper.make_node("Greater", ["x", "zero"], ["pos"]),
             helper.make_node("Cast", ["pos"], ["mask"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["h", "mask"], ["y"])]
    raw = _model(nodes, [x], [h, y], [zero])
    model = prepare(raw)
    assert all(n.name for n in model.graph.node)
    assert any(n.op_type == "Identity" and n.output[0] == "h" for n in model.graph.node)
    converted, info = to_fp16(model, {})
    assert info["float_casts_kept"] == 1
    onnx.checker.check_model(converted, full_check=True)
    assert [o.type.tensor_type.elem_type for o in converted.graph.output] == [TensorProto.FLOAT] * 2
    feed = {"x": np.array([-1.0, 0.5, 2.0], np.float32)}
    h_out, y_out = _session(converted).run(None, feed)
    assert np.allclose(h_out, [0.0, 0.5, 2.0]) and np.allclose(y_out, [0.0, 0.5, 2.0])


def test_config_refuses_unknown_settings() -> None:
    assert Fp16Config.from_settings({"graph": "vocoder", "exclude_nodes": ["a"]}).exclude_nodes == ("a",)
    with pytest.raises(ConfigError, match="unknown settings \\['max_fraction_typo'\\]"):
        Fp16Config.from_settings({"max_fraction_typo": 0.5})


# --- real weights -------------------------------------------------------------------------------


def _export(spec, path: Path) -> onnx.ModelProto:
    from voxport.export.onnx import OnnxExportConfig, export_graph

    export_graph(spec, path, OnnxExportConfig())
    return prepare(onnx.load(str(path)))


@pytest.fixture(scope="module")
def encoder_ctx(tmp_path_factory: pytest.TempPathFactory, corpus):
    """A bundle holding the real GE2E encoder: PyTorch original + validated FP32 ONNX export."""
    from omegaconf import OmegaConf

    from voxport.export.onnx import OnnxExportConfig, export_graph, tensor_specs
    from voxport.models.checkpoint import sha256_file
    from voxport.models.registry import graph_specs
    from voxport.models.stack import _speaker_encoder
    from voxport.pipeline.engine import write_source
    from voxport.pipeline.records import Record

    cfg = compose_config()
    bundle = tmp_path_factory.mktemp("encoder")
    component = _speaker_encoder(cfg.stack.speaker_encoder)
    source = write_source(component, bundle)
    spec = graph_specs(component.module, component.model)["speaker_encoder"]
    path = export_graph(spec, bundle / "speaker_encoder_fp32.onnx", OnnxExportConfig())
    ins, outs = tensor_specs(spec)  # FP32 export parity is test_build's business; here it is the parent
    export = Record(component="speaker_encoder", graph="speaker_encoder", format="onnx", precision="fp32",
                    file=path.name, sha256=sha256_file(path), weights="real", stage="export", inputs=ins,
                    outputs=outs, parent=source.file, parent_sha256=source.sha256, model=source.model,
                    contract=source.contract)
    records = [source, export]
    settings = {**OmegaConf.to_container(cfg.fp16, resolve=True), "calibration_clips": 2, "graph": "speaker_encoder"}
    # One ONNX Runtime thread: gating measures accuracy, and on a busy 2-core host thread hand-offs
    # per LSTM step cost more than they gain.
    return stage_context(bundle, corpus, records, OmegaConf.to_container(cfg.gates, resolve=True),
                         threads=1), settings


def test_fp16_stage_on_the_real_speaker_encoder(encoder_ctx) -> None:
    from voxport.pipeline.records import read_record

    ctx, settings = encoder_ctx
    parent = ctx.find("speaker_encoder", "speaker_encoder", "onnx")
    record = run_stage(ctx, "fp16", parent, settings)
    path = ctx.bundle_dir / record.file
    assert record.file == "speaker_encoder_fp16.onnx" and read_record(path) == record
    assert (record.precision, record.stage, record.parent) == ("fp16", "fp16", parent.file)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert [o.type.tensor_type.elem_type for o in model.graph.output] == [TensorProto.FLOAT]  # contract kept
    assert record.config["node_precisions"]["fp16"] > 10
    assert isinstance(record.config["kept_fp32"], list) and record.config["calibration"]["split"] == "calib"
    assert record.quality["passed"] and record.quality["decisions_changed"] == 0
    assert record.quality["embedding_cosine_min"] >= 0.9999 and record.quality["utterances"] >= 10
    assert "overstate GPU FP16 accuracy" in record.parity["measured_on"]
    assert record.parity["torch_half_cpu"]["partial_cosine_min"] >= 0.9999
    path.unlink()  # the next test builds it again
    ctx.records.remove(record)


def test_fp16_stage_failing_its_gate_leaves_no_artifact(encoder_ctx, monkeypatch: pytest.MonkeyPatch) -> None:
    from voxport.errors import GateError
    from voxport.evaluate.components import SpeakerEncoder

    ctx, settings = encoder_ctx
    seen = {}

    def failing_gate(self, runners, precision):
        seen["file_during_gate"] = (ctx.bundle_dir / "speaker_encoder_fp16.onnx").is_file()
        seen["judged"] = sorted(runners)
        return {"embedding_cosine_min": 0.42}, ["embedding cosine 0.4200 vs FP32 < 0.9999"]

    monkeypatch.setattr(SpeakerEncoder, "listen", failing_gate)
    before = sorted(p.name for p in ctx.bundle_dir.iterdir())
    with pytest.raises(GateError, match="speaker_encoder/speaker_encoder FP16: embedding cosine 0.4200") as err:
        parent = ctx.find("speaker_encoder", "speaker_encoder", "onnx")
        run_stage(ctx, "fp16", parent, {**settings, "torch_half_seconds": 0})
    assert seen["file_during_gate"], "the gate must judge the written artifact"
    assert seen["judged"] == ["speaker_encoder"]
    assert err.value.metrics["quality"] == {"embedding_cosine_min": 0.42}  # every figure comes with the failure
    assert sorted(p.name for p in ctx.bundle_dir.iterdir()) == before, "a failed gate leaves no artifact"


@pytest.mark.slow
def test_real_hifigan_fp16_passes_full_check_and_stays_close(tmp_path: Path, corpus) -> None:
    from voxport.evaluate import metrics
    from voxport.evaluate.inputs import speech_clips, vocoder_feeds
    from voxport.models import registry
    from voxport.models.stack import _vocoder

    component = _vocoder(compose_config().stack.vocoder)
    spec = registry.graph_specs(component.module, component.model)["vocoder"]
    model = _export(spec, tmp_path / "vocoder_fp32.onnx")
    mel_cfg = component.module.cfg.mel
    run, ranges = instrumented(model)
    for feed in vocoder_feeds(speech_clips(corpus, mel_cfg, 1, 0.5, split="calib")):
        run(feed)
    keep = fp32_nodes(model, ranges, LIMITS)
    converted, info = to_fp16(model, keep)
    onnx.checker.check_model(converted, full_check=True)
    counts = precision_counts(converted)
    assert counts["fp16"] > 100 and counts["fp32"] <= len(keep)
    feed = vocoder_feeds(speech_clips(corpus, mel_cfg, 1, 0.5, split="eval"))[0]
    with torch.inference_mode():
        ref = spec.module(torch.from_numpy(feed["mel"]))[0].numpy()
    out = _session(converted).run(None, feed)[0]
    assert out.shape == ref.shape and metrics.snr_db(ref, out) > 40.0
