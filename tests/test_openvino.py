"""The `openvino` pass and backend on the real HiFi-GAN: the IR computes what the ONNX graph does in
OpenVINO, runs its INT8 layers on integer kernels, is judged against the original on held-out
speech, and the runtime refuses an IR whose weights changed and serves the next artifact, saying so."""

import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import run_stage, stage_context
from test_quantize_static import FAST, STAGE1, stage_dir

from voxport.errors import BackendUnavailable, ConfigError, StageSkipped
from voxport.export.openvino import OpenVINOConfig
from voxport.pipeline import engine
from voxport.pipeline.engine import BuildContext
from voxport.pipeline.records import read_record
from voxport.runtime.backends import open_backend, open_first
from voxport.runtime.host import detect
from voxport.runtime.select import Selection

ov = pytest.importorskip("openvino")

GATES = {"vocoder": {"int8-static": {"max_log_mel_increase_db": 0.3, "max_pesq_drop": 0.1, "require_speedup": False},
                     "fp32": {"max_log_mel_increase_db": 0.3, "max_pesq_drop": 0.1, "require_speedup": False}}}


@pytest.fixture
def ctx(bundle: Path, corpus, tmp_path: Path) -> BuildContext:
    bundle_dir, records = stage_dir(bundle, tmp_path, "vocoder")
    return stage_context(bundle_dir, corpus, records, GATES, gate_seconds=1.0, timing_seconds=0.5)


def mel(seconds: float = 0.5) -> np.ndarray:
    rng = np.random.default_rng(0)  # the graph's arithmetic, not speech, is under test here
    return (rng.standard_normal((1, 80, int(seconds * 22050 / 256))) - 5.0).astype(np.float32)


def test_the_ir_computes_what_openvino_computes_from_the_onnx_file(ctx: BuildContext):
    parent = ctx.find("vocoder", "vocoder", "onnx")
    record = run_stage(ctx, "openvino", parent, {"graph": "vocoder"})
    assert record.format == "openvino" and record.precision == "fp32" and record.stage == "openvino"
    assert record.file == "vocoder_openvino.xml" and record.parent == parent.file
    assert record.config["inference_precision"] == "f32" and record.config["sidecars"] == ["vocoder_openvino.bin"]
    assert read_record(ctx.bundle_dir / record.file) == record
    assert record.quality["passed"] and "speedup_vs_parent" in record.speed
    x = mel()
    with open_backend(record, ctx.bundle_dir) as backend:
        assert backend.providers[0].startswith("OpenVINO CPU (f32, ")
        served = backend.infer({"mel": x})["wav"]
    direct = ov.Core().compile_model(str(ctx.bundle_dir / parent.file), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    assert np.array_equal(served, direct({"mel": x})[0])  # the IR is the ONNX graph, bit for bit
    with open_backend(parent, ctx.bundle_dir) as ort:
        reference = ort.infer({"mel": x})["wav"]
    assert served.shape == reference.shape
    assert np.max(np.abs(served - reference)) < 1e-3  # another engine, the same float32 function


def test_pinned_threads_serve_concurrent_requests_side_by_side(ctx: BuildContext):
    """As the service opens it (`serve.threads` per request, several workers): one stream per pinned
    share of the cores, every concurrent call answered with its own input's output."""
    import threading

    record = run_stage(ctx, "openvino", ctx.find("vocoder", "vocoder", "onnx"), {"graph": "vocoder"})
    inputs = [mel(0.3 + 0.1 * i) for i in range(4)]
    with open_backend(record, ctx.bundle_dir, threads=1) as backend:
        streams = max(1, (os.cpu_count() or 1))
        assert backend.providers == [f"OpenVINO CPU (f32, 1 threads per request, {streams} streams)"
                                     if streams > 1 else "OpenVINO CPU (f32, 1 threads)"]
        alone = [backend.infer({"mel": x})["wav"] for x in inputs]
        together: dict[int, np.ndarray] = {}

        def call(i: int) -> None:
            together[i] = backend.infer({"mel": inputs[i]})["wav"]

        workers = [threading.Thread(target=call, args=(i,)) for i in range(len(inputs))]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    assert all(np.array_equal(together[i], alone[i]) for i in range(len(inputs)))


def test_profile_of_an_openvino_ir_counts_every_convolution_of_its_onnx_graph(ctx: BuildContext, corpus):
    """`voxport profile` on an IR: OpenVINO's performance counters, per layer type and kernel, and each
    convolution's MACs found through the ONNX nodes it fused (the same total as the ONNX graph)."""
    from voxport.benchmarks import profiler

    parent = ctx.find("vocoder", "vocoder", "onnx")
    record = run_stage(ctx, "openvino", parent, {"graph": "vocoder"})
    cfg = profiler.ProfileConfig(seconds=1.0, top=5, repeats=2, warmup=1, threads=1)
    profile = profiler.profile_artifact(ctx.bundle_dir, record, ctx.records, corpus, cfg)
    assert profile["session"]["engine"] == "openvino" and profile["threads"] == 1
    convs = [r for r in profile["op_types"] if r["op_type"].startswith(("Convolution (", "Deconvolution ("))]
    assert convs and sum(r["share"] for r in convs) > 0.6
    assert sum(r["share"] for r in profile["op_types"]) == pytest.approx(1.0)
    assert profile["ops_counted"] == profile["ops_in_graph"] > 0 and not profile["uncounted_nodes"]
    assert profile["achieved"]["int8"]["ops"] == 0 and profile["achieved"]["fp32"]["ops_per_s_in_nodes"] > 0
    assert "| op type (as the engine ran it) |" in profiler.markdown(profile, cfg.top)


def test_a_changed_weights_file_is_refused_and_the_next_artifact_serves(ctx: BuildContext):
    parent = ctx.find("vocoder", "vocoder", "onnx")
    record = run_stage(ctx, "openvino", parent, {"graph": "vocoder"})
    weights = ctx.bundle_dir / "vocoder_openvino.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BackendUnavailable, match="vocoder_openvino.bin does not match the sha256"):
        open_backend(record, ctx.bundle_dir)
    choices = [Selection(record, "openvino fp32 on CPU", "cpu"), Selection(parent, "next in line", "cpu")]
    backend, choice, reason = open_first(choices, ctx.bundle_dir, "vocoder", detect())
    backend.close()
    assert choice.record.file == parent.file
    assert "vocoder_openvino.xml refused" in reason and "sha256" in reason
    weights.unlink()
    with pytest.raises(BackendUnavailable, match="weights file vocoder_openvino.bin is missing"):
        open_backend(record, ctx.bundle_dir)


def test_a_slower_engine_is_skipped_with_its_figures_and_leaves_nothing(ctx: BuildContext, monkeypatch):
    """An alternative engine that measures no faster than its parent is not kept, and not a failure."""
    parent = ctx.find("vocoder", "vocoder", "onnx")
    ctx.gates = {"vocoder": {**GATES["vocoder"], "fp32": {**GATES["vocoder"]["fp32"], "require_speedup": True}}}
    monkeypatch.setattr(engine, "time_artifact", lambda *a, **k: {"speedup_vs_torch_fp32": 1.1,
                                                                  "speedup_vs_parent": 0.93})
    before = sorted(p.name for p in ctx.bundle_dir.iterdir())
    with pytest.raises(StageSkipped, match=r"vocoder_openvino.xml not faster than its parent: 0.93x"):
        engine.run_stage(ctx, "openvino", parent, {"graph": "vocoder"}, graph="vocoder")
    assert sorted(p.name for p in ctx.bundle_dir.iterdir()) == before


def test_settings_are_checked_and_bf16_needs_a_native_cpu(ctx: BuildContext, monkeypatch):
    with pytest.raises(ConfigError, match="inference_precision must be one of auto, f32, bf16, got 'fp16'"):
        OpenVINOConfig(inference_precision="fp16")
    with pytest.raises(ConfigError, match=r"openvino: unknown settings \['precision'\]"):
        OpenVINOConfig.from_settings({"precision": "bf16"})
    from voxport.export import openvino as ov_pass

    # `auto` is resolved when the config is read, so the record and the stage cache say which.
    for native, resolved in ((True, "bf16"), (False, "f32")):
        monkeypatch.setattr(ov_pass, "native_bf16", lambda core, native=native: native)
        assert OpenVINOConfig.from_settings({"inference_precision": "auto"}).inference_precision == resolved
    assert OpenVINOConfig.from_settings({}).inference_precision == "f32"
    before = sorted(p.name for p in ctx.bundle_dir.iterdir())
    with pytest.raises(StageSkipped, match="no native bfloat16"):
        run_stage(ctx, "openvino", ctx.find("vocoder", "vocoder", "onnx"), {"graph": "vocoder",
                                                                             "inference_precision": "bf16"})
    assert sorted(p.name for p in ctx.bundle_dir.iterdir()) == before


@pytest.mark.slow
def test_openvino_runs_the_searched_int8_vocoder_in_integers_and_passes_the_gate(ctx: BuildContext):
    int8 = run_stage(ctx, "quantize_static", ctx.find("vocoder", "vocoder", "onnx"), {**FAST, "exclude_nodes": STAGE1})
    record = run_stage(ctx, "openvino", int8, {"graph": "vocoder"})
    assert record.precision == "int8-static" and record.parent == int8.file
    runtime = record.parity["integer_ops"]["runtime"]
    # Every layer ONNX Runtime runs as QLinearConv, OpenVINO runs on u8 x i8 kernels too.
    integer = runtime.get("Convolution[u8]", 0) + runtime.get("Convolution[i8]", 0)
    assert integer == int8.parity["integer_ops"]["runtime"]["QLinearConv"]
    assert record.parity["quantized_nodes"] == int8.parity["quantized_nodes"]
    # Their outputs stay float into the LeakyReLU / residual Add (fused): a conv's input quantization stays.
    dropped = record.config["float_conv_outputs"]
    assert set(dropped) & set(int8.parity["quantized_nodes"])
    ir_file, onnx_file = record.parity["integer_ops"]["file"], int8.parity["integer_ops"]["file"]
    assert ir_file["QuantizeLinear"] == onnx_file["QuantizeLinear"] - len(dropped)
    assert ir_file["Conv"] == onnx_file["Conv"]
    q = record.quality
    assert q["passed"] and q["log_mel_distance_increase_db"] <= 0.3 and q["pesq_drop"] <= 0.1
    assert record.speed["parent_median_s"] > 0 and record.speed["speedup_vs_parent"] > 0
    # The bundle's copy is what a cached build restores: the weights travel with the IR.
    cached = ctx.bundle_dir.parent / "copy"
    cached.mkdir()
    for name in (record.file, *record.config["sidecars"]):
        shutil.copyfile(ctx.bundle_dir / name, cached / name)
    with open_backend(record, cached) as a, open_backend(record, ctx.bundle_dir) as b:
        x = mel(1.0)
        assert np.array_equal(a.infer({"mel": x})["wav"], b.infer({"mel": x})["wav"])


def _qdq(name: str, x: str) -> list:
    from onnx import helper

    return [helper.make_node("QuantizeLinear", [x, "s", "z"], [f"{name}_q"], name=f"{name}_Q"),
            helper.make_node("DequantizeLinear", [f"{name}_q", "s", "z"], [f"{name}_dq"], name=f"{name}_DQ")]


def test_only_the_quantization_of_a_convolutions_output_for_float_readers_is_dropped():
    """conv1 -> Q/DQ -> LeakyRelu -> Q/DQ -> conv2 -> Q/DQ -> conv3 -> Q/DQ -> Add: the pairs on conv1's
    and conv3's outputs go (float readers), the LeakyRelu's stays (conv2's input quantization), and so
    does conv2's (conv3 reads it: its input quantization)."""
    from onnx import TensorProto, helper, numpy_helper

    from voxport.export.openvino import conv_outputs_float

    w = numpy_helper.from_array(np.ones((4, 4, 3), np.float32), "w")
    s = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    z = numpy_helper.from_array(np.array(128, np.uint8), "z")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c1"], name="conv1", pads=[1, 1]), *_qdq("a", "c1"),
             helper.make_node("LeakyRelu", ["a_dq"], ["r"], name="lrelu", alpha=0.1), *_qdq("b", "r"),
             helper.make_node("Conv", ["b_dq", "w"], ["c2"], name="conv2", pads=[1, 1]), *_qdq("c", "c2"),
             helper.make_node("Conv", ["c_dq", "w"], ["c3"], name="conv3", pads=[1, 1]), *_qdq("d", "c3"),
             helper.make_node("Add", ["d_dq", "x"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8])], [w, s, z])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert conv_outputs_float(model) == ["conv1", "conv3"]
    names = [n.name for n in model.graph.node]
    assert names == ["conv1", "lrelu", "b_Q", "b_DQ", "conv2", "c_Q", "c_DQ", "conv3", "add"]
    assert list(model.graph.node[1].input) == ["c1"] and list(model.graph.node[-1].input) == ["c3", "x"]
    onnx.checker.check_model(model)
