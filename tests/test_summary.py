"""The sweep summary: variants ranked by measured speed at passing quality, copies merged."""

from voxport.pipeline.records import Record
from voxport.pipeline.summary import chains, ranking_table, rows


def row(variant: str, component: str, file: str, sha: str, speed: float, passed: bool = True) -> dict:
    return {"variant": variant, "component": component, "graph": component, "file": file, "sha256": sha,
            "format": "onnx", "precision": "int8", "speedup_vs_torch_fp32": speed,
            "parent_speedup_vs_torch_fp32": 1.2, "passed": passed, "quality": "q"}


def test_sweep_ranking_merges_identical_artifacts_and_ranks_variants_by_speed() -> None:
    table = ranking_table([
        row("calibration=minmax", "speaker_encoder", "enc.onnx", "e1", 2.4),
        row("calibration=entropy", "speaker_encoder", "enc.onnx", "e1", 1.2),
        row("calibration=percentile", "speaker_encoder", "enc.onnx", "e1", 2.0),
        row("calibration=minmax", "vocoder", "voc.onnx", "v1", 2.1),
        row("calibration=entropy", "vocoder", "voc.onnx", "v2", 2.3),
        row("calibration=percentile", "vocoder", "voc.onnx", "v3", 3.9, passed=False),
    ]).splitlines()
    body = [line.split(" | ") for line in table[2:]]
    assert [(cells[0].strip("| "), cells[1]) for cells in body] == [
        ("speaker_encoder", "all 3 variants (same artifact)"),
        ("vocoder", "calibration=entropy"), ("vocoder", "calibration=minmax")]  # fastest first; failed left out
    assert body[0][4] == "2.00"  # the median of the identical artifact's three timings


def test_the_chain_of_the_fastest_passing_artifact_is_spelled_out_step_by_step() -> None:
    def rec(file, stage, parent=None, precision="fp32", fmt="onnx", speed=None, quality=None):
        return Record(component="vocoder", graph="vocoder", format=fmt, precision=precision, file=file, sha256=file,
                      weights="real", stage=stage, parent=parent, speed=speed or {}, quality=quality or {})

    gate = {"log_mel_distance_increase_db": 0.21, "pesq_drop": -0.04, "passed": True}
    records = [
        rec("v.pt", "source", fmt="torch"),
        rec("v.onnx", "export", "v.pt", speed={"speedup_vs_torch_fp32": 1.1}),
        rec("v_int8.onnx", "quantize-static", "v.onnx", "int8-static", speed={"speedup_vs_torch_fp32": 2.2},
            quality=gate),
        rec("p.pt", "prune", "v.pt", fmt="torch", speed={"speedup_vs_torch_fp32": 1.12, "flops_reduction": 0.128},
            quality={**gate, "log_mel_distance_increase_db": 0.10}),
        rec("p.onnx", "export", "p.pt", quality={**gate, "log_mel_distance_increase_db": 0.10}),
        rec("p_int8.onnx", "quantize-static", "p.onnx", "int8-static",
            speed={"speedup_vs_torch_fp32": 2.96, "parent_speedup_vs_torch_fp32": 1.05}, quality=gate),
        rec("fast_but_failed.onnx", "quantize-static", "p.onnx", "int8-static",
            speed={"speedup_vs_torch_fp32": 4.0}, quality={**gate, "passed": False}),
    ]
    assert chains(records, rows(records)) == (
        "- vocoder: v.pt -> prune: p.pt (FLOPs -13 %, log-mel +0.10 dB, PESQ +0.04 vs FP32, 1.12x PyTorch FP32)"
        " -> export: p.onnx (1.05x PyTorch FP32)"
        " -> quantize-static: p_int8.onnx (log-mel +0.21 dB, PESQ +0.04 vs FP32, 2.96x PyTorch FP32)")
    # One stage from the original: nothing to spell out beyond the ranking table.
    single = records[:1] + [rec("q.onnx", "quantize-static", "v.pt", "int8-static",
                                speed={"speedup_vs_torch_fp32": 2.0}, quality=gate)]
    assert chains(single, rows(single)) == ""
