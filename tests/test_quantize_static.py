"""Static INT8 of the real HiFi-GAN: structure (integer kernels, what stays float), the gate in both
directions on held-out real speech, and global torch settings left alone.

Short clips and MinMax calibration keep this fast; the stage itself is what `voxport build` runs.
"""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_stage, stage_context

from voxport.errors import ConfigError, GateError
from voxport.pipeline.engine import BuildContext
from voxport.pipeline.records import Record, read_bundle, read_record
from voxport.quantize import qdq, search
from voxport.quantize.config import QuantizeConfig
from voxport.runtime.backends.onnxruntime import SessionSettings

FAST = {"calibration": "minmax", "calibration_clips": 3, "crop_seconds": 0.5, "rank_clips": 1, "rank_seconds": 0.25,
        "search_clips": 2, "search_seconds": 1.0, "search_max_trials": 5, "graph": "vocoder"}
GATES = {"vocoder": {"int8-static": {"max_log_mel_increase_db": 0.3, "max_pesq_drop": 0.1,
                                     "require_speedup": False}}}  # timing on a shared CI box is noise


def stage_dir(bundle: Path, tmp: Path, component: str) -> tuple[Path, list[Record]]:
    """A private bundle directory (hard links) holding one component's source and FP32 exports."""
    records = [r for r in read_bundle(bundle) if r.component == component]
    for r in records:
        for name in (r.file, r.file + ".json"):
            os.link(bundle / name, tmp / name)
    return tmp, records


def torch_settings() -> tuple:
    return (torch.get_num_threads(), torch.is_grad_enabled(), torch.get_default_dtype(),
            torch.are_deterministic_algorithms_enabled(), torch.is_inference_mode_enabled(),
            torch.backends.quantized.engine)


@pytest.fixture
def ctx(bundle: Path, corpus, tmp_path: Path) -> BuildContext:
    bundle_dir, records = stage_dir(bundle, tmp_path, "vocoder")
    return stage_context(bundle_dir, corpus, records, GATES, gate_seconds=1.0, timing_seconds=0.5)


def parent(ctx: BuildContext) -> Record:
    return ctx.find("vocoder", "vocoder", "onnx")


@pytest.mark.slow
def test_naive_all_conv_int8_fails_the_gate_lists_every_metric_and_leaves_nothing(ctx: BuildContext):
    before = sorted(p.name for p in ctx.bundle_dir.iterdir())
    cfg = {**FAST, "search": "none", "keep_output_layer_float": False}
    with pytest.raises(GateError) as info:
        run_stage(ctx, "quantize_static", parent(ctx), cfg)
    err = info.value
    text = str(err)
    assert "log-mel distance" in text and "PESQ drop" in text
    figures = err.metrics["quality"]
    assert figures["log_mel_distance_increase_db"] > 0.3 and figures["pesq_drop"] > 0.1
    # It is INT8 (74 integer convolutions) and still fails: the quality, not the format, decides.
    assert err.metrics["integer_ops"]["runtime"]["QLinearConv"] == 74
    assert sorted(p.name for p in ctx.bundle_dir.iterdir()) == before


# Ranking a first-stage layer recomputes almost the whole network; leaving stage 1 out by name keeps
# the test short and checks that named exclusions stay float through the whole stage.
STAGE1 = [f"/generator/resblocks.{b}/convs{c}.{i}/Conv" for b in range(3) for c in (1, 2) for i in range(3)]


@pytest.mark.slow
def test_searched_int8_passes_with_integer_kernels_and_float_where_needed(ctx: BuildContext):
    settings = torch_settings()
    record = run_stage(ctx, "quantize_static", parent(ctx), {**FAST, "exclude_nodes": STAGE1})
    assert torch_settings() == settings
    assert record.precision == "int8-static" and record.format == "onnx" and record.quality["passed"]
    assert read_record(ctx.bundle_dir / record.file) == record
    ops = record.parity["integer_ops"]
    assert ops["runtime"]["QLinearConv"] == len(record.parity["quantized_nodes"]) > 0
    assert ops["file"]["QuantizeLinear"] > 0 and ops["file"]["DequantizeLinear"] > 0
    assert ops["runtime"]["ConvTranspose"] == 4  # no integer ConvTranspose exists
    floats = record.parity["float_nodes"]
    assert all("ConvTranspose" in why for node, why in floats.items() if "ConvTranspose" in node)
    assert "output layer" in floats["/generator/conv_post/Conv"]
    assert all("exclude_nodes" in floats[node] for node in STAGE1)
    assert set(floats) & set(record.parity["quantized_nodes"]) == set()
    # The naive trial (everything) failed on calibration clips; what stayed float says why.
    assert record.parity["search"]["trials"][0]["passed"] is False
    assert any("error alone" in why for why in floats.values())
    q = record.quality
    assert q["log_mel_distance_increase_db"] <= 0.3 and q["pesq_drop"] <= 0.1
    assert {"speedup_vs_torch_fp32", "parent_speedup_vs_torch_fp32", "speedup_vs_parent"} <= set(record.speed)
    # Timed under both ORT optimization levels in one run; the faster one is what the runtime uses.
    session = record.speed["session"]
    assert set(session["medians_s"]) == {"all", "extended"}
    assert session["medians_s"][session["graph_optimization"]] == min(session["medians_s"].values())
    # The whole settings the timing used, so the runtime reopens the artifact exactly so.
    assert SessionSettings.from_dict(session) == SessionSettings(graph_optimization=session["graph_optimization"],
                                                                 intra_op_threads=ctx.threads)
    assert session["allow_spinning"] is False and session["inter_op_threads"] == 1
    assert record.speed["median_s"] == min(session["medians_s"].values())


@pytest.mark.slow
def test_polyphase_export_is_exact_and_its_upsamplers_are_int8_candidates(ctx: BuildContext):
    """`export.upsampling=polyphase`: the four ConvTranspose become stride-1 Convs, the export passes
    FP32 parity against the model as trained, and the INT8 search ranks and may quantize them (its
    layer emulation rebuilds the same form from the record)."""
    source = ctx.find("vocoder", "vocoder", "torch")
    export = run_stage(ctx, "onnx_export", source, {"graph": "vocoder", "upsampling": "polyphase"})
    assert export.model["graph_form"] == {"upsampling": "polyphase"} and export.config["upsampling"] == "polyphase"
    # Parity is measured against the parent as trained (ConvTranspose, float64), as for any export.
    assert export.parity["wav_snr_db_min"] > 90 and export.parity["wav_max_abs_vs_torch_fp32"] < 1e-3
    ops = qdq.op_counts(ctx.bundle_dir / export.file)
    assert "ConvTranspose" not in ops and ops["Conv"] == 74 + 4
    upsamplers = [f"/generator/ups.{i}/conv/Conv" for i in range(4)]
    # Only the upsamplers and conv_pre are candidates: ranking every resblock layer adds minutes.
    resblocks = [f"/generator/resblocks.{b}/convs{c}.{i}/Conv" for b in range(12) for c in (1, 2) for i in range(3)]
    record = run_stage(ctx, "quantize_static", export, {**FAST, "exclude_nodes": resblocks})
    ranked = [node for node, _ in record.parity["search"]["ranking"]]
    assert set(upsamplers) <= set(ranked)
    assert set(upsamplers) <= set(record.parity["quantized_nodes"]) | set(record.parity["float_nodes"])
    assert record.parity["integer_ops"]["runtime"].get("ConvTranspose", 0) == 0
    assert record.quality["passed"]


# Level 2 of HiFi-GAN (resblocks 3-5, 128 channels): every other layer excluded keeps the search short.
LEVEL2 = [f"/generator/resblocks.{b}/convs{c}.{i}/Conv" for b in range(3, 6) for c in (1, 2) for i in range(3)]


@pytest.mark.slow
def test_integer_adds_keep_an_int8_residual_stack_in_integers(ctx: BuildContext):
    """`quantize.integer_adds`: the residual Adds reading a candidate layer join the search; ORT runs
    the accepted ones as QLinearAdd (none stays a float Add with Q/DQ around it), the record lists
    them apart from the layers, and the artifact passes the gate."""
    others = [n for n in _all_convs() if n not in LEVEL2]
    record = run_stage(ctx, "quantize_static", parent(ctx),
                       {**FAST, "exclude_nodes": others, "integer_adds": True, "search": "bisect",
                        "calibration": "percentile", "percentile": 99.99})  # as a build calibrates
    assert record.quality["passed"] and sorted(record.parity["quantized_nodes"]) == sorted(LEVEL2)
    adds = record.parity["integer_adds"]
    report = record.parity["search"]["integer_adds"]
    assert report["eligible"] == 9  # three residual Adds in each of the three resblocks
    assert len(adds) == report["quantized"] > 0 and set(adds) | set(report["left_float"]) == {
        f"/generator/resblocks.{b}/Add{suffix}" for b in range(3, 6) for suffix in ("", "_1", "_2")}
    runtime = record.parity["integer_ops"]["runtime"]
    assert runtime["QLinearAdd"] == len(adds)
    assert runtime["QLinearConv"] == len(LEVEL2)
    assert not set(adds) & set(record.parity["float_nodes"])  # the layers' report stays about layers


def test_an_add_ranks_with_the_layers_it_reads_at_the_larger_error(ctx: BuildContext, tmp_path: Path):
    from voxport.quantize.static import _ranking

    model = qdq.load_graph(qdq.preprocess(ctx.bundle_dir / parent(ctx).file, tmp_path / "pre.onnx"))
    conv = "/generator/resblocks.{}/convs{}.{}/Conv".format
    # Two layers of level 2 (1 MAC each) and one of the full-rate level (0.25: a quarter of the channels).
    errors = {conv(4, 2, 1): 0.02, conv(4, 2, 0): 0.05, conv(10, 2, 0): 0.02}
    macs = {conv(4, 2, 1): 1.0, conv(4, 2, 0): 1.0, conv(10, 2, 0): 0.25}
    adds = qdq.residual_adds(model, list(errors))
    assert adds == ["/generator/resblocks.4/Add", "/generator/resblocks.4/Add_1", "/generator/resblocks.10/Add"]
    # As cheap as their layers, a level-2 Add follows its layer; the full-rate Add costs 40x its layer.
    errors |= {adds[0]: 0.01, adds[1]: 0.03, adds[2]: 0.8}
    ranked = _ranking(errors, macs, "error_per_mac", model, adds)
    assert [n for n, _ in ranked] == [conv(4, 2, 1), conv(4, 2, 0), adds[0], adds[1], conv(10, 2, 0), adds[2]]
    assert dict(ranked) == errors  # the record shows each node's own error
    by_error = [n for n, _ in _ranking(errors, macs, "error", model, adds)]
    assert by_error.index(adds[0]) > by_error.index(conv(4, 2, 0))  # never before what it reads
    assert _ranking(errors, macs, "error", model, []) == search.rank(errors, macs, "error")


def _all_convs() -> list[str]:
    return ([f"/generator/resblocks.{b}/convs{c}.{i}/Conv" for b in range(12) for c in (1, 2) for i in range(3)]
            + ["/generator/conv_pre/Conv"])


def test_residual_adds_are_the_adds_reading_a_quantized_layer_in_graph_order(ctx: BuildContext, tmp_path: Path):
    model = qdq.load_graph(qdq.preprocess(ctx.bundle_dir / parent(ctx).file, tmp_path / "pre.onnx"))
    second = [f"/generator/resblocks.4/convs2.{i}/Conv" for i in range(3)]
    assert qdq.residual_adds(model, second) == ["/generator/resblocks.4/Add", "/generator/resblocks.4/Add_1",
                                                "/generator/resblocks.4/Add_2"]
    # A first conv of a pair feeds a LeakyRelu, not an Add; the upsamplers feed the resblocks' input.
    assert qdq.residual_adds(model, [f"/generator/resblocks.4/convs1.{i}/Conv" for i in range(3)]) == []
    assert qdq.residual_adds(model, []) == []
    everything = qdq.residual_adds(model, _all_convs())
    assert len(everything) == 36 and everything == [n.name for n in model.graph.node if n.name in set(everything)]
    qc = QuantizeConfig(integer_adds=True)
    assert qc.quantized_op_types == ("Conv", "Add") and QuantizeConfig().quantized_op_types == ("Conv",)
    with pytest.raises(ConfigError, match="integer_adds"):
        QuantizeConfig(integer_adds="yes")


def test_exclusions_stay_float_in_the_quantized_graph(ctx: BuildContext, tmp_path: Path):
    excluded = "/generator/resblocks.3/convs1.0/Conv"
    qc = QuantizeConfig.from_cfg({**FAST, "exclude_nodes": [excluded], "calibration_clips": 1})
    pre = qdq.preprocess(ctx.bundle_dir / parent(ctx).file, tmp_path / "pre.onnx")
    model = qdq.load_graph(pre)
    candidates, kept = qdq.candidate_nodes(model, qc)
    assert excluded not in candidates and "exclude_nodes" in kept[excluded]
    assert "/generator/conv_post/Conv" not in candidates and len(candidates) == 72
    clips = ctx.component("vocoder").calibration_clips(qc.calibration_clips, qc.crop_seconds)
    feeds = [{"mel": c.mel[None]} for c in clips]
    out = qdq.quantize(pre, tmp_path / "q.onnx", qc, candidates, tmp_path / "ranges.json", feeds)
    graph = qdq.load_graph(out).graph
    producer = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        if node.op_type in ("Conv", "ConvTranspose"):
            weight_from = producer.get(node.input[1])
            quantized = weight_from is not None and weight_from.op_type == "DequantizeLinear"
            assert quantized == (node.name in candidates), node.name
    with pytest.raises(ConfigError, match="exclude_nodes"):
        qdq.candidate_nodes(model, QuantizeConfig(exclude_nodes=("/no/such/Conv",)))


def test_bf16_is_skipped_with_a_reason_where_the_cpu_lacks_native_bfloat16(ctx: BuildContext):
    from conftest import compose_config
    from omegaconf import OmegaConf

    from voxport.pipeline.engine import plan_stages, run_planned
    from voxport.quantize.bf16 import native_bf16

    native, why = native_bf16()
    if native:
        pytest.skip(f"this host computes bfloat16 natively ({why})")
    cfg = compose_config("stages=export_only")
    OmegaConf.update(cfg, "stages.vocoder", [{"kind": "bf16", "parent": "torch"}], force_add=True)
    before = sorted(p.name for p in ctx.bundle_dir.iterdir())
    (stage,) = [s for s in plan_stages(cfg) if s.kind == "bf16"]
    assert run_planned(ctx, stage, cfg) == []
    assert [(s["component"], s["kind"]) for s in ctx.skipped] == [("vocoder", "bf16")]
    assert "avx512_bf16" in ctx.skipped[0]["reason"] and "slower" in ctx.skipped[0]["reason"]
    assert sorted(p.name for p in ctx.bundle_dir.iterdir()) == before


@pytest.mark.slow
def test_bf16_artifact_reloads_as_bfloat16_with_float32_boundaries(bundle: Path, tmp_path: Path):
    """The artifact format the bf16 stage writes on a native host (exercised here without timing)."""
    from voxport.models import registry

    source = next(r for r in read_bundle(bundle) if r.component == "vocoder" and r.stage == "source")
    fp32 = registry.load_torch_artifact(bundle / source.file, source.model)
    registry.save_torch_artifact(fp32.to(torch.bfloat16), tmp_path / "v_bf16.pt")
    model = {**source.model, "dtype": "bfloat16"}
    module = registry.load_torch_artifact(tmp_path / "v_bf16.pt", model)
    assert next(module.parameters()).dtype == torch.bfloat16
    spec = registry.graph_specs(module, model)["vocoder"]
    mel = torch.full((1, 80, 6), -6.0)
    with torch.inference_mode():
        (wav,) = spec.module(mel)
    assert wav.dtype == torch.float32 and wav.shape == (1, 1, 6 * 256)


def _tiny_conv(path: Path) -> Path:
    import numpy as np
    import onnx
    from onnx import helper

    w = helper.make_tensor("w", onnx.TensorProto.FLOAT, [4, 4, 3],
                           np.random.default_rng(0).standard_normal(48).astype(np.float32).ravel())
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1])], "tiny",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 256])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 256])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


def test_histogram_calibrators_clip_outliers_with_asymmetric_ranges(tmp_path: Path):
    """ORT's own defaults would make Entropy equal MinMax (128 bins: one candidate threshold) and
    Percentile symmetric; `qdq.calibrate` must give neither."""
    import numpy as np
    from onnxruntime.quantization.calibrate import load_tensors_data

    model = _tiny_conv(tmp_path / "tiny.onnx")
    rng = np.random.default_rng(1)
    # Non-negative activations with rare large peaks (1 in 2000 values), like LeakyReLU outputs of speech.
    feeds = [{"x": (rng.exponential(1.0, (1, 4, 256)) + (rng.random((1, 4, 256)) < 0.0005) * 30).astype(np.float32)}
             for _ in range(6)]
    ranges = {}
    for method in ("minmax", "entropy", "percentile"):
        qc = QuantizeConfig(calibration=method, percentile=99.9, op_types=("Conv",))
        cache = qdq.calibrate(model, qc, feeds, tmp_path / f"{method}.json")
        low, high = load_tensors_data(cache)["x"].range_value
        ranges[method] = (float(np.min(low)), float(np.max(high)))
    for method, clipped in (("entropy", 0.9), ("percentile", 0.5)):
        low, high = ranges[method]
        assert high < clipped * ranges["minmax"][1], f"{method} did not clip the peaks: {ranges}"
        assert low >= 0.0, f"{method} range is symmetric (half the codes wasted on values never seen): {ranges}"


@pytest.mark.slow
def test_static_int8_chains_after_structured_pruning_and_is_gated_against_the_original(ctx: BuildContext):
    from voxport.models.checkpoint import sha256_file

    ctx.gates = {"vocoder": {**GATES["vocoder"], "fp32": {"max_log_mel_increase_db": 0.3, "max_pesq_drop": 0.1,
                                                          "require_speedup": False}}}
    prune_cfg = {"calibration_clips": 3, "calibration_seconds": 1.0, "graph": "vocoder", "default_sparsity": 0.05}
    run_stage(ctx, "prune_structured", ctx.source("vocoder"), prune_cfg)
    pruned = run_stage(ctx, "onnx_export", ctx.records[-1], {"graph": "vocoder"})
    assert ctx.find("vocoder", "vocoder", "onnx") == pruned  # `parent: onnx` now means the pruned model
    assert pruned.quality["inherited_from"] == "vocoder_pruned_obs_structured_5.pt"  # the gate it passed
    pruned_sha = sha256_file(ctx.bundle_dir / pruned.file)
    # Short clips and 3 calibration clips make pruning cost more than in a build; a wider INT8
    # budget keeps this test about the chain, not about how much of the budget pruning left.
    ctx.gates["vocoder"]["int8-static"] = {"max_log_mel_increase_db": 1.0, "max_pesq_drop": 0.4,
                                           "require_speedup": False}
    record = run_stage(ctx, "quantize_static", pruned, {**FAST, "exclude_nodes": STAGE1, "search_reference": "parent"})
    assert record.file == "vocoder_pruned_obs_structured_5_int8_static.onnx"
    assert record.parity["search"]["budget_reference"].startswith(f"the parent {pruned.file}")
    spent = record.parity["search"]["budget_spent_by_parent"]  # the pruned model's own held-out figures
    assert spent == {k: pytest.approx(pruned.quality[k]) for k in ("log_mel_distance_increase_db", "pesq_drop")}
    assert sha256_file(ctx.bundle_dir / pruned.file) == pruned_sha  # the parent is never written over
    assert record.parent == pruned.file and record.model == pruned.model
    assert record.model["config"]["resblock_inner_channels"]  # the pruned network's shape, not V1's
    # One gate for the whole chain: relative to the ORIGINAL PyTorch FP32 model, not to the pruned parent.
    assert record.parity["reference"].startswith("PyTorch FP32 original")
    vocoder = ctx.component("vocoder")
    original = vocoder.baseline(vocoder.gate_clips())
    assert record.quality["fp32_log_mel_distance_db"] == pytest.approx(original["log_mel_distance_db"])
    assert record.quality["log_mel_distance_increase_db"] <= 1.0
    assert record.parity["integer_ops"]["runtime"]["QLinearConv"] > 0


def test_the_search_budget_is_measured_against_the_reference_it_is_given(ctx: BuildContext):
    """`quantize.search_reference=parent`: the search's calibration budget counts only what INT8 adds
    to the parent (a pruned parent's own cost is left to the final held-out gate vs the original)."""
    from voxport.export.onnx import ort_runner

    vocoder = ctx.component("vocoder")
    fp32 = ort_runner(ctx.bundle_dir / parent(ctx).file)

    def degraded(feed):  # a stand-in for a lossy parent: the FP32 export plus a fixed hiss 30 dB down
        wav = fp32(feed)["wav"]
        hiss = np.random.default_rng(0).standard_normal(wav.shape).astype(np.float32)
        return {"wav": wav + hiss * float(np.sqrt(np.mean(wav ** 2))) * 10 ** (-30 / 20)}

    to_original = vocoder.search_judge("vocoder", "int8-static", 0.7, clips=2, seconds=1.0)
    to_parent = vocoder.search_judge("vocoder", "int8-static", 0.7, clips=2, seconds=1.0, reference=degraded)
    figures, _ = to_original.evaluate(degraded)
    assert figures["log_mel_distance_increase_db"] > 0.05  # the hiss costs against the original
    figures, failures = to_parent.evaluate(degraded)
    assert figures["log_mel_distance_increase_db"] == pytest.approx(0.0, abs=1e-9) and not failures
    assert figures["fp32_log_mel_distance_db"] > vocoder.baseline(to_parent.clips)["log_mel_distance_db"]
    figures, _ = to_parent.evaluate(fp32)  # the clean model is BETTER than this reference
    assert figures["log_mel_distance_increase_db"] < 0
    # Pruning and INT8 share one gate: what the parent already spent (held out, vs the original) is
    # taken from the search's budget before the margin; a parent better than FP32 earns no credit.
    shared = vocoder.search_judge("vocoder", "int8-static", 0.7, clips=2, seconds=1.0, reference=degraded,
                                  spent={"log_mel_distance_increase_db": 0.12, "pesq_drop": -0.02})
    assert shared.gate["max_log_mel_increase_db"] == pytest.approx(0.7 * (0.3 - 0.12))
    assert shared.gate["max_pesq_drop"] == pytest.approx(0.7 * 0.1)
    used_up = vocoder.search_judge("vocoder", "int8-static", 0.7, clips=2, seconds=1.0, reference=fp32,
                                   spent={"log_mel_distance_increase_db": 0.35, "pesq_drop": 0.0})
    assert used_up.gate["max_log_mel_increase_db"] == 0.0
    figures, failures = used_up.evaluate(degraded)  # anything INT8 would add now fails the search
    assert figures["log_mel_distance_increase_db"] > 0.05 and failures
    with pytest.raises(ConfigError, match="search_reference"):
        QuantizeConfig(search_reference="pruned")


def test_timing_tries_every_session_variant_and_records_the_fastest(bundle: Path, corpus, tmp_path: Path) -> None:
    """`timing.session_*` widened: the artifact is timed under every combination side by side; the
    record keeps each variant's median and the whole settings of the fastest, which the runtime opens."""
    import dataclasses

    from voxport.pipeline.engine import time_artifact
    from voxport.runtime.backends.onnxruntime import recorded_settings

    bundle_dir, records = stage_dir(bundle, tmp_path, "speaker_encoder")
    ctx = stage_context(bundle_dir, corpus, records, GATES, timing_seconds=0.5)
    ctx.timing = dataclasses.replace(ctx.timing, session_levels=("all",), session_threads=(0, 1),
                                     session_spinning=(False, True))
    ctx.threads = 2
    record = ctx.find("speaker_encoder", "speaker_encoder", "onnx")
    source = ctx.find("speaker_encoder", "speaker_encoder", "torch")
    speed = time_artifact(ctx, record, source, ctx.component("speaker_encoder"), time_parent=False)
    session = speed["session"]
    assert set(session["medians_s"]) == {"2t,spin=false", "2t,spin=true", "1t,spin=false", "1t,spin=true"}
    best = min(session["medians_s"], key=session["medians_s"].get)
    threads, spin = best.split(",")
    assert session["intra_op_threads"] == int(threads[:-1]) and session["allow_spinning"] == (spin == "spin=true")
    assert speed["median_s"] == session["medians_s"][best]
    recorded = recorded_settings(dataclasses.replace(record, speed=speed), ["CPUExecutionProvider"])
    assert (recorded.intra_op_threads, recorded.allow_spinning) == (session["intra_op_threads"],
                                                                   session["allow_spinning"])
