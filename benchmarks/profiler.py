"""`voxport profile`: where an artifact's time goes, per operator type and per node, on real speech.

ONNX artifacts run under ONNX Runtime's profiler, OpenVINO IRs under OpenVINO's performance counters
(`PERF_COUNT`: each executed node's time per run, its layer type and kernel, e.g. `Convolution
(brgconv_avx512_I8)`); the tables are the same. An OpenVINO node that fused several ONNX nodes (an
INT8 convolution with its LeakyReLU and residual Add) counts their MACs, found through its
`originalLayersNames` in the ONNX graph the IR was made from (its record's parent).

The artifact is opened exactly as the runtime opens it (`runtime.backends.onnxruntime.open_session`
with the record's `speed.session` settings, the sha256 checked), with ONNX Runtime's profiler on.
It runs `warmup` untimed and `repeats` timed passes over `seconds` of one held-out real recording's mel
(chosen as the vocoder component's timing feed chooses it); the trace's node events (`op_name`, `dur`)
of the timed passes give each node's median time, summed per operator type as ONNX Runtime ran it
(`FusedConv` is a Conv with its activation fused). Node FLOPs come from the shapes the profiler saw
(`benchmarks.flops.runtime_node_macs`: 2 x MACs; an INT8 node's are integer OPs), so achieved
GFLOP/s (GOP/s) are per node and for the whole graph, against this host's theoretical peaks
(`benchmarks.hardware`: FP32 from vector width and FMA ports, INT8 from VNNI / AMX / vpmaddubsw).
Shares are the robust figure on a loaded host; absolute times move with the load.
"""

from __future__ import annotations

import json
import logging
import re
import statistics
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from voxport.benchmarks import flops, hardware
from voxport.errors import ConfigError
from voxport.pipeline.records import Record, atomic_write_text, now_iso, read_bundle
from voxport.quantize.qdq import OPENVINO_MAC_LAYERS

log = logging.getLogger(__name__)

PEAK_NOTE = ("theoretical peak = cores x clock x OP per cycle per core; FP32: fp32 lanes x 2 FLOP per FMA x FMA "
             "ports (AVX2: 8 x 2 x 2 = 32 FLOP/cycle/core); INT8 (2 OP per MAC): AVX2 without VNNI "
             "(vpmaddubsw + vpmaddwd) 64, AVX-512 VNNI (vpdpbusd, 128 OP per port) 256, AMX 2048 OP/cycle/core. "
             "No kernel reaches it at the clock the cores really run at.")
# Said when a rate exceeds its estimate: the estimate's clock is below the real one (a VM's kernel
# often exposes no cpufreq, only the nominal MHz, while the cores boost above it).
ABOVE_PEAK_NOTE = ("achieved above the theoretical peak: the clock the estimate uses ({source}, {mhz:.0f} MHz) is "
                   "below the one the cores run at (boost clocks this kernel does not report), so the estimate is "
                   "a floor and its percentages overstate the share of the real peak")


@dataclass(frozen=True)
class ProfileConfig:
    seconds: float = 3.0  # of held-out real speech
    top: int = 15  # nodes listed by time
    repeats: int = 5  # profiled passes (medians over them)
    warmup: int = 1  # passes run first and left out (allocation, first-shape work)
    threads: int = 0  # > 0: intra-op threads pinned over the record's session settings (as serve.threads)

    def __post_init__(self) -> None:
        if self.seconds <= 0 or self.top < 1 or self.repeats < 1 or self.warmup < 0 or self.threads < 0:
            raise ConfigError(f"profile needs seconds > 0, top >= 1, repeats >= 1, warmup >= 0, threads >= 0: {self}")


def profile_bundle(bundle_dir: Path, artifacts: list[str] | None, cfg: ProfileConfig,
                   corpus_dir: str | None = None) -> list[tuple[dict[str, Any], list[Path]]]:
    """Profile `artifacts` (file names; default: every ONNX or OpenVINO vocoder artifact) of a bundle, writing
    `<bundle>/profiles/<artifact>.json` and `.md`; [(profile, written paths)]."""
    from voxport.pipeline.engine import ensure_corpus

    bundle_dir = Path(bundle_dir)
    if not (bundle_dir / "manifest.json").is_file():
        raise ConfigError(f"no built bundle at {bundle_dir} (no manifest.json): run `voxport build` first")
    records = read_bundle(bundle_dir)
    chosen = pick(records, artifacts)
    corpus = ensure_corpus(corpus_dir)
    results = []
    for record in chosen:
        profile = profile_artifact(bundle_dir, record, records, corpus, cfg)
        results.append((profile, write(profile, bundle_dir / "profiles", cfg.top)))
    return results


PROFILED_FORMATS = ("onnx", "openvino")  # ONNX Runtime's profiler, OpenVINO's performance counters


def pick(records: list[Record], artifacts: list[str] | None) -> list[Record]:
    """The records named (each an ONNX or OpenVINO artifact of the bundle), else those vocoders."""
    if not artifacts:
        chosen = [r for r in records if r.component == "vocoder" and r.format in PROFILED_FORMATS]
        if not chosen:
            raise ConfigError("the bundle holds no ONNX or OpenVINO vocoder artifact to profile")
        return chosen
    by_file = {r.file: r for r in records}
    unknown = [a for a in artifacts if a not in by_file]
    if unknown:
        known = sorted(f for f, r in by_file.items() if r.format in PROFILED_FORMATS)
        raise ConfigError(f"no artifact {unknown} in the bundle (ONNX and OpenVINO artifacts: {', '.join(known)})")
    other = [a for a in artifacts if by_file[a].format not in PROFILED_FORMATS]
    if other:
        raise ConfigError(f"{other}: only ONNX artifacts (ONNX Runtime's profiler) and OpenVINO IRs (its "
                          "performance counters) can be profiled")
    return [by_file[a] for a in artifacts]


def held_out_mel(corpus: Any, mel_cfg: Any, seconds: float) -> tuple[np.ndarray, str, float]:
    """(mel (n_mels, T), item id, audio seconds): `seconds` of the first held-out real recording long
    enough (the vocoder component's timing feed picks it the same way)."""
    from voxport.models import audio

    items = sorted(corpus.items(split="eval"), key=lambda i: (i.source == "espeak-ng", i.duration_s < seconds, i.id))
    if not items:
        raise ConfigError("the corpus has no held-out (eval) recording")
    wav = corpus.audio(items[0], mel_cfg.sample_rate)[: int(seconds * mel_cfg.sample_rate)]
    wav = wav[: len(wav) // mel_cfg.hop_length * mel_cfg.hop_length]
    mel = audio.mel_spectrogram(wav, mel_cfg).astype(np.float32)
    return mel, items[0].id, len(wav) / mel_cfg.sample_rate


def _feed(record: Record, records: list[Record], corpus: Any, seconds: float) -> tuple[dict[str, np.ndarray], dict]:
    from voxport.models.audio import MelConfig

    names = {t.name for t in record.inputs}
    if names != {"mel"}:
        raise ConfigError(f"{record.file}: profiling feeds a mel spectrogram of real speech (inputs 'mel': the "
                          f"vocoder, the postnet); its inputs are {sorted(names)}")
    vocoder = next((r for r in records if r.component == "vocoder" and r.stage == "source"), None)
    mel_dict = record.contract.get("mel") or (vocoder.contract.get("mel") if vocoder else None)
    if not mel_dict:
        raise ConfigError(f"{record.file}: no mel contract in its record or the vocoder's")
    mel, item, audio_s = held_out_mel(corpus, MelConfig.from_dict(mel_dict), seconds)
    return {"mel": mel[None]}, {"item": item, "audio_s": audio_s, "frames": int(mel.shape[1])}


def profile_artifact(bundle_dir: Path, record: Record, records: list[Record], corpus: Any,
                     cfg: ProfileConfig) -> dict[str, Any]:
    """Run the artifact under its engine's profiler and summarise it (see the module docstring)."""
    if record.format == "openvino":
        return _profile_openvino(bundle_dir, record, records, corpus, cfg)
    from voxport.runtime.backends.base import verified_artifact
    from voxport.runtime.backends.onnxruntime import open_session, recorded_settings

    feed, described = _feed(record, records, corpus, cfg.seconds)
    providers = ["CPUExecutionProvider"]
    settings = recorded_settings(record, providers).with_overrides(intra_op_threads=cfg.threads or None)
    path = verified_artifact(record, bundle_dir)
    with tempfile.TemporaryDirectory(prefix="voxport-profile-") as tmp:
        session = open_session(path, providers, settings, profile_prefix=Path(tmp) / "ort")
        for _ in range(cfg.warmup + cfg.repeats):
            session.run(None, feed)
        trace = json.loads(Path(session.end_profiling()).read_text())
    cores = hardware.usable_cores()
    threads = min(settings.intra_op_threads or cores, cores)
    static = flops.graph_macs(path, {"mel": feed["mel"].shape})
    summary = summarize(trace, cfg.warmup, static)
    host = _host(cores)
    summary |= achieved(summary, host, threads, described["audio_s"])
    return {"profile_version": 1, "created": now_iso(), "bundle": str(bundle_dir), "artifact": record.file,
            "component": record.component, "graph": record.graph, "precision": record.precision,
            "stage": record.stage, "sha256": record.sha256, "input": described, "session": settings.to_dict(),
            "threads": threads, "warmup": cfg.warmup, "repeats": cfg.repeats, "host": host, **summary}


def _profile_openvino(bundle_dir: Path, record: Record, records: list[Record], corpus: Any,
                      cfg: ProfileConfig) -> dict[str, Any]:
    """The OpenVINO IR compiled as its backend compiles it, with performance counters on."""
    from voxport.export.openvino import recorded_options, require_openvino
    from voxport.runtime.backends.base import verified_artifact
    from voxport.runtime.backends.openvino import verified_weights

    feed, described = _feed(record, records, corpus, cfg.seconds)
    xml = verified_artifact(record, bundle_dir)
    verified_weights(record, xml)
    options = recorded_options(record, cfg.threads or None)
    compiled = require_openvino().Core().compile_model(str(xml), "CPU", {**options, "PERF_COUNT": True})
    request = compiled.create_infer_request()
    durations: dict[str, list[float]] = defaultdict(list)
    kinds: dict[str, tuple[str, str]] = {}
    run_ms = []
    for i in range(cfg.warmup + cfg.repeats):
        start = time.perf_counter()
        request.infer(feed)
        if i < cfg.warmup:
            continue
        run_ms.append(1000.0 * (time.perf_counter() - start))
        for info in request.get_profiling_info():
            if info.status == info.Status.EXECUTED:
                durations[info.node_name].append(info.real_time.total_seconds() * 1000.0)
                kinds[info.node_name] = (info.node_type, info.exec_type)
    fused = {op.get_friendly_name(): op.get_rt_info()["originalLayersNames"].astype(str).split(",")
             for op in compiled.get_runtime_model().get_ordered_ops()}
    threads = int(compiled.get_property("INFERENCE_NUM_THREADS"))
    del request, compiled
    parent = bundle_dir / (record.parent or "")
    static = flops.graph_macs(parent, {"mel": feed["mel"].shape}) if record.parent and parent.is_file() else {}
    if not static:
        log.warning("%s: its ONNX parent %s is not in the bundle: no MAC counts", record.file, record.parent)
    nodes = []
    for name, times in durations.items():
        layer, kernel = kinds[name]
        counted = [static[n][1].ops for n in fused.get(name, []) if n in static]
        precision = (("int8" if re.search(r"[iu]8", kernel, re.IGNORECASE) else "fp32")
                     if layer in OPENVINO_MAC_LAYERS else None)
        nodes.append({"node": name, "op_type": f"{layer} ({kernel})", "ms": statistics.median(times),
                      "calls": 1, "provider": "OpenVINO CPU", "precision": precision,
                      "ops": sum(counted) if counted else None,
                      "graph_node": next((n for n in fused.get(name, []) if n in static), None)})
    summary = tables(nodes, run_ms, static)
    host = _host(hardware.usable_cores())
    summary |= achieved(summary, host, threads, described["audio_s"])
    session = {"engine": "openvino", **options, "threads": threads}
    return {"profile_version": 1, "created": now_iso(), "bundle": str(bundle_dir), "artifact": record.file,
            "component": record.component, "graph": record.graph, "precision": record.precision,
            "stage": record.stage, "sha256": record.sha256, "input": described, "session": session,
            "threads": threads, "warmup": cfg.warmup, "repeats": cfg.repeats, "host": host, **summary}


def _host(cores: int) -> dict[str, Any]:
    from voxport.runtime.host import detect

    found = detect()
    clock, source = hardware.cpu_clock_mhz()
    fp32 = hardware.estimate_peak(found.cpu_flags, cores, clock, clock_source=source)
    int8 = hardware.estimate_int8_peak(found.cpu_flags, cores, clock, clock_source=source)
    simd = [f for f in found.cpu_flags if f.startswith(("avx", "amx", "fma")) or f in ("ssse3", "f16c")]
    return {"cpu_model": found.cpu_model, "usable_cores": cores, "clock_mhz": clock, "clock_source": source,
            "simd_flags": sorted(simd), "peak_fp32_flops": fp32.flops_per_s, "peak_fp32_method": fp32.method,
            "peak_int8_ops": int8.ops_per_s, "peak_int8_method": int8.method, "peak_note": PEAK_NOTE}


def _graph_node(name: str, static: dict[str, tuple[str, flops.NodeMacs]]) -> str | None:
    """The model file's node a runtime node computes: the same name, or ORT's `<name>_token_<n>` for a
    node it fused (QDQ -> QLinearConv)."""
    if name in static:
        return name
    base = re.sub(r"_token_\d+$", "", name)
    return base if base in static else None


def summarize(trace: list[dict[str, Any]], warmup: int,
              static: dict[str, tuple[str, flops.NodeMacs]] | None = None) -> dict[str, Any]:
    """Per-node medians over the timed runs of an ORT trace, per op type totals and shares, FLOPs.

    A node's MACs come from `static` (`flops.graph_macs` of the model file, same input shape) by name,
    else from the shapes in the trace; its precision is what ORT ran (an 8-bit data input is INT8).
    `ops_counted` vs `ops_in_graph` says whether every counted node of the file was found at run time."""
    static = static or {}
    runs = sorted((e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    timed = runs[warmup:]
    if not timed:
        raise ConfigError(f"the ONNX Runtime trace holds {len(runs)} run(s), none after {warmup} warm-up")
    durations: dict[str, list[float]] = defaultdict(list)
    first: dict[str, dict[str, Any]] = {}
    for event in trace:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        if not any(r["ts"] <= event["ts"] <= r["ts"] + r["dur"] for r in timed):
            continue
        name = event["name"][: -len("_kernel_time")]
        durations[name].append(event["dur"] / 1000.0)
        first.setdefault(name, event)
    nodes = []
    for name, times in durations.items():
        args = first[name]["args"]
        op, shapes = args.get("op_name", "?"), args.get("input_type_shape", [])
        precision = flops.runtime_precision(op, shapes)
        graph_node = _graph_node(name, static) if precision else None
        if graph_node is not None:
            ops: int | None = static[graph_node][1].ops
        else:
            macs = flops.runtime_node_macs(op, shapes, args.get("output_type_shape", []))
            ops = macs.ops if macs else None
        nodes.append({"node": name, "op_type": op, "ms": statistics.median(times),
                      "calls": len(times) // len(timed), "provider": args.get("provider"),
                      "precision": precision, "ops": ops, "graph_node": graph_node})
    return tables(nodes, [r["dur"] / 1000.0 for r in timed], static)


def tables(nodes: list[dict[str, Any]], run_ms: list[float],
           static: dict[str, tuple[str, flops.NodeMacs]]) -> dict[str, Any]:
    """Per op type and per module totals and shares of per-node median times, whichever engine ran them."""
    total = sum(n["ms"] for n in nodes)
    nodes.sort(key=lambda n: -n["ms"])
    for n in nodes:
        n["share"] = n["ms"] / total if total else 0.0
    by_type: dict[str, dict[str, Any]] = {}
    for n in nodes:
        row = by_type.setdefault(n["op_type"], {"op_type": n["op_type"], "ms": 0.0, "count": 0, "ops": 0})
        row["ms"] += n["ms"]
        row["count"] += 1
        row["ops"] += n["ops"] or 0
    op_types = sorted(by_type.values(), key=lambda r: -r["ms"])
    by_block: dict[str, dict[str, Any]] = {}
    for n in nodes:
        row = by_block.setdefault(_block(n["graph_node"] or n["node"]), {"block": _block(n["graph_node"] or n["node"]),
                                                                         "ms": 0.0, "count": 0, "ops": 0})
        row["ms"] += n["ms"]
        row["count"] += 1
        row["ops"] += n["ops"] or 0
    blocks = sorted(by_block.values(), key=lambda r: -r["ms"])
    for row in [*op_types, *blocks]:
        row["share"] = row["ms"] / total if total else 0.0
    uncounted = [n["node"] for n in nodes if n["precision"] and n["ops"] is None]
    if uncounted:
        log.warning("no MAC count for %d node(s) the engine ran (%s): left out of the achieved rates",
                    len(uncounted), ", ".join(uncounted[:5]))
    return {"run_ms": {"median": statistics.median(run_ms), "min": min(run_ms), "max": max(run_ms)},
            "node_ms_total": total, "node_coverage": total / statistics.median(run_ms),
            "ops_counted": sum(n["ops"] or 0 for n in nodes), "ops_in_graph": sum(m.ops for _, m in static.values()),
            "uncounted_nodes": uncounted, "op_types": op_types, "blocks": blocks, "nodes": nodes}


def _block(node: str) -> str:
    """The module a node belongs to, two levels deep (`/generator/resblocks.5`); ORT's own nodes
    (layout Transposes, fused Q/DQ) without a module path are grouped as `(runtime)`."""
    parts = [p for p in node.split("/") if p]
    return "/" + "/".join(parts[:2]) if node.startswith("/") and len(parts) > 2 else "(runtime)"


def achieved(summary: dict[str, Any], host: dict[str, Any], threads: int, audio_s: float) -> dict[str, Any]:
    """Operations per run by precision, and the rates achieved against the theoretical peaks, both of
    the whole host and of the `threads` the session used (its share of the cores)."""
    cores = int(host["usable_cores"])
    share = min(threads, cores) / cores
    peaks = {"fp32": float(host["peak_fp32_flops"]), "int8": float(host["peak_int8_ops"])}
    out: dict[str, Any] = {}
    for precision, peak in peaks.items():
        # Nodes without a MAC count (logged by summarize) are left out of the rates, as it says.
        counted = [n for n in summary["nodes"] if n["precision"] == precision and n["ops"] is not None]
        ops = sum(n["ops"] for n in counted)
        ms = sum(n["ms"] for n in counted)
        rate = ops / (ms / 1000.0) if ms else None
        out[precision] = {"ops": ops, "nodes": len(counted), "node_ms": ms, "ops_per_s_in_nodes": rate,
                          "peak_ops_per_s": peak, "peak_fraction": rate / peak if rate else None,
                          "peak_fraction_threads": rate / (peak * share) if rate else None}
        for n in counted:
            n["ops_per_s"] = n["ops"] / (n["ms"] / 1000.0) if n["ms"] else None
            n["peak_fraction_threads"] = n["ops_per_s"] / (peak * share) if n["ops_per_s"] else None
    ops = out["fp32"]["ops"] + out["int8"]["ops"]
    run_s = summary["run_ms"]["median"] / 1000.0
    out["whole_graph"] = {"ops": ops, "ops_per_audio_s": ops / audio_s, "ops_per_s": ops / run_s,
                          "rtf": run_s / audio_s}
    return {"achieved": out}


def write(profile: dict[str, Any], directory: Path, top: int) -> list[Path]:
    """`<dir>/<artifact>.json` and `.md`, each written atomically."""
    stem = Path(profile["artifact"]).name
    paths = [directory / f"{stem}.json", directory / f"{stem}.md"]
    atomic_write_text(paths[0], json.dumps(profile, indent=1) + "\n")
    atomic_write_text(paths[1], markdown(profile, top) + "\n")
    return paths


def _rate(ops: float | None, precision: str | None) -> str:
    if not ops:
        return "-"
    return f"{ops / 1e9:.1f} {'GOP/s' if precision == 'int8' else 'GFLOP/s'}"


def _pct(x: float | None) -> str:
    return f"{x:.1%}" if x is not None else "-"


def markdown(profile: dict[str, Any], top: int) -> str:
    """The profile as Markdown tables (also what `voxport profile` prints)."""
    h, a, run = profile["host"], profile["achieved"], profile["run_ms"]
    lines = [
        f"### {profile['artifact']} ({profile['precision']}) on {h['cpu_model']}, {profile['threads']} of "
        f"{h['usable_cores']} cores",
        "",
        f"Input: {profile['input']['audio_s']:.2f} s of held-out speech ({profile['input']['item']}, "
        f"{profile['input']['frames']} frames); session {profile['session']}; {profile['repeats']} profiled runs "
        f"after {profile['warmup']} warm-up: median {run['median']:.1f} ms (min {run['min']:.1f}, max "
        f"{run['max']:.1f}), RTF {a['whole_graph']['rtf']:.3f}; node time covers {profile['node_coverage']:.0%} "
        "of the run.",
        "",
        "| op type (as the engine ran it) | total ms | share | count | G(FL)OP per run |",
        "|---|---:|---:|---:|---:|",
        *(f"| {r['op_type']} | {r['ms']:.1f} | {r['share']:.1%} | {r['count']} | "
          f"{r['ops'] / 1e9:.2f} |" if r["ops"] else f"| {r['op_type']} | {r['ms']:.1f} | {r['share']:.1%} | "
          f"{r['count']} | - |" for r in profile["op_types"]),
        "",
        "| module | total ms | share | nodes | G(FL)OP per run |",
        "|---|---:|---:|---:|---:|",
        *(f"| `{r['block']}` | {r['ms']:.1f} | {r['share']:.1%} | {r['count']} | {r['ops'] / 1e9:.2f} |"
          for r in profile.get("blocks", [])),
        "",
        f"Top {min(top, len(profile['nodes']))} nodes by time:",
        "",
        "| node | op type | ms | share | precision | G(FL)OP | achieved | % of peak (its threads) |",
        "|---|---|---:|---:|---|---:|---:|---:|",
        *(f"| `{n['node']}` | {n['op_type']} | {n['ms']:.2f} | {n['share']:.1%} | {n['precision'] or '-'} | "
          f"{(n['ops'] or 0) / 1e9:.2f} | {_rate(n.get('ops_per_s'), n['precision'])} | "
          f"{_pct(n.get('peak_fraction_threads'))} |" for n in profile["nodes"][:top]),
        "",
        "| achieved vs theoretical peak | operations per run | time in those nodes | achieved | "
        "theoretical peak (host) | % of peak (host) | % of peak (threads used) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for precision, label in (("fp32", "FP32 (FLOP)"), ("int8", "INT8 (OP)")):
        p = a[precision]
        if p["ops"]:
            lines.append(f"| {label}: {p['nodes']} nodes | {p['ops'] / 1e9:.2f} G | {p['node_ms']:.1f} ms | "
                         f"{_rate(p['ops_per_s_in_nodes'], precision)} | {_rate(p['peak_ops_per_s'], precision)} | "
                         f"{_pct(p['peak_fraction'])} | {_pct(p['peak_fraction_threads'])} |")
    w = a["whole_graph"]
    lines += [
        f"| whole graph (all counted ops / run time) | {w['ops'] / 1e9:.2f} G ({w['ops_per_audio_s'] / 1e9:.1f} G "
        f"per audio s) | {run['median']:.1f} ms | {w['ops_per_s'] / 1e9:.1f} G/s | | | |",
        "",
        f"- FP32 theoretical peak: {h['peak_fp32_method']}",
        f"- INT8 theoretical peak: {h['peak_int8_method']}",
        f"- {PEAK_NOTE}",
    ]
    if any((a[p]["peak_fraction_threads"] or 0.0) > 1.0 for p in ("fp32", "int8")):
        note = ABOVE_PEAK_NOTE.format(source=h.get("clock_source", "nominal clock"), mhz=h.get("clock_mhz", 0.0))
        lines.append(f"- {note}")
    return "\n".join(lines)
