"""Rank the artifacts of a build (or of every variant of a Hydra sweep) by measured speed at passing quality.

`voxport build` prints one ranking per component; under `-m` each job builds its own bundle
inside the sweep directory, and `sweep_summary.md` / `.json` there rank every variant's
artifacts together, so `-m quantize.calibration=minmax,entropy,percentile` ends with one table.
"""

from __future__ import annotations

import json
import logging
import statistics
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from voxport.pipeline.records import Record, atomic_write_text, parent_speedups

log = logging.getLogger(__name__)


def quality_headline(quality: Mapping[str, Any]) -> str:
    """The gate figures of a lossy artifact in one short phrase."""
    if "log_mel_distance_increase_db" in quality:
        return (f"log-mel {quality['log_mel_distance_increase_db']:+.2f} dB, "
                f"PESQ {-quality['pesq_drop']:+.2f} vs FP32")
    if "embedding_cosine_min" in quality:
        return (f"cos >= {quality['embedding_cosine_min']:.4f}, "
                f"{quality.get('decisions_changed', 0)} decisions changed")
    if "mel_snr_db_min" in quality:
        return f"mel SNR {quality['mel_snr_db_min']:.1f} dB, stop {quality.get('stop_agreement_min', 0):.2f}"
    return "-"


def rows(records: Iterable[Record], variant: str = "") -> list[dict[str, Any]]:
    """One row per artifact with a measured speed ratio vs PyTorch FP32 (plus each PyTorch original).
    An FP32 export timed only beside its children gets that figure: an INT8 artifact slower than
    its own FP32 parent must not look like the best choice."""
    records = list(records)
    as_parent = parent_speedups(records)
    out = []
    for r in records:
        ratio = (r.speed or {}).get("speedup_vs_torch_fp32")
        if not ratio and r.stage == "export" and r.file in as_parent:
            ratio = as_parent[r.file]
        if (r.stage != "source" and not ratio) or (r.stage == "source" and variant):
            continue  # unmeasured, or the 1.0x reference repeated for every sweep variant
        out.append({"variant": variant, "component": r.component, "graph": r.graph, "file": r.file, "sha256": r.sha256,
                    "format": r.format, "precision": r.precision,
                    "speedup_vs_torch_fp32": float(ratio) if ratio else 1.0,
                    "parent_speedup_vs_torch_fp32": (r.speed or {}).get("ort_fp32_speedup_vs_torch_fp32")
                    or (r.speed or {}).get("parent_speedup_vs_torch_fp32"),
                    "passed": r.stage in ("source", "export") or (r.quality or {}).get("passed") is True,
                    "quality": "reference" if r.stage == "source" else
                    "FP32 export (timed as its children's parent)" if r.stage == "export" else
                    quality_headline(r.quality or {})})
    return out


def ranking_table(table: list[dict[str, Any]]) -> str:
    """Markdown: per component, passing artifacts fastest first (speeds measured side by side)."""
    if not any(row["component"] for row in table):
        return ""
    show_variant = any(row["variant"] for row in table)
    table = _merge_identical(table)
    head = ["component", *(["variant"] if show_variant else []), "artifact", "precision",
            "x PyTorch FP32", "parent x PyTorch", "quality vs FP32"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for component in dict.fromkeys(row["component"] for row in table):  # in build order
        ranked = sorted((row for row in table if row["component"] == component and row["passed"]),
                        key=lambda row: -row["speedup_vs_torch_fp32"])
        for row in ranked:
            parent = row["parent_speedup_vs_torch_fp32"]
            cells = [component, *([row["variant"] or "-"] if show_variant else []), row["file"], row["precision"],
                     f"{row['speedup_vs_torch_fp32']:.2f}", f"{parent:.2f}" if parent else "-", row["quality"]]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chains(records: Iterable[Record], table: list[dict[str, Any]]) -> str:
    """Per component, how its fastest passing artifact (by `table`, the `rows` of `records`) was made
    when more than one stage made it: every step from the PyTorch original with the figures of what
    that step produced, e.g. `vocoder_fp32.pt -> prune: ... (FLOPs -13 %, log-mel +0.10 dB, ...) ->
    export: ... -> quantize-static: ...`."""
    by_file = {r.file: r for r in records}
    ratio = {row["file"]: row["speedup_vs_torch_fp32"] for row in table}
    lines = []
    for component in dict.fromkeys(row["component"] for row in table):
        passing = [row for row in table if row["component"] == component and row["passed"]]
        if not passing:
            continue
        best = max(passing, key=lambda row: row["speedup_vs_torch_fp32"])
        steps, record = [], by_file.get(best["file"])
        while record is not None and record.stage != "source":
            steps.append(record)
            record = by_file.get(record.parent or "")
        if len(steps) < 2 or record is None:
            continue  # made by one stage (or its origin is not in this build): the table says it all
        parts = [record.file]
        for step in reversed(steps):
            figures = []
            reduction = (step.speed or {}).get("flops_reduction")
            if reduction and step.stage == "prune":  # later steps inherit the figure
                figures.append(f"FLOPs -{100 * reduction:.0f} %")
            if step.quality and step.stage != "export":  # an export repeats its parent's gate figures
                figures.append(quality_headline(step.quality))
            if ratio.get(step.file):
                figures.append(f"{ratio[step.file]:.2f}x PyTorch FP32")
            parts.append(f"{step.stage}: {step.file}" + (f" ({', '.join(figures)})" if figures else ""))
        lines.append(f"- {component}: " + " -> ".join(parts))
    return "\n".join(lines)


def _merge_identical(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per artifact content: a sweep over one component's knob rebuilds the others
    byte-identically, and listing each copy would rank timing noise. Merged rows carry the
    median of their speed figures and say how many variants made them."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for i, row in enumerate(table):
        groups.setdefault((row["component"], row.get("sha256") or f"row{i}"), []).append(row)
    merged = []
    for rows_ in groups.values():
        row = dict(rows_[0])
        if len(rows_) > 1:
            row["variant"] = f"all {len(rows_)} variants (same artifact)"
            for key in ("speedup_vs_torch_fp32", "parent_speedup_vs_torch_fp32"):
                values = [r[key] for r in rows_ if r.get(key)]
                row[key] = statistics.median(values) if values else None
        merged.append(row)
    return merged


def record_sweep_job(sweep_dir: Path, variant: str, records: Iterable[Record]) -> str:
    """Add one finished sweep job to `<sweep_dir>/sweep_summary.json` and rewrite the table."""
    store = Path(sweep_dir) / "sweep_summary.json"
    jobs: dict[str, Any] = json.loads(store.read_text()) if store.is_file() else {}
    jobs[variant] = rows(records, variant)
    atomic_write_text(store, json.dumps(jobs, indent=2) + "\n")
    table = ranking_table([row for job in jobs.values() for row in job])
    atomic_write_text(Path(sweep_dir) / "sweep_summary.md", table + "\n")
    return table


def artifact_table(records: list, bundle_dir: Path) -> str:
    """Markdown table: one row per artifact with its headline parity figure."""
    rows = ["| artifact | component | format | precision | weights | MB | parity vs PyTorch FP32 |",
            "|---|---|---|---|---|---:|---|"]
    for r in records:
        size = sum((bundle_dir / name).stat().st_size for name in (r.file, *_weight_files(r)))
        rows.append(f"| {r.file} | {r.key} | {r.format} | {r.precision} | {r.weights} | "
                    f"{size / 1e6:.1f} | {headline(r)} |")
    return "\n".join(rows)


def _weight_files(record: Any) -> list[str]:
    """Files an artifact cannot run without besides its own (an OpenVINO IR's `.bin`)."""
    return [n for n in (record.config or {}).get("sidecars", []) if record.format == "openvino"]


def headline(record: Any) -> str:
    p = record.parity
    if record.stage == "source":
        return "reference"
    parts = []
    for key, label, fmt in (
        ("wav_snr_db_min", "wav SNR", "{:.1f} dB"), ("mr_stft_distance_max", "MR-STFT", "{:.2e}"),
        ("embedding_cosine_min", "cos", "{:.7f}"), ("mel_snr_db_min", "mel SNR", "{:.1f} dB"),
        ("stop_agreement_min", "stop agree", "{:.2f}"),
    ):
        if key in p:
            parts.append(f"{label} {fmt.format(p[key])}")
    if not parts and record.quality:  # lossy artifacts: the listener-side gate figures, not export parity
        parts.append(quality_headline(record.quality))
    runtime_ops = (p.get("integer_ops") or {}).get("runtime")
    if runtime_ops:  # what ONNX Runtime really runs in integers, not what the file claims
        from voxport.quantize.qdq import integer_op_total

        parts.append(f"{integer_op_total(runtime_ops)} integer kernels")
    reduction = (record.speed or {}).get("flops_reduction")
    if reduction:
        parts.append(f"FLOPs -{100 * reduction:.0f} %")
    return ", ".join(parts) or "-"
