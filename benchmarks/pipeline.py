"""End-to-end rows (reference clip + text -> waveform) and time to first audio, per preference.

One `VoiceCloner` per job serves both, with the artifacts it picks for that preference order.
End to end is `VoiceCloner.clone`: speaker-encoder front end (resample, VAD, partial mels) and
graph, text front end, synthesizer host loop until the stop token or the decoder-step cap of that
length, postnet, vocoder. Its RTF divides by the seconds of waveform that came out.

Time to first audio: reference embedding, then the first chunk of `VoiceCloner.stream` (the
runtime's streaming path: decoder step by step, windowed postnet and vocoder), chunked as the job's
`stream` (`serve.stream`) says; the embedding alone is timed too (`embed_ms`: what a stored voice
saves), and one whole stream is timed chunk by chunk (`playback`: the gaps a listener would hear if
playback started with the first chunk, in real time: a small first chunk is worth nothing if the
next one comes after it has played). Where the runtime
has no `stream`, it is emulated by what a streaming path could not avoid before its first sound:
embedding, synthesizer encoder, the first N decoder steps covering `first_chunk_s`, the postnet
over those frames, and vocoding them; the row's `input.ttfa_method` says which was measured.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from voxport.benchmarks.inputs import BenchInputs
from voxport.benchmarks.worker import _status_mb, cuda_sync, measure, peak_rss_mb, reset_peak


def pipeline_job(job: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of a `pipeline` job: end to end per `lengths`, time to first audio per `ttfa_lengths`."""
    from voxport.runtime.cloner import VoiceCloner

    preference, threads = list(job["preference"]), int(job["threads"])
    inputs = BenchInputs.load(Path(job["inputs"]))
    reference, seed, meta = inputs.arrays["reference16"], int(inputs.meta["seed"]), inputs.meta
    before = _status_mb("VmRSS")
    reset_peak()
    start = time.perf_counter()
    cloner = VoiceCloner(Path(job["bundle"]), preference=preference, strict=bool(job.get("strict")), threads=threads)
    load_s, load_peak = time.perf_counter() - start, peak_rss_mb()
    served = {k: s.as_dict() for k, s in cloner.served.items()}
    providers = sorted({p for s in served.values() for p in s["providers"]})
    on_gpu = any(s["format"] == "trt" for s in served.values()) or "CUDAExecutionProvider" in providers
    device = "cuda" if on_gpu else "cpu"
    sync = cuda_sync(device)
    common = {
        "component": "pipeline", "file": None, "format": _joined(served, "format"),
        "precision": _joined(served, "precision"), "stage": None, "sparsity": None,
        "weights": _joined(served, "weights"), "device": device, "backend": ">".join(preference),
        "preference": preference, "served": {k: s["file"] for k, s in served.items()}, "providers": providers,
        "threads": threads, "sessions": {k: s["session"] for k, s in served.items() if s["session"] is not None},
        "warmup": int(job["warmup"]), "load_s": load_s, "load_peak_rss_mb": load_peak,
        "baseline_rss_mb": before,
    }
    rows = []
    try:
        for kind, labels in (("e2e", job["lengths"]), ("ttfa", job["ttfa_lengths"])):
            for label in labels:
                m = meta["lengths"][label]
                steps = int(m["decoder_steps"])
                described: dict[str, Any] = {"reference": meta["reference"], "text": m["text"],
                                             "max_decoder_steps": steps}
                if kind == "e2e":
                    def call(text: str = m["text"], steps: int = steps) -> np.ndarray:
                        return cloner.clone(reference, 16000, text, style_idx=0, seed=seed, max_decoder_steps=steps)

                    figures = measure(call, None, {**job, "sample_rate": cloner.sample_rate}, sync)
                else:
                    first, method = first_chunk_fn(cloner, reference, m["text"], steps, seed, job, meta)
                    figures = measure(first, 0.0, job, sync)
                    chunk_s = float(first().size) / cloner.sample_rate
                    embed = measure(lambda: cloner.embed(reference, 16000), 0.0, job, sync)
                    figures |= {"audio_s": None, "rtf": None, "rtf_p95": None, "x_realtime": None}
                    described |= {"ttfa_method": method, "first_chunk_s": chunk_s, "stream": job.get("stream") or {},
                                  "embed_ms": 1000.0 * embed["median_s"]}
                    if method == "stream":
                        described["playback"] = playback(cloner, reference, m["text"], steps, seed, job)
                rows.append({"id": f"{kind} | {'>'.join(preference)} | {device} | {label}", "kind": kind,
                             "graph": kind, "length": label, "input": described, **common, **figures})
    finally:
        cloner.close()
    return rows


def first_chunk_fn(cloner: Any, reference: np.ndarray, text: str, steps: int, seed: int, job: dict[str, Any],
                   meta: dict[str, Any]) -> tuple[Any, str]:
    """(call returning the first waveform chunk, "stream" | "emulated"); see the module docstring."""
    if hasattr(cloner, "stream"):
        from voxport.runtime.streaming import StreamConfig

        stream_cfg = StreamConfig(**job["stream"]) if job.get("stream") else None

        def first() -> np.ndarray:
            chunks = cloner.stream(text, cloner.embed(reference, 16000), style_idx=0, seed=seed,
                                   max_decoder_steps=steps, stream_cfg=stream_cfg)
            try:
                return next(iter(chunks))
            finally:
                getattr(chunks, "close", lambda: None)()

        return first, "stream"
    chunk_steps = min(steps, math.ceil(float(job["first_chunk_s"]) / meta["frame_s"] / meta["r"]))

    def emulated() -> np.ndarray:
        mel = cloner.synthesize(text, cloner.embed(reference, 16000), style_idx=0, seed=seed,
                                max_decoder_steps=chunk_steps)
        return cloner.vocode(mel)

    return emulated, "emulated"


def playback(cloner: Any, reference: np.ndarray, text: str, steps: int, seed: int,
             job: dict[str, Any]) -> dict[str, Any]:
    """One whole stream, each chunk's arrival timed: played from the first chunk's arrival in real time,
    the silence a listener hears where a chunk arrives after the audio before it has played."""
    from voxport.runtime.streaming import StreamConfig

    stream_cfg = StreamConfig(**job["stream"]) if job.get("stream") else None
    start = time.perf_counter()
    arrivals, seconds = [], []
    for chunk in cloner.stream(text, cloner.embed(reference, 16000), style_idx=0, seed=seed,
                               max_decoder_steps=steps, stream_cfg=stream_cfg):
        arrivals.append(time.perf_counter() - start)
        seconds.append(chunk.size / cloner.sample_rate)
    return {"chunks": len(arrivals), "audio_s": sum(seconds), "last_chunk_ms": 1000.0 * arrivals[-1],
            **stalls(arrivals, seconds)}


def stalls(arrivals: list[float], seconds: list[float]) -> dict[str, float]:
    """Gaps (ms) in real-time playback that starts when the first chunk arrives: total and worst."""
    clock, total, worst = arrivals[0], 0.0, 0.0
    for arrived, duration in zip(arrivals, seconds, strict=True):
        gap = max(0.0, arrived - clock)
        total, worst = total + gap, max(worst, gap)
        clock = max(clock, arrived) + duration
    return {"stall_ms": 1000.0 * total, "worst_gap_ms": 1000.0 * worst}


def _joined(served: dict[str, dict[str, Any]], key: str) -> str:
    return "+".join(sorted({s[key] for s in served.values()}))
