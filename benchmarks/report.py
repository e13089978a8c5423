"""Bench outputs: one JSON per run (machine), a Markdown table (people), two PNG charts.

Charts: `<stamp>_rtf.png`, RTF by artifact (backend and precision) for every input length, log
scale, real time marked; `<stamp>_quality.png`, speed against the record's quality figure for
the vocoder (wideband PESQ of copy synthesis) and the speaker encoder (embedding cosine vs FP32).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from voxport.pipeline.records import ENGINES, atomic_write_text

# (key in the row's quality figures, label, format): the record's headline figures, in this order.
_HEADLINE = (
    ("pesq_wb", "PESQ-WB", "{:.2f}"), ("pesq_drop", "PESQ drop", "{:+.2f}"),
    ("log_mel_distance_increase_db", "log-mel", "{:+.2f} dB"), ("embedding_cosine_min", "cos", "{:.5f}"),
    ("decisions_changed", "decisions changed", "{:.0f}"), ("mel_snr_db_min", "mel SNR", "{:.1f} dB"),
    ("stop_agreement_min", "stop agree", "{:.2f}"), ("wav_snr_db_min", "wav SNR", "{:.1f} dB"),
    ("wav_snr_db_vs_fp32_min", "wav SNR vs FP32", "{:.1f} dB"),
)


def write_json(result: dict[str, Any], path: Path) -> Path:
    atomic_write_text(path, json.dumps(result, indent=1, default=_plain, allow_nan=False) + "\n")
    return path


def _plain(obj: Any) -> Any:
    try:
        return obj.item()  # numpy scalars
    except AttributeError:
        raise TypeError(f"not JSON serialisable: {type(obj).__name__}") from None


def variant(row: dict[str, Any]) -> str:
    """Backend and precision as people say it: `onnxruntime cpu int8-static`, `torch fp32 pruned 30%`."""
    if row["kind"] != "graph":
        return row["backend"]
    engine = ENGINES[row["format"]]
    label = f"{engine} {row['device']} {row['precision']}"
    if str(row.get("stage") or "").startswith("prune"):
        label += f" pruned {row['sparsity']:.0%}" if row.get("sparsity") else " pruned"
    return label


def headline(row: dict[str, Any]) -> str:
    if row.get("stage") == "source":
        return "reference"
    q = row.get("quality") or {}
    parts = [f"{label} {fmt.format(q[key])}" for key, label, fmt in _HEADLINE if q.get(key) is not None]
    return ", ".join(parts[:3]) or "-"


def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)


def markdown(result: dict[str, Any]) -> str:
    host, cfg = result["host"], result["config"]
    flags = ", ".join(host["cpu_flags"]) or "no vector flags"
    gpus = ", ".join(g["name"] for g in host["gpus"]) or "none"
    libs = ", ".join(f"{k} {v}" for k, v in sorted(host["library_versions"].items()))
    lines = [
        f"# voxport bench, {result['created']}", "",
        f"- host: {host['cpu_model']} ({host['usable_cores']} usable cores; {flags}); GPU: {gpus}",
        f"- peak FP32 estimate: {host['peak_fp32_flops'] / 1e9:.0f} GFLOP/s = {host['peak_method']}",
        *([f"- peak INT8 estimate (theoretical): {host['peak_int8_ops'] / 1e9:.0f} GOP/s = {host['peak_int8_method']}"]
          if host.get("peak_int8_ops") else []),
        f"- threads: {result['threads']} (torch.set_num_threads and ONNX Runtime intra-op, per job process)",
        f"- timing per row: {cfg['warmup']} untimed warm-up call(s) (the first reported as first run), then "
        f"{cfg['min_repeats']} to {cfg['repeats']} timed runs (no more once {cfg['budget_s']:.0f} s are spent); "
        f"{'one process per job' if cfg['isolate'] else 'in process'}; whole run {result['wall_s']:.0f} s",
        f"- libraries: {libs}", f"- bundle: `{result['bundle']}`; command: `{result['command']}`", "",
        "## Components", "",
        "RTF = compute s / audio s (lower is better); ×RT = audio s / compute s; "
        "vs torch = PyTorch FP32 median / row median on the same input in this run; CPU/wall = process CPU s "
        "per wall s (near the thread count when the host is otherwise idle).", "",
        "| graph | backend precision | input | audio s | median ms | p95 ms | min-max ms | RTF | ×RT "
        "| vs torch FP32 | load s | peak RSS MB | CPU/wall | GFLOP/s (% peak) | quality (record) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in (r for r in result["rows"] if r["kind"] == "graph"):
        gflops = (f"{row['flops_per_s'] / 1e9:.1f} ({row['peak_fraction']:.1%})"
                  if row.get("flops_per_s") and row.get("peak_fraction") else "-")
        lines.append(
            f"| {row['component']}/{row['graph']} | {variant(row)} | {row['length']} | {_f(row['audio_s'], '{:.2f}')} "
            f"| {row['median_s'] * 1e3:.1f} | {row['p95_s'] * 1e3:.1f} "
        f"| {row['min_s'] * 1e3:.1f}-{row['max_s'] * 1e3:.1f} "
            f"| {_f(row['rtf'], '{:.4f}')} | {_f(row['x_realtime'], '{:.1f}')} "
            f"| {_f(row.get('speedup_vs_torch_fp32'), '{:.2f}x')} | {row['load_s']:.2f} | {row['peak_rss_mb']:.0f} "
            f"| {_f(row.get('cpu_per_wall'), '{:.2f}')} | {gflops} | {headline(row)} |")
    lines += _pipeline_tables(result)
    lines += ["", "## Method", ""] + [f"- {note}" for note in result["method"]]
    if result["skipped"] or result["errors"]:
        lines += ["", "## Not measured", ""]
        lines += [f"- skipped {s['what']}: {s['why']}" for s in result["skipped"]]
        lines += [f"- FAILED {e['job']}: {e['error']}" for e in result["errors"]]
    return "\n".join(lines) + "\n"


def _pipeline_tables(result: dict[str, Any]) -> list[str]:
    lines = ["", "## End to end (reference clip + text -> waveform)", "",
             "| preference | served by | input | audio s | median s | p95 s | RTF | ×RT | vs torch | load s "
             "| peak RSS MB |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in (r for r in result["rows"] if r["kind"] == "e2e"):
        served = ", ".join(sorted(set(row["served"].values())))
        lines.append(
            f"| {row['backend']} | {served} | {row['length']} | {_f(row['audio_s'], '{:.2f}')} | {row['median_s']:.2f} "
            f"| {row['p95_s']:.2f} | {_f(row['rtf'], '{:.3f}')} | {_f(row['x_realtime'], '{:.2f}')} "
            f"| {_f(row.get('speedup_vs_torch_fp32'), '{:.2f}x')} | {row['load_s']:.2f} | {row['peak_rss_mb']:.0f} |")
    lines += ["", "## Time to first audio", "",
              "From the reference recording to the first waveform chunk: reference embedding + synthesizer "
              "encoder + the decoder steps, postnet window and vocoder call of the first chunk (`serve.stream`). "
              "A stored voice skips the embedding (its own column). Playback gaps: one whole stream played in "
              "real time from its first chunk, the silence where a chunk came after the audio before it had played.",
              "",
              "| preference | input | measured as | first chunk s | median ms | p95 ms | min-max ms "
              "| of which embedding ms | playback gaps ms (worst) | vs torch |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in (r for r in result["rows"] if r["kind"] == "ttfa"):
        lines.append(
            f"| {row['backend']} | {row['length']} | {row['input']['ttfa_method']} "
            f"| {row['input']['first_chunk_s']:.2f} | {row['median_s'] * 1e3:.0f} "
            f"| {row['p95_s'] * 1e3:.0f} | {row['min_s'] * 1e3:.0f}-{row['max_s'] * 1e3:.0f} "
            f"| {_f(row['input'].get('embed_ms'), '{:.0f}')} | {_gaps(row['input'].get('playback'))} "
            f"| {_f(row.get('speedup_vs_torch_fp32'), '{:.2f}x')} |")
    return lines


def _gaps(playback: dict[str, Any] | None) -> str:
    return f"{playback['stall_ms']:.0f} ({playback['worst_gap_ms']:.0f})" if playback else "-"


def quality_point(row: dict[str, Any], rows: list[dict[str, Any]]) -> float | None:
    """The scatter's y value: PESQ-WB (vocoder) or embedding cosine vs FP32 (speaker encoder)."""
    q = row.get("quality") or {}
    if q.get("pesq_wb") is not None:
        return float(q["pesq_wb"])
    if q.get("embedding_cosine_min") is not None:
        return float(q["embedding_cosine_min"])
    if row["precision"] != "fp32" or row["stage"] not in ("source", "export"):
        return None
    # FP32 originals carry no listener figures themselves; their siblings' gates measured them (the
    # vocoder's FP32 PESQ), or they are the reference (the encoder's cosine 1).
    sibling = next((r for r in rows if r["component"] == row["component"] and r is not row
                    and (r.get("quality") or {}).get("fp32_pesq_wb") is not None), None)
    if sibling is not None:
        return float(sibling["quality"]["fp32_pesq_wb"])
    has_cosine = any((r.get("quality") or {}).get("embedding_cosine_min") is not None for r in rows
                     if r["component"] == row["component"])
    return 1.0 if row["stage"] == "source" and has_cosine else None


def charts(result: dict[str, Any], stem: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return [_rtf_chart(result, Path(f"{stem}_rtf.png"), plt), _quality_chart(result, Path(f"{stem}_quality.png"), plt)]


def _rtf_chart(result: dict[str, Any], path: Path, plt: Any) -> Path:
    rows = [r for r in result["rows"] if r["kind"] in ("graph", "e2e") and r.get("rtf")]
    labels = list(dict.fromkeys(_bar_label(r) for r in rows))
    lengths = list(dict.fromkeys(r["length"] for r in rows))
    height = 0.8 / max(1, len(lengths))
    fig, ax = plt.subplots(figsize=(12.5, 1.6 + 0.42 * max(1, len(labels))))
    for j, length in enumerate(lengths):
        by_label = {_bar_label(r): r["rtf"] for r in rows if r["length"] == length}
        ys = [i + (j - (len(lengths) - 1) / 2) * height for i, label in enumerate(labels) if label in by_label]
        ax.barh(ys, [by_label[label] for label in labels if label in by_label], height=height,
                label=f"{length} ({result['inputs']['lengths'][length]['target_s']:g} s)")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1, label="real time (RTF 1)")
    ax.set_xlabel("RTF = compute s / audio s (median, log scale; lower is better)")
    ax.set_ylabel("component/graph: backend device precision")
    ax.set_title(f"voxport bench: RTF by backend and precision; {result['host']['cpu_model']}, "
                 f"{result['threads']} threads", fontsize=10)
    ax.grid(axis="x", which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="input length")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _bar_label(row: dict[str, Any]) -> str:
    if row["kind"] == "e2e":
        return f"end to end: {row['backend']}"
    return f"{row['component']}/{row['graph']}: {variant(row)}"


def _quality_chart(result: dict[str, Any], path: Path, plt: Any) -> Path:
    rows = result["rows"]
    length = "medium" if any(r["length"] == "medium" for r in rows) else rows[-1]["length"] if rows else ""
    panels = (("vocoder", "PESQ-WB of copy synthesis vs recordings (higher is better)"),
              ("speaker_encoder", "embedding cosine vs PyTorch FP32 (min)"))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, (component, ylabel) in zip(axes, panels, strict=True):
        points = [(r["rtf"], quality_point(r, rows), variant(r)) for r in rows
                  if r["kind"] == "graph" and r["component"] == component and r["length"] == length and r.get("rtf")]
        points = [p for p in points if p[1] is not None]
        for x, y, label in points:
            ax.scatter([x], [y], s=40)
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
        if not points:
            ax.text(0.5, 0.5, "no quality figures in the records\n(export-only bundle?)", ha="center",
                    va="center", transform=ax.transAxes)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.margins(x=0.2, y=0.15)  # room for the point labels
        ax.set_xlabel(f"RTF on the {length} input (compute s / audio s, lower is better)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{component}: speed vs quality", fontsize=10)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(result: dict[str, Any], out_dir: Path, stamp: str) -> list[Path]:
    """`<out>/<stamp>.json`, `.md`, `_rtf.png`, `_quality.png`; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / stamp
    paths = [write_json(result, stem.with_suffix(".json"))]
    md = stem.with_suffix(".md")
    atomic_write_text(md, markdown(result))
    return [*paths, md, *charts(result, stem)]
