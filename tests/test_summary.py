"""The sweep summary: variants ranked by measured speed at passing quality, copies merged."""

from voxport.pipeline.summary import ranking_table


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
