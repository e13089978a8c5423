"""`voxport bench`: plan one job per artifact graph of a bundle, run each, derive ratios, report.

Ratios are taken within the run: every row is divided into the PyTorch FP32 row of the same graph
and input (end to end: the all-PyTorch preference). FLOP/s are computed for vocoder rows only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from voxport.benchmarks import compare, flops, hardware, report
from voxport.benchmarks.config import BenchConfig
from voxport.benchmarks.inputs import prepare
from voxport.errors import BenchError, ConfigError, VoxportError
from voxport.pipeline.records import Record, now_iso, read_bundle
from voxport.pipeline.schema import RunConfig

log = logging.getLogger(__name__)

SYNTH_GRAPHS = ("encoder", "decoder_step", "postnet")
_FORMAT_ORDER = {"torch": 0, "onnx": 1, "openvino": 2, "trt": 3}

METHOD = [
    "RTF of a graph row divides by the audio its input stands for: vocoder and postnet, the mel's "
    "frames x hop / rate; speaker encoder, the recording's seconds (partials of the clip as is); "
    "synthesizer encoder, the recording length of the text; decoder step, N steps x r frames (N "
    "steps run through the real host loop with state fed back, stop token ignored).",
    "End to end = VoiceCloner.clone (reference front end, text front end, synthesizer until stop or "
    "the step cap of that length, vocoder); its RTF divides by the seconds of waveform produced.",
    "Time to first audio (TTFA): from the reference recording to the first waveform chunk, i.e. reference "
    "embedding (speaker-encoder front end and graph) + synthesizer encoder + the decoder steps the first chunk "
    "needs + its postnet window + its vocoder call, through VoiceCloner.stream with `serve.stream` (the row's "
    "input.stream; first_chunk_frames sets the first chunk), on the artifacts the cloner picks for that "
    "preference. A stored voice (voice library) skips the embedding: input.embed_ms says what it costs. "
    "input.playback: one whole stream played in real time from its first chunk, the gaps where a chunk came "
    "after the audio before it had played (a first chunk too small for the vocoder's speed shows here); where "
    "the runtime has no stream(), emulated as embedding + encoder + the first decoder steps covering "
    "first_chunk_s + postnet over them + vocoding them (the row's input.ttfa_method says which).",
    "Peak RSS: VmHWM of the job's process, reset (/proc/self/clear_refs) before each row, so it is that "
    "row's peak with the loaded model resident; load s = open_backend (sha256 check, engine load).",
    "Vocoder FLOPs: conv and transposed-conv multiply-adds x 2, counted on the record's model config "
    "(voxport.prune.flops); achieved FLOP/s = FLOPs / median s; % peak of the whole host's estimate.",
]


@dataclass
class BenchRun:
    result: dict[str, Any]
    paths: list[Path]
    table: str
    errors: list[dict[str, str]] = field(default_factory=list)

    def raise_for_failures(self, baseline: str | None, max_ratio: float) -> None:
        """The exit status: failed jobs, then regressions against `baseline` (each row named)."""
        if self.errors:
            raise BenchError("; ".join(f"{e['job']}: {e['error']}" for e in self.errors))
        if baseline:
            compare.check(self.result, baseline, max_ratio)


def run_bench(cfg: Any) -> BenchRun:
    """Measure every artifact of `cfg.bench.bundle`, write the reports; see conf/bench/default.yaml."""
    b, top = BenchConfig.from_cfg(cfg.bench), RunConfig.from_cfg(cfg)
    bundle = Path(b.bundle)
    if not (bundle / "manifest.json").is_file():
        raise ConfigError(f"no built bundle at {bundle} (no manifest.json): run `voxport build` first")
    from voxport.pipeline.engine import ensure_corpus

    started = time.perf_counter()
    records = read_bundle(bundle)
    threads = b.threads or hardware.usable_cores()
    host = hardware.fingerprint(threads)
    cuda = bool(host["cuda_available"]) and b.allow_cuda
    lengths = {str(k): float(b.seconds[k]) for k in dict.fromkeys([*b.lengths, *b.e2e.lengths, *b.e2e.ttfa_lengths])}
    corpus = ensure_corpus(top.corpus_dir)
    with tempfile.TemporaryDirectory(prefix="voxport-bench-") as tmp:
        inputs = prepare(corpus, records, bundle, lengths, float(b.e2e.reference_s), top.seed)
        inputs.save(Path(tmp) / "inputs")
        jobs, skipped = plan_jobs(records, b, bundle, Path(tmp) / "inputs", threads, top.seed, cuda,
                                  host["onnxruntime_providers"], stream=stream_settings(cfg))
        rows, errors = [], []
        for i, job in enumerate(tqdm(jobs, desc="bench", unit="job")):
            try:
                rows += _run_job(job, Path(tmp) / f"job{i}", b.isolate, float(b.job_timeout_s))
            except (VoxportError, subprocess.SubprocessError, OSError) as exc:
                errors.append({"job": job_name(job), "error": str(exc)})
                log.error("bench job %s failed: %s", job_name(job), exc)
    derive(rows, records, host, threads)
    result = {
        "bench_version": 1, "created": now_iso(), "command": " ".join(["voxport bench", *sys.argv[1:]]),
        "bundle": str(bundle), "threads": threads, "host": host, "wall_s": time.perf_counter() - started,
        "config": dataclasses.asdict(b), "inputs": inputs.meta, "method": METHOD,
        "rows": rows, "skipped": skipped, "errors": errors,
    }
    paths = report.write_all(result, Path(b.out), time.strftime("%Y%m%d-%H%M%S"))
    log.info("bench: %d rows in %.0f s; wrote %s", len(rows), result["wall_s"], ", ".join(map(str, paths)))
    return BenchRun(result, paths, report.markdown(result), errors)


def job_name(job: dict[str, Any]) -> str:
    if job["kind"] == "graph":
        return f"{job['component']}/{job['graph']} {job['file']} ({job['device']})"
    return f"end to end {'>'.join(job['preference'])}"


def stream_settings(cfg: Any) -> dict[str, Any]:
    """`serve.stream` (runtime/streaming.py StreamConfig) as a dict: time to first audio is measured
    with the chunking the service streams with."""
    import dataclasses as dc

    from voxport.pipeline.schema import build
    from voxport.runtime.streaming import StreamConfig

    return dc.asdict(build(StreamConfig, cfg.serve.stream, "serve.stream"))


def plan_jobs(records: list[Record], b: Any, bundle: Path, inputs_dir: Path, threads: int, seed: int,
              cuda: bool, providers: list[str] | tuple[str, ...],
              stream: dict[str, Any] | None = None) -> tuple[list[dict], list[dict]]:
    """One job per (artifact, graph, device), then one pipeline job (end to end, time to first
    audio, streamed with `stream`: StreamConfig fields, default its defaults) per preference order;
    a TensorRT engine on a host without CUDA is skipped, and said so."""
    b = BenchConfig.from_cfg(b)
    common = {"bundle": str(bundle), "inputs": str(inputs_dir), "threads": threads, "seed": seed,
              "warmup": int(b.warmup), "repeats": int(b.repeats), "min_repeats": int(b.min_repeats),
              "budget_s": float(b.budget_s)}
    lengths = [str(x) for x in b.lengths]
    jobs: list[dict] = []
    skipped: list[dict] = []
    for component in b.components:
        mine = sorted((r for r in records if r.component == component),
                      key=lambda r: (_FORMAT_ORDER.get(r.format, 9), r.precision != "fp32", r.file))
        if not mine:
            skipped.append({"what": component, "why": "no artifact of it in the bundle"})
        for record in mine:
            for graph in SYNTH_GRAPHS if record.graph == "*" else (record.graph,):
                devices = {"torch": ["cpu"], "onnx": ["cpu"], "openvino": ["cpu"], "trt": ["cuda"]}[record.format]
                if record.format == "onnx" and cuda and "CUDAExecutionProvider" in providers:
                    devices.append("cuda")
                if record.format == "trt" and not cuda:
                    skipped.append({"what": f"{record.file} ({graph})", "why": "TensorRT engine; no CUDA on this host"})
                    continue
                for device in devices:
                    jobs.append({**common, "kind": "graph", "component": component, "graph": graph,
                                 "file": record.file, "device": device, "lengths": lengths})
    # Each order once: with target.preference=[torch] the runtime row is the all-PyTorch row.
    for preference in dict.fromkeys(b.e2e.preferences):
        if b.e2e.lengths or b.e2e.ttfa_lengths:
            jobs.append({**common, "kind": "pipeline", "preference": list(preference), "strict": b.e2e.strict,
                         "lengths": [str(x) for x in b.e2e.lengths],
                         "ttfa_lengths": [str(x) for x in b.e2e.ttfa_lengths],
                         "first_chunk_s": float(b.e2e.first_chunk_s), "stream": dict(stream or {})})
    return jobs, skipped


def _run_job(job: dict[str, Any], work: Path, isolate: bool, timeout_s: float) -> list[dict[str, Any]]:
    if not isolate:
        from voxport.benchmarks.worker import run_job

        return run_job(job)
    work.mkdir(parents=True)
    (work / "job.json").write_text(json.dumps(job))
    n = str(job["threads"])
    env = {**os.environ, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n}
    done = subprocess.run([sys.executable, "-m", "voxport.benchmarks.worker", str(work / "job.json"),
                           str(work / "rows.json")], env=env, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        tail = [line for line in done.stderr.strip().splitlines() if line.strip()][-1:] or ["(no output)"]
        raise BenchError(f"worker exited {done.returncode}: {tail[0]}")
    return json.loads((work / "rows.json").read_text())


def derive(rows: list[dict[str, Any]], records: list[Record], host: dict[str, Any], threads: int) -> None:
    """Add to each row: speed ratio vs PyTorch FP32 (same graph, same input), record quality, FLOP/s."""
    by_file = {r.file: r for r in records}
    reference: dict[tuple, float] = {}
    for row in rows:
        if row["kind"] == "graph" and row["format"] == "torch" and row["stage"] == "source":
            reference[("graph", row["component"], row["graph"], row["length"])] = row["median_s"]
        elif row["kind"] != "graph" and row["preference"] == ["torch"]:
            reference[(row["kind"], row["length"])] = row["median_s"]
    for row in rows:
        key = (("graph", row["component"], row["graph"], row["length"]) if row["kind"] == "graph"
               else (row["kind"], row["length"]))
        ref = reference.get(key)
        row["speedup_vs_torch_fp32"] = ref / row["median_s"] if ref and row["median_s"] else None
        record = by_file.get(row["file"] or "")
        row["quality"] = _figures(record) if record else {}
        if record is not None and record.model.get("network") == "hifigan":  # the FLOP model is HiFi-GAN's
            per_frame = flops.vocoder_flops_per_frame(record.model)
            row |= flops.achieved(per_frame, int(row["input"]["frames"]), row["median_s"],
                                  float(host["peak_fp32_flops"]), int(host["usable_cores"]), threads)


def _figures(record: Record) -> dict[str, float]:
    """Scalar parity and quality figures of a record (quality wins where both name a figure)."""
    merged = {**record.parity, **record.quality}
    return {k: v for k, v in merged.items() if isinstance(v, int | float) and not isinstance(v, bool)}
