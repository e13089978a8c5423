"""Micro-benchmarks per artifact with pytest-benchmark: `pytest benchmarks/` (not in the default run).

Every artifact graph of the bundle ($VOXPORT_BENCH_BUNDLE, default artifacts/default; skipped when
missing) runs on the same 1 s real-speech input `voxport bench` calls "short": one warm-up round,
then `VOXPORT_BENCH_ROUNDS` (default 3) timed rounds; `extra_info` carries the audio seconds and
the RTF of the median. `--benchmark-json out.json` saves pytest-benchmark's own report.
Thread counts are the engines' defaults here; `voxport bench` is the run that pins them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from voxport.pipeline.records import Record, read_bundle

BUNDLE = Path(os.environ.get("VOXPORT_BENCH_BUNDLE", Path(__file__).resolve().parents[1] / "artifacts" / "default"))
ROUNDS = int(os.environ.get("VOXPORT_BENCH_ROUNDS", "3"))
SYNTH_GRAPHS = ("encoder", "decoder_step", "postnet")

if not (BUNDLE / "manifest.json").is_file():
    pytest.skip(f"no bundle at {BUNDLE}: run `voxport build` first", allow_module_level=True)

RECORDS = [r for r in read_bundle(BUNDLE) if r.format != "trt"]  # engines need a GPU: `voxport bench`
CASES = [(r, g) for r in RECORDS for g in (SYNTH_GRAPHS if r.graph == "*" else (r.graph,))]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory):
    from voxport.benchmarks.inputs import prepare
    from voxport.pipeline.engine import ensure_corpus

    return prepare(ensure_corpus(None), RECORDS, BUNDLE, {"short": 1.0}, 3.0, seed=1234)


@pytest.mark.parametrize(("record", "graph"), CASES, ids=[f"{r.file}:{g}" for r, g in CASES])
def test_artifact(benchmark, inputs, record: Record, graph: str) -> None:
    from voxport.benchmarks.worker import graph_case
    from voxport.runtime.backends import open_backend

    backend = open_backend(record, BUNDLE, graph=graph)
    try:
        call, audio_s, described = graph_case(record, graph, backend.infer, inputs, "short")
        benchmark.group = f"{record.component}/{graph}"
        benchmark.extra_info.update({"file": record.file, "precision": record.precision, "audio_s": audio_s,
                                     "input": described})
        benchmark.pedantic(call, rounds=ROUNDS, warmup_rounds=1, iterations=1)
        median = benchmark.stats.stats.median
        benchmark.extra_info["rtf_median"] = median / audio_s if audio_s else None
        assert median > 0
    finally:
        backend.close()


def test_end_to_end(benchmark, inputs) -> None:
    from voxport.runtime.cloner import VoiceCloner

    cloner = VoiceCloner(BUNDLE)
    meta = inputs.meta["lengths"]["short"]
    try:
        benchmark.group = "end to end"
        benchmark.extra_info["served"] = {k: s.file for k, s in cloner.served.items()}
        wav = benchmark.pedantic(cloner.clone, args=(inputs.arrays["reference16"], 16000, meta["text"]),
                                 kwargs={"max_decoder_steps": meta["decoder_steps"]}, rounds=ROUNDS,
                                 warmup_rounds=1, iterations=1)
        benchmark.extra_info["audio_s"] = wav.size / cloner.sample_rate
        benchmark.extra_info["rtf_median"] = benchmark.stats.stats.median / (wav.size / cloner.sample_rate)
        assert wav.size > 0
    finally:
        cloner.close()
