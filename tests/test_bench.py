"""`voxport bench`: timing arithmetic, peak estimate, FLOP count, reports, the regression check, and a
tiny real run on the session bundle. No assertion here depends on how fast anything ran."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config

from voxport.benchmarks import compare, flops, hardware, report, stats
from voxport.benchmarks.run import SYNTH_GRAPHS, _run_job, plan_jobs, run_bench
from voxport.cli import hydra_compare
from voxport.errors import ConfigError
from voxport.pipeline.records import read_bundle

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------- arithmetic


@pytest.mark.parametrize("values", [[3.0], [5.0, 1.0], [1.0, 2.0, 3.0, 4.0, 10.0], list(np.linspace(0.1, 9.0, 17))])
@pytest.mark.parametrize("q", [0.0, 50.0, 90.0, 95.0, 100.0])
def test_percentile_matches_numpy_linear(values: list[float], q: float) -> None:
    assert stats.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_summary_rtf_and_realtime_factor() -> None:
    s = stats.summarize([0.4, 0.2, 0.3, 0.1, 1.0], audio_s=2.0)
    assert s["runs"] == 5 and s["median_s"] == pytest.approx(0.3)
    assert s["p95_s"] == pytest.approx(0.4 + 0.8 * 0.6)  # rank 3.8 between 0.4 and 1.0
    assert (s["min_s"], s["max_s"]) == (0.1, 1.0) and s["mean_s"] == pytest.approx(0.4)
    assert s["rtf"] == pytest.approx(0.15) and s["x_realtime"] == pytest.approx(1 / 0.15)
    assert s["rtf_p95"] == pytest.approx(0.88 / 2.0)
    assert stats.summarize([0.5], audio_s=None)["rtf"] is None
    assert stats.speed_ratio(2.0, 0.5) == 4.0 and stats.speed_ratio(None, 0.5) is None
    with pytest.raises(ValueError):
        stats.percentile([], 50.0)


def test_peak_estimate_from_vector_width_cores_and_clock() -> None:
    avx2 = hardware.estimate_peak(("avx", "avx2", "fma"), cores=2, clock_mhz=2250.0)
    assert avx2.flops_per_cycle_per_core == 32 and avx2.flops_per_s == pytest.approx(144e9)
    assert "2 cores" in avx2.method and "8 lanes" in avx2.method
    avx512 = hardware.estimate_peak(("avx2", "avx512f", "fma"), cores=2, clock_mhz=2250.0)
    assert avx512.fp32_lanes == 16 and avx512.flops_per_s == pytest.approx(2 * avx2.flops_per_s)
    sse = hardware.estimate_peak((), cores=4, clock_mhz=1000.0, fma_units=1)
    assert sse.flops_per_s == pytest.approx(4 * 1e9 * 4 * 2)
    with pytest.raises(ValueError):
        hardware.estimate_peak(("avx2",), cores=0, clock_mhz=1000.0)
    mhz, source = hardware.cpu_clock_mhz()
    assert mhz > 0 and source != "unknown"  # Linux: /proc/cpuinfo at least


def _hifigan_flops_per_frame(cfg) -> float:
    """By hand: 2 x multiply-adds of every conv per mel frame (resblock type 1, full width)."""
    c, total, rate = cfg.upsample_initial_channel, 2 * 80 * cfg.upsample_initial_channel * 7, 1
    for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes, strict=True)):
        c_in, c_out = c >> i, c >> (i + 1)
        total += 2 * c_in * c_out * k * rate  # a transposed conv scatters every input sample
        rate *= u
        total += sum(2 * 2 * c_out * c_out * kr * rate * len(d)
                     for kr, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes, strict=True))
    return total + 2 * (c >> len(cfg.upsample_rates)) * 7 * rate


def test_vocoder_flops_match_a_hand_count_and_shrink_when_pruned() -> None:
    from voxport.models import registry
    from voxport.models.vocoder import V2_22K  # V1's layout at 128 channels: same layers, faster to build

    model = registry.describe("hifigan", V2_22K)
    per_frame = flops.vocoder_flops_per_frame(model)
    assert per_frame == pytest.approx(_hifigan_flops_per_frame(V2_22K), rel=1e-9)
    inner = [[(128 >> (i + 1)) // 2] * 3 for i in range(4) for _ in range(3)]
    pruned = {**model, "config": {**model["config"], "resblock_inner_channels": inner}}
    assert flops.vocoder_flops_per_frame(pruned) < 0.75 * per_frame
    figures = flops.achieved(per_frame, frames=100, seconds=2.0, peak_flops=1e12, cores=2, threads=1)
    assert figures["flops_per_s"] == pytest.approx(per_frame * 50)
    assert figures["peak_fraction_threads"] == pytest.approx(2 * figures["peak_fraction"])


# ------------------------------------------------------------------------------- reports, compare


def _row(row_id: str, median: float, component: str = "vocoder", **extra) -> dict:
    return {"id": row_id, "kind": "graph", "component": component, "graph": component, "file": f"{row_id}.onnx",
            "format": "onnx", "precision": "fp32", "stage": "export", "sparsity": 0.0, "device": "cpu",
            "backend": "OnnxRuntimeBackend", "length": "short", "audio_s": 1.0, "median_s": median,
            "p95_s": median, "min_s": median, "max_s": median, "rtf": median, "x_realtime": 1 / median,
            "load_s": 0.1, "peak_rss_mb": 300.0, "quality": {"wav_snr_db_min": 104.0}, **extra}


def test_compare_names_rows_a_faster_baseline_would_fail() -> None:
    current = {"rows": [_row("a", 1.0), _row("b", 2.0), _row("c", 3.0)]}
    regressions, missing = compare.compare(current, copy.deepcopy(current), max_ratio=1.25)
    assert regressions == [] and missing == []
    faster = copy.deepcopy(current)
    faster["rows"][0]["median_s"] = 0.5   # 2x: regression
    faster["rows"][1]["median_s"] = 1.7   # 1.18x: within 1.25
    faster["rows"].append(_row("gone", 1.0))
    regressions, missing = compare.compare(current, faster, max_ratio=1.25)
    assert [r.row_id for r in regressions] == ["a"] and regressions[0].ratio == pytest.approx(2.0)
    assert missing == ["gone"]
    with pytest.raises(ConfigError):
        compare.compare(current, faster, max_ratio=0.9)


def test_check_raises_naming_rows(tmp_path: Path) -> None:
    current = {"rows": [_row("vocoder/vocoder | v.onnx | cpu | long", 1.0)]}
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps({"rows": [_row("vocoder/vocoder | v.onnx | cpu | long", 0.25)]}))
    with pytest.raises(compare.RegressionError, match=r"\[vocoder/vocoder \| v.onnx \| cpu \| long\].*4.00x"):
        compare.check(current, baseline, 1.25)
    baseline.write_text("{}")
    with pytest.raises(ConfigError, match="no 'rows'"):
        compare.check(current, baseline, 1.25)


def test_cli_spells_compare_as_a_hydra_override() -> None:
    assert hydra_compare(["--compare", "b.json", "bench.repeats=3"]) == ["compare=b.json", "bench.repeats=3"]
    assert hydra_compare(["--compare=x/y.json"]) == ["compare=x/y.json"]
    assert hydra_compare(["compare=z.json"]) == ["compare=z.json"]


def test_json_and_markdown_writers(tmp_path: Path) -> None:
    result = {
        "created": "now", "bundle": "b", "command": "voxport bench", "threads": 2, "wall_s": 1.0,
        "host": {"cpu_model": "CPU", "usable_cores": 2, "cpu_flags": ["avx2"], "gpus": [], "peak_fp32_flops": 1e11,
                 "peak_method": "m", "library_versions": {"torch": "x"}},
        "config": {"warmup": 1, "repeats": 5, "min_repeats": 3, "budget_s": 10.0, "isolate": True},
        "inputs": {"lengths": {"short": {"target_s": 1.0}}}, "method": ["note"], "skipped": [],
        "errors": [{"job": "j", "error": "boom"}],
        "rows": [_row("a", 0.5, flops_per_s=5e9, peak_fraction=0.05, speedup_vs_torch_fp32=2.0, stage="source")],
    }
    path = report.write_json(result, tmp_path / "r.json")
    assert json.loads(path.read_text())["rows"][0]["median_s"] == 0.5
    md = report.markdown(result)
    assert "| vocoder/vocoder | onnxruntime cpu fp32 | short | 1.00 | 500.0 |" in md
    assert "2.00x" in md and "5.0 (5.0%)" in md and "FAILED j: boom" in md
    with pytest.raises(ValueError):  # NaN never reaches a JSON report
        report.write_json({**result, "wall_s": float("nan")}, tmp_path / "nan.json")


@pytest.mark.slow  # 2-3 s: the fast tier keeps its siblings
def test_speed_vs_quality_points_and_charts(tmp_path: Path) -> None:
    rows = [_row("t", 1.0, stage="source", format="torch", quality={}),
            _row("o", 0.5, quality={"wav_snr_db_min": 104.0}),
            _row("q", 0.3, precision="int8-static", stage="quantize-static",
                 quality={"pesq_wb": 3.9, "fp32_pesq_wb": 4.1, "pesq_drop": 0.2}),
            _row("e", 0.1, component="speaker_encoder", stage="source", format="torch", quality={}),
            _row("e8", 0.05, component="speaker_encoder", precision="int8-dynamic",
                 quality={"embedding_cosine_min": 0.998})]
    for row in rows:
        row["length"] = "medium"
    assert [report.quality_point(r, rows) for r in rows] == [4.1, 4.1, 3.9, 1.0, 0.998]
    assert report.headline(rows[2]) == "PESQ-WB 3.90, PESQ drop +0.20" and report.headline(rows[0]) == "reference"
    result = {"rows": rows, "threads": 2, "host": {"cpu_model": "CPU"},
              "inputs": {"lengths": {"medium": {"target_s": 3.0}}}}
    for png in report.charts(result, tmp_path / "run"):
        assert png.read_bytes()[:8] == PNG_MAGIC


def test_plan_covers_every_artifact_and_gpu_rows_only_where_cuda_exists() -> None:
    from voxport.pipeline.records import Record

    def rec(component: str, graph: str, fmt: str, precision: str, file: str, stage: str = "export") -> Record:
        return Record(component=component, graph=graph, format=fmt, precision=precision, file=file,
                      sha256="0" * 64, weights="real", stage=stage)

    records = [rec("vocoder", "vocoder", "torch", "fp32", "v.pt", "source"),
               rec("vocoder", "vocoder", "onnx", "fp32", "v.onnx"),
               rec("vocoder", "vocoder", "onnx", "int8-static", "v_int8.onnx", "quantize-static"),
               rec("vocoder", "vocoder", "trt", "fp16", "v.plan", "tensorrt"),
               rec("synthesizer", "*", "torch", "fp32", "s.pt", "source")]
    b = compose_config().bench
    cpu_jobs, skipped = plan_jobs(records, b, Path("b"), Path("i"), 2, 1, cuda=False,
                                  providers=("CPUExecutionProvider",))
    graph_jobs = [(j["file"], j["graph"], j["device"]) for j in cpu_jobs if j["kind"] == "graph"]
    assert graph_jobs == [("s.pt", g, "cpu") for g in SYNTH_GRAPHS] + [
        ("v.pt", "vocoder", "cpu"), ("v.onnx", "vocoder", "cpu"), ("v_int8.onnx", "vocoder", "cpu")]
    assert [s["what"] for s in skipped] == ["speaker_encoder", "v.plan (vocoder)"]
    assert all(j["threads"] == 2 for j in cpu_jobs)
    assert all(j["lengths"] == (["short", "medium", "long"] if j["kind"] == "graph" else list(b.e2e.lengths))
               for j in cpu_jobs)
    gpu_jobs, skipped = plan_jobs(records, b, Path("b"), Path("i"), 2, 1, cuda=True,
                                  providers=("CUDAExecutionProvider", "CPUExecutionProvider"))
    on_gpu = {(j["file"], j["device"]) for j in gpu_jobs if j["kind"] == "graph" and j["device"] == "cuda"}
    assert on_gpu == {("v.onnx", "cuda"), ("v_int8.onnx", "cuda"), ("v.plan", "cuda")}
    # The runtime row is the target's preference (target=cpu: cpu, torch), not a fixed list.
    assert [j["preference"] for j in gpu_jobs if j["kind"] == "pipeline"] == [["torch"], ["cpu", "torch"]]
    trt = plan_jobs(records, compose_config("target=tensorrt").bench, Path("b"), Path("i"), 2, 1, cuda=True,
                    providers=("CUDAExecutionProvider", "CPUExecutionProvider"))[0]
    assert [j["preference"] for j in trt if j["kind"] == "pipeline"] == [["torch"], ["trt", "onnx-cuda", "cpu",
                                                                                     "torch"]]
    torch_only = plan_jobs(records, compose_config("target.preference=[torch]").bench, Path("b"), Path("i"), 2, 1,
                           cuda=False, providers=("CPUExecutionProvider",))[0]
    assert [j["preference"] for j in torch_only if j["kind"] == "pipeline"] == [["torch"]]  # once, not twice


# ------------------------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def tiny_run(bundle: Path, corpus, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("bench")
    cfg = compose_config(
        f"bench.bundle={bundle}", f"bench.out={out}", f"corpus_dir={corpus.root}", "bench.lengths=[short]",
        "bench.seconds.short=0.5", "bench.e2e.lengths=[short]", "bench.e2e.ttfa_lengths=[short]",
        "bench.repeats=1", "bench.min_repeats=1", "bench.isolate=false", "bench.threads=1",
    )
    previous = torch.get_num_threads()
    torch.set_num_threads(2)  # not bench.threads (1), so a pin leaking out of the bench job shows
    try:
        run = run_bench(cfg)
        assert torch.get_num_threads() == 2  # pinning stays inside the bench job
    finally:
        torch.set_num_threads(previous)
    return cfg, run


@pytest.mark.slow
def test_tiny_bench_measures_every_artifact_and_writes_reports(bundle: Path, tiny_run) -> None:
    _, run = tiny_run
    result, rows = run.result, run.result["rows"]
    expected = {(r.file, g) for r in read_bundle(bundle) for g in (SYNTH_GRAPHS if r.graph == "*" else (r.graph,))}
    assert {(r["file"], r["graph"]) for r in rows if r["kind"] == "graph"} == expected
    assert {(r["kind"], r["backend"]) for r in rows if r["kind"] != "graph"} == {
        (k, p) for k in ("e2e", "ttfa") for p in ("torch", "cpu>torch")}
    for row in rows:
        assert row["median_s"] > 0 and row["peak_rss_mb"] > 0 and row["threads"] == 1
        if row["kind"] == "graph" and row["format"] == "onnx":  # bench.threads pins the recorded settings
            assert row["session"]["intra_op_threads"] == 1 and row["session"]["allow_spinning"] is False
        if row["stage"] == "source" or row.get("preference") == ["torch"]:
            assert row["speedup_vs_torch_fp32"] == pytest.approx(1.0)
        else:
            assert row["speedup_vs_torch_fp32"] > 0
    vocoder = [r for r in rows if r["component"] == "vocoder"]
    assert all(r["flops_per_s"] > 0 and 0 < r["peak_fraction"] < 1 for r in vocoder)
    assert all(r["audio_s"] == pytest.approx(0.5, abs=0.02) for r in vocoder)
    assert result["host"]["cpu_model"] and result["host"]["peak_fp32_flops"] > 0 and result["errors"] == []
    json_path, md_path, *pngs = run.paths
    assert json.loads(json_path.read_text())["rows"] == json.loads(json.dumps(rows))
    assert "## End to end" in md_path.read_text() and "| vocoder/vocoder |" in md_path.read_text()
    import matplotlib.image

    for png in pngs:
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert matplotlib.image.imread(png).shape[0] > 200


@pytest.mark.slow
def test_tiny_bench_compare_fails_against_a_faster_baseline(tiny_run, tmp_path: Path) -> None:
    cfg, run = tiny_run
    same = tmp_path / "same.json"
    same.write_text(json.dumps(run.result))
    run.raise_for_failures(str(same), 1.25)
    faster = copy.deepcopy(run.result)
    slow_ids = [r["id"] for r in faster["rows"] if r["component"] == "vocoder"]
    for row in faster["rows"]:
        if row["id"] in slow_ids:
            row["median_s"] /= 3.0
    path = tmp_path / "faster.json"
    path.write_text(json.dumps(faster))
    with pytest.raises(compare.RegressionError) as err:
        run.raise_for_failures(str(path), 1.25)
    assert sorted(r.row_id for r in err.value.regressions) == sorted(slow_ids)
    assert all(row_id in str(err.value) for row_id in slow_ids)


@pytest.mark.slow
def test_isolated_job_runs_in_its_own_process(tiny_run, bundle: Path, corpus, tmp_path: Path) -> None:
    from voxport.benchmarks.inputs import prepare

    cfg, _ = tiny_run
    records = read_bundle(bundle)
    prepare(corpus, records, bundle, {"short": 0.5}, 3.0, seed=1234).save(tmp_path / "inputs")
    jobs, skipped = plan_jobs(records, cfg.bench, bundle, tmp_path / "inputs", 1, 1234, cuda=False, providers=())
    assert skipped == [] and sum(j["kind"] == "pipeline" for j in jobs) == 2
    job = next(j for j in jobs if j["kind"] == "graph" and j["file"] == "speaker_encoder_fp32.onnx")
    rows = _run_job(job, tmp_path / "job", isolate=True, timeout_s=300)
    assert [r["length"] for r in rows] == ["short"] and rows[0]["providers"] == ["CPUExecutionProvider"]
    assert rows[0]["rss_method"] == "VmHWM reset per row" and rows[0]["load_s"] > 0
    assert rows[0]["peak_rss_mb"] >= rows[0]["baseline_rss_mb"] > 0


def test_a_graph_job_and_a_pipeline_job_in_process(bundle: Path, corpus, tmp_path: Path) -> None:
    """The bench worker on the session bundle, in this process: one graph job and a pipeline job's time
    to first audio, on half a second of real speech, one timed call each (the full tiny run is slow)."""
    from voxport.benchmarks.inputs import prepare
    from voxport.benchmarks.worker import run_job

    cfg = compose_config(
        f"bench.bundle={bundle}", f"corpus_dir={corpus.root}", "bench.lengths=[short]", "bench.seconds.short=0.5",
        "bench.e2e.lengths=[short]", "bench.e2e.ttfa_lengths=[short]", "bench.repeats=1", "bench.min_repeats=1",
        "bench.warmup=1", "bench.threads=1",
    )
    records = read_bundle(bundle)
    prepare(corpus, records, bundle, {"short": 0.5}, 3.0, seed=1234).save(tmp_path / "inputs")
    jobs, skipped = plan_jobs(records, cfg.bench, bundle, tmp_path / "inputs", 1, 1234, cuda=False, providers=())
    assert skipped == []
    graph = next(j for j in jobs if j["kind"] == "graph" and j["file"] == "speaker_encoder_fp32.onnx")
    # Time to first audio only: the end-to-end rows' clone calls are the slow tier's.
    pipeline = {**next(j for j in jobs if j["kind"] == "pipeline" and j["preference"] != ["torch"]), "lengths": []}
    previous = torch.get_num_threads()
    torch.set_num_threads(2)  # not the job's 1 thread, so a pin leaking out of the job shows
    try:
        (encoder,) = run_job(graph)
        (ttfa,) = run_job(pipeline)
        assert torch.get_num_threads() == 2  # pinning stays inside the job
    finally:
        torch.set_num_threads(previous)
    assert encoder["providers"] == ["CPUExecutionProvider"] and encoder["length"] == "short"
    assert encoder["median_s"] > 0 and encoder["peak_rss_mb"] > 0 and encoder["load_s"] > 0
    assert ttfa["kind"] == "ttfa" and ttfa["served"]["vocoder/vocoder"] == "vocoder_fp32.onnx"
    assert ttfa["input"]["first_chunk_s"] > 0 and ttfa["median_s"] > 0 and ttfa["threads"] == 1


def test_missing_bundle_is_one_clear_error(tmp_path: Path) -> None:
    cfg = compose_config(f"bench.bundle={tmp_path / 'none'}")
    with pytest.raises(ConfigError, match="run `voxport build` first"):
        run_bench(cfg)
