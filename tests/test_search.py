"""Mixed precision search: its logic on a known answer, and the emulated ranking against real ORT.

The logic tests use a synthetic gate with a known answer (fast); the real case quantizes single
layers of the real HiFi-GAN with ONNX Runtime and checks that the PyTorch emulation used for the
ranking reproduces ORT's error for each of them.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from voxport.errors import ConfigError
from voxport.evaluate import metrics, quality
from voxport.quantize import emulate, qdq, search
from voxport.quantize.config import QuantizeConfig

ERRORS = {"a": 0.01, "b": 0.02, "c": 0.03, "d": 0.5, "e": 0.04, "f": 2.0}


def budget_gate(limit: float, calls: list[list[str]]):
    """A gate whose error is the sum of the layers' errors (the search assumes rough additivity)."""

    def evaluate(nodes: list[str]) -> search.Trial:
        calls.append(list(nodes))
        total = sum(ERRORS[n] for n in nodes)
        failures = [] if total <= limit else [f"error {total:.2f} > {limit}"]
        return search.Trial(tuple(nodes), {"total": total}, failures)

    return evaluate


def test_rank_orders_by_error_and_by_error_per_mac():
    assert [n for n, _ in search.rank(ERRORS)] == ["a", "b", "c", "e", "d", "f"]
    macs = {"a": 1.0, "b": 1.0, "c": 1.0, "d": 100.0, "e": 1.0, "f": 1.0}
    assert [n for n, _ in search.rank(ERRORS, macs, "error_per_mac")][0] == "d"
    with pytest.raises(ConfigError):
        search.rank(ERRORS, None, "error_per_mac")


def test_everything_first_and_no_ranking_when_it_passes():
    calls: list[list[str]] = []

    def ranking():
        raise AssertionError("ranking must not run when quantizing everything passes")

    result = search.search(list(ERRORS), ranking, budget_gate(10.0, calls), "greedy", 10)
    assert sorted(result.quantized) == sorted(ERRORS) and len(calls) == 1 and not result.float_nodes


def test_bisection_finds_longest_passing_prefix_and_says_why():
    calls: list[list[str]] = []
    ranking = search.rank(ERRORS)  # a b c e d f
    result = search.search(list(ERRORS), lambda: ranking, budget_gate(0.12, calls), "bisect", 20)
    assert result.quantized == ["a", "b", "c", "e"]  # 0.10; adding d (0.5) breaks the budget
    assert set(result.float_nodes) == {"d", "f"}
    assert "failed the gate" in result.float_nodes["d"] and "0.5" in result.float_nodes["d"]
    assert "ranked after" in result.float_nodes["f"]
    assert len(calls) <= 1 + int(np.ceil(np.log2(len(ERRORS)))) + 1


def test_greedy_adds_a_late_layer_that_still_fits():
    calls: list[list[str]] = []
    errors = {"a": 0.01, "b": 0.02, "c": 0.3, "d": 0.31}
    ranking = search.rank(errors)

    def evaluate(nodes: list[str]) -> search.Trial:
        calls.append(list(nodes))
        # "d" alone is harmless with the rest (the ranking's error was pessimistic); "c" is not.
        bad = "c" in nodes
        return search.Trial(tuple(nodes), {}, ["too loud"] if bad else [])

    greedy = search.search(list(errors), lambda: ranking, evaluate, "greedy", 10)
    assert greedy.quantized == ["a", "b", "d"] and list(greedy.float_nodes) == ["c"]
    assert "failed the gate" in greedy.float_nodes["c"]
    bisect = search.search(list(errors), lambda: ranking, evaluate, "bisect", 10)
    assert bisect.quantized == ["a", "b"]


def test_budget_and_mode_none():
    calls: list[list[str]] = []
    result = search.search(list(ERRORS), lambda: search.rank(ERRORS), budget_gate(0.0, calls), "greedy", 2)
    assert len(calls) == 2 and result.quantized == []
    assert all("search budget" in why or "failed" in why for why in result.float_nodes.values())
    assert search.search(list(ERRORS), lambda: [], budget_gate(0.0, []), "none", 0).quantized == list(ERRORS)


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="calibration"):
        QuantizeConfig(calibration="kl")
    with pytest.raises(ConfigError, match="unknown quantize setting"):
        QuantizeConfig.from_cfg({"calibraton": "minmax"})


# ---------------------------------------------------------------------------------------------
# A small real case: single layers of the real HiFi-GAN, ORT vs the emulation


@pytest.mark.slow
def test_emulated_ranking_matches_real_ort_single_layer_errors(vocoder_work: dict):
    w = vocoder_work
    nodes = ["/generator/resblocks.0/convs1.0/Conv", "/generator/resblocks.6/convs2.2/Conv",
             "/generator/resblocks.11/convs2.1/Conv"]
    layers = emulate.qlayers(qdq.load_graph(w["every"]))
    paths = emulate.module_paths(w["pre_model"], w["spec"].module, nodes)
    rate = w["rate"]
    clip = w["clips"][0]
    batch = torch.from_numpy(clip.mel[None].astype(np.float32))

    def distance(ref: np.ndarray, out: np.ndarray) -> float:
        return metrics.log_mel_distance_db(ref.ravel(), out.ravel(), rate)

    from voxport.quantize.static import _sibling_paths

    siblings = _sibling_paths(w["pre_model"], w["spec"].module, nodes)
    # After pre-processing, resblocks 0-2 read one shared LeakyRelu output: ORT quantizes it for all.
    assert len(siblings[nodes[0]]) == 2
    emulated, macs = emulate.layer_errors(w["spec"].module, {n: layers[n] for n in nodes}, paths, [batch],
                                          distance, siblings)
    from voxport.export.onnx import ort_runner

    run_fp32 = ort_runner(w["pre"])
    ref = run_fp32({"mel": clip.mel[None]})["wav"]
    for node in nodes:
        one = qdq.quantize(w["pre"], w["dir"] / "one.onnx", w["qc"], [node], w["cache"])
        real = distance(ref, ort_runner(one)({"mel": clip.mel[None]})["wav"])
        # Same scales, same rounding: the emulation reproduces ORT (up to float summation order).
        assert emulated[node] == pytest.approx(real, rel=0.05, abs=0.01), node
    # The last stage's convolutions are far more sensitive than the first ones (why they stay float).
    assert emulated[nodes[2]] > 5 * emulated[nodes[0]]
    assert all(m > 0 for m in macs.values())


@pytest.mark.slow
def test_emulated_add_errors_match_real_ort(vocoder_work: dict):
    """A quantized Add (ORT's QLinearAdd) rounds both summands, for every reader, and the sum: the
    emulation reproduces ORT's single-Add error for a residual Add of the first level, one of the
    full-rate level and one reading another Add (each mapped through the traced module)."""
    w = vocoder_work
    adds = ["/generator/resblocks.0/Add", "/generator/resblocks.11/Add_2", "/generator/resblocks.5/Add_1"]
    candidates, _ = qdq.candidate_nodes(w["pre_model"], w["qc"])
    assert set(adds) <= set(qdq.residual_adds(w["pre_model"], candidates))
    every = qdq.quantize(w["pre"], w["dir"] / "adds.onnx", w["qc"], [*candidates, *adds], w["cache"])
    qadds = emulate.qadds(qdq.load_graph(every))
    assert set(qadds) == set(adds) and all(len(q.inputs) == 2 and q.output for q in qadds.values())
    sources = emulate.add_sources(w["pre_model"], w["spec"].module, adds)
    # A residual Add reads its layer and the stream: the upsampler's output or the Add before it.
    assert set(sources[adds[0]]) == {("module", "generator.resblocks.0.convs2.0"), ("module", "generator.ups.0")}
    assert set(sources[adds[2]]) == {("add", "/generator/resblocks.5/Add"),
                                     ("module", "generator.resblocks.5.convs2.1")}
    clip = w["clips"][0]
    rate = w["rate"]

    def distance(ref: np.ndarray, out: np.ndarray) -> float:
        return metrics.log_mel_distance_db(ref.ravel(), out.ravel(), rate)

    emulated, work = emulate.layer_errors(w["spec"].module, {}, {}, [torch.from_numpy(clip.mel[None])], distance,
                                          adds=qadds, add_inputs=sources)
    from voxport.export.onnx import ort_runner

    ref = ort_runner(w["pre"])({"mel": clip.mel[None]})["wav"]
    for add in adds:
        one = qdq.quantize(w["pre"], w["dir"] / "one_add.onnx", w["qc"], [add], w["cache"])
        real = distance(ref, ort_runner(one)({"mel": clip.mel[None]})["wav"])
        assert emulated[add] == pytest.approx(real, rel=0.05, abs=0.01), add
    assert emulated[adds[1]] > 3 * emulated[adds[0]]  # the full-rate stream is what 8 bits cannot hold
    assert work[adds[0]] == 256 * clip.mel.shape[1] * 8  # elements of level 1's output (hop 256 = 8 x ...)
    with pytest.raises(ConfigError, match="cannot map ONNX Add"):
        emulate.layer_errors(w["spec"].module, {}, {}, [torch.from_numpy(clip.mel[None])], distance,
                             adds={adds[0]: qadds[adds[0]]}, add_inputs={adds[0]: (None, None)})


@pytest.fixture(scope="module")
def vocoder_work(bundle: Path, corpus, tmp_path_factory) -> dict:
    """The real vocoder's FP32 ONNX, pre-processed, calibrated (MinMax, short real clips) once."""
    from conftest import stage_context

    from voxport.models import registry
    from voxport.pipeline.records import read_bundle

    records = read_bundle(bundle)
    source = next(r for r in records if r.component == "vocoder" and r.stage == "source")
    onnx_rec = next(r for r in records if r.component == "vocoder" and r.format == "onnx")
    module = registry.load_torch_artifact(bundle / source.file, source.model)
    spec = registry.graph_specs(module, source.model)["vocoder"]
    work = tmp_path_factory.mktemp("search")
    qc = QuantizeConfig(calibration="minmax", calibration_clips=3, crop_seconds=0.5, integer_adds=True)
    pre = qdq.preprocess(bundle / onnx_rec.file, work / "pre.onnx")
    pre_model = qdq.load_graph(pre)
    candidates, _ = qdq.candidate_nodes(pre_model, qc)
    ctx = stage_context(bundle, corpus, records, {})
    feeds = [{"mel": c.mel[None]} for c in ctx.component("vocoder").calibration_clips(qc.calibration_clips,
                                                                                     qc.crop_seconds)]
    every = qdq.quantize(pre, work / "all.onnx", qc, candidates, work / "ranges.json", feeds)
    clips = quality.gate_clips(corpus, module.cfg.mel, 0.4, split="calib")[:1]
    return {"dir": work, "qc": qc, "pre": pre, "pre_model": pre_model, "every": every, "cache": work / "ranges.json",
            "spec": spec, "rate": module.cfg.mel.sample_rate, "clips": clips}
