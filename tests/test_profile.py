"""`voxport profile` (benchmarks/profiler.py): ORT's per-node trace, FLOPs from the graph, peaks from CPU flags.
OpenVINO IRs' profile (its performance counters): tests/test_openvino.py."""

import json
from pathlib import Path

import numpy as np
import pytest

from voxport.benchmarks import flops, hardware, profiler
from voxport.errors import ConfigError
from voxport.pipeline.records import read_bundle


def test_profile_of_the_fp32_vocoder_on_real_speech(bundle: Path, corpus) -> None:
    cfg = profiler.ProfileConfig(seconds=1.0, top=5, repeats=1, warmup=1, threads=1)
    ((profile, paths),) = profiler.profile_bundle(bundle, ["vocoder_fp32.onnx"], cfg, str(corpus.root))
    assert [p.name for p in paths] == ["vocoder_fp32.onnx.json", "vocoder_fp32.onnx.md"]
    assert json.loads(paths[0].read_text())["artifact"] == "vocoder_fp32.onnx"
    assert profile["session"]["intra_op_threads"] == 1 and profile["threads"] == 1
    ops = profile["op_types"]
    # Convolutions are where HiFi-GAN's time goes (ORT fuses a Conv and its activation into FusedConv).
    assert ops[0]["op_type"] in ("Conv", "FusedConv")
    assert sum(r["share"] for r in ops if r["op_type"] in ("Conv", "FusedConv", "ConvTranspose")) > 0.8
    assert sum(r["share"] for r in ops) == pytest.approx(1.0)
    assert sum(r["ms"] for r in ops) == pytest.approx(profile["node_ms_total"])
    # Every conv of the file was found in the trace, and the count is the torch-hook count of the model.
    assert profile["ops_counted"] == profile["ops_in_graph"] and not profile["uncounted_nodes"]
    source = next(r for r in read_bundle(bundle) if r.component == "vocoder" and r.stage == "source")
    frames = profile["input"]["frames"]
    assert profile["ops_counted"] == pytest.approx(flops.vocoder_flops_per_frame(source.model) * frames, rel=1e-9)
    # HiFi-GAN V1 at 22.05 kHz, hop 256: about 53 GFLOP per second of audio (issue 13).
    assert 52e9 < profile["achieved"]["whole_graph"]["ops_per_audio_s"] < 54e9
    assert profile["achieved"]["int8"]["ops"] == 0 and profile["achieved"]["fp32"]["ops_per_s_in_nodes"] > 0
    top = profile["nodes"][: cfg.top]
    assert [n["ms"] for n in top] == sorted((n["ms"] for n in top), reverse=True)
    text = profiler.markdown(profile, cfg.top)
    assert "theoretical peak" in text and "GFLOP/s" in text
    # A rate above its estimate (a VM reporting its nominal clock while the cores boost) is said, not
    # printed as a share over 100 % without a word.
    above = profile["achieved"]["fp32"]["peak_fraction_threads"] > 1.0
    assert ("achieved above the theoretical peak" in text) == above
    slow_clock = json.loads(json.dumps(profile))
    slow_clock["achieved"]["fp32"]["peak_fraction_threads"] = 1.2
    assert "achieved above the theoretical peak: the clock the estimate uses" in profiler.markdown(slow_clock, 1)


def test_flops_of_a_polyphase_vocoder_graph_are_counted_through_its_interleave(tmp_path: Path) -> None:
    """The polyphase upsamplers' interleave computes lengths in the graph (Shape -> Reshape): the count
    must follow them to every later conv, and equal the transposed graph's up to one extra frame."""
    from voxport.export.onnx import OnnxExportConfig, export_graph
    from voxport.models.vocoder import V2_22K, graph_spec, seeded_vocoder

    model, frames = seeded_vocoder(V2_22K, 0), 40
    totals = {}
    for form in ("transposed", "polyphase"):
        path = export_graph(graph_spec(model, form), tmp_path / f"{form}.onnx", OnnxExportConfig())
        counted = flops.graph_macs(path, {"mel": (1, 80, frames)})
        assert len(counted) == 78  # conv_pre, 4 upsamplers, 72 resblock convs, conv_post
        totals[form] = sum(m.macs for _, m in counted.values())
    # A kernel-2 conv over T + 1 frames per upsampler: the transposed conv's MACs x (T + 1) / T.
    assert totals["transposed"] < totals["polyphase"] < totals["transposed"] * (frames + 1) / frames


def test_peaks_follow_the_formula_for_each_flag_set() -> None:
    mhz, cores = 2000.0, 2
    avx2 = ("avx", "avx2", "fma")
    fp32 = hardware.estimate_peak(avx2, cores, mhz)
    int8 = hardware.estimate_int8_peak(avx2, cores, mhz)
    assert fp32.flops_per_cycle_per_core == 32 and int8.ops_per_cycle_per_core == 64  # INT8 = 2 x FP32 on AVX2
    assert int8.ops_per_s == pytest.approx(cores * mhz * 1e6 * 64)
    vnni = hardware.estimate_int8_peak((*avx2, "avx512f", "avx512bw", "avx512_vnni"), cores, mhz)
    assert vnni.ops_per_cycle_per_core == 256  # vpdpbusd: 64 MACs = 128 OP per port, 2 ports
    assert hardware.estimate_int8_peak((*avx2, "avx512bw"), cores, mhz).ops_per_cycle_per_core == 128
    assert hardware.estimate_int8_peak((*avx2, "avx_vnni"), cores, mhz).ops_per_cycle_per_core == 128
    amx = hardware.estimate_int8_peak((*avx2, "avx512_vnni", "amx_tile", "amx_int8"), cores, mhz)
    assert amx.ops_per_cycle_per_core == 2048 and "AMX" in amx.method
    assert hardware.estimate_int8_peak((*avx2, "avx512_vnni"), cores, mhz, fma_units=1).ops_per_cycle_per_core == 128
    with pytest.raises(ValueError):
        hardware.estimate_int8_peak(avx2, 0, mhz)


def _int8_graphs(tmp_path: Path) -> Path:
    """One tiny graph with each way a convolution runs in 8 bits, plus a float one: QDQ Conv (x and w
    through DequantizeLinear, its output through QuantizeLinear), QLinearConv, ConvInteger, plain Conv."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    c, m, k = 4, 6, 3
    w8 = numpy_helper.from_array(rng.integers(-20, 20, (m, c, k)).astype(np.int8), "w8")
    wf = numpy_helper.from_array(rng.normal(size=(m, c, k)).astype(np.float32), "wf")
    scalars = [numpy_helper.from_array(np.array(v, dtype), n) for n, v, dtype in
               (("s", 0.05, np.float32), ("zu", 128, np.uint8), ("zs", 0, np.int8))]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zu"], ["xq"], name="q"),
        helper.make_node("DequantizeLinear", ["xq", "s", "zu"], ["xd"], name="dq_x"),
        helper.make_node("DequantizeLinear", ["w8", "s", "zs"], ["wd"], name="dq_w"),
        helper.make_node("Conv", ["xd", "wd"], ["yd"], name="conv_qdq", pads=[1, 1]),
        helper.make_node("QuantizeLinear", ["yd", "s", "zu"], ["y_qdq"], name="q_y"),  # ORT fuses DQ-Conv-Q
        helper.make_node("QLinearConv", ["xq", "s", "zu", "w8", "s", "zs", "s", "zu"], ["y_ql"], name="conv_qlinear",
                         pads=[1, 1]),
        helper.make_node("ConvInteger", ["xq", "w8", "zu", "zs"], ["y_int"], name="conv_integer", pads=[1, 1]),
        helper.make_node("Conv", ["x", "wf"], ["y_f"], name="conv_float", pads=[1, 1]),
    ]
    outputs = [helper.make_tensor_value_info(n, e, [1, m, "t"]) for n, e in
               (("y_qdq", TensorProto.UINT8), ("y_ql", TensorProto.UINT8), ("y_int", TensorProto.INT32),
                ("y_f", TensorProto.FLOAT))]
    graph = helper.make_graph(nodes, "int8_convs", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                  [1, c, "t"])],
                              outputs, initializer=[w8, wf, *scalars])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    path = tmp_path / "int8_convs.onnx"
    onnx.save(model, path)
    return path


def test_int8_convolutions_count_as_integer_ops_in_the_file_and_at_run_time(tmp_path: Path) -> None:
    from voxport.runtime.backends.onnxruntime import SessionSettings, open_session

    path = _int8_graphs(tmp_path)
    macs = 1 * 6 * 10 * 4 * 3  # batch x out channels x out length x (in channels x kernel)
    counted = flops.graph_macs(path, {"x": (1, 4, 10)})
    assert {name: (m.macs, m.precision) for name, (_, m) in counted.items()} == {
        "conv_qdq": (macs, "int8"), "conv_qlinear": (macs, "int8"), "conv_integer": (macs, "int8"),
        "conv_float": (macs, "fp32")}
    # What ORT runs: the QDQ Conv fused into a QLinearConv (renamed `<name>_token_<n>`), still counted
    # as INT8 from its 8-bit input, with the file's MACs (its pre-packed weight is not in the trace).
    session = open_session(path, settings=SessionSettings(intra_op_threads=1), profile_prefix=tmp_path / "ort")
    feed = {"x": np.random.default_rng(1).normal(size=(1, 4, 10)).astype(np.float32)}
    for _ in range(2):
        session.run(None, feed)
    summary = profiler.summarize(json.loads(Path(session.end_profiling()).read_text()), 1, counted)
    by_graph_node = {n["graph_node"]: n for n in summary["nodes"] if n["graph_node"]}
    assert set(by_graph_node) == set(counted)
    assert {g: (n["precision"], n["ops"]) for g, n in by_graph_node.items()} == {
        g: ("fp32" if g == "conv_float" else "int8", 2 * macs) for g in counted}
    assert by_graph_node["conv_qdq"]["op_type"] != "Conv"  # ORT really runs it in integers
    assert summary["ops_counted"] == summary["ops_in_graph"] == 4 * 2 * macs


def test_profile_refuses_what_it_cannot_profile(bundle: Path) -> None:
    records = read_bundle(bundle)
    assert {r.file for r in profiler.pick(records, None)} == {"vocoder_fp32.onnx"}
    with pytest.raises(ConfigError, match="no artifact"):
        profiler.pick(records, ["nope.onnx"])
    with pytest.raises(ConfigError, match="only ONNX artifacts .* and OpenVINO IRs .* can be profiled"):
        profiler.pick(records, ["vocoder_fp32.pt"])
    with pytest.raises(ConfigError):
        profiler.ProfileConfig(repeats=0)


def test_profile_command_help_and_one_line_errors(bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from voxport.cli import main

    with pytest.raises(SystemExit) as done:
        main(["profile", "--help"])
    assert done.value.code == 0 and "theoretical" in capsys.readouterr().out
    assert main(["profile", "--bundle", str(bundle), "--artifact", "nope.onnx"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("voxport profile: error:") and "nope.onnx" in err and "\n" not in err
