"""One bench job: load one artifact graph (or a whole pipeline), time it on every input length.

Run as `python -m voxport.benchmarks.worker job.json rows.json` (one fresh process per job, so
cold-start load time and peak memory are the artifact's own), or in process via `run_job`.

Per row: `warmup` untimed calls (the first, on a fresh input shape, reported as `first_run_s`), then up to
`repeats` timed calls, stopping early once `min_repeats` are done and the timed total exceeds
`budget_s`. Wall time by `time.perf_counter`, process CPU time (all threads) by
`time.process_time`; their ratio (`cpu_per_wall`) approaches the thread count on an idle host and
drops when other processes take the cores (the sign of a noisy run). On CUDA rows
`torch.cuda.synchronize()` brackets every timed call.
Peak RSS: the kernel's high-water mark (VmHWM, /proc/self/status), reset before loading and before
each row by writing 5 to /proc/self/clear_refs, so each figure is that row's own peak (resident
model included); where the reset is refused, the process peak since start
(`resource.getrusage`) is reported and the method says so.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from voxport.benchmarks.inputs import BenchInputs
from voxport.benchmarks.stats import summarize
from voxport.pipeline.records import Record, read_bundle

log = logging.getLogger(__name__)

Case = tuple[Callable[[], Any], float | None, dict[str, Any]]  # call, audio seconds, input description


# ---------------------------------------------------------------------------------------------
# Memory


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False if refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    hwm = _status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ---------------------------------------------------------------------------------------------
# Timing


def measure(call: Callable[[], Any], audio_s: float | None, job: dict[str, Any],
            sync: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Time `call` per the job's warmup / repeats / min_repeats / budget_s; summary + peak RSS."""
    resettable = reset_peak()
    sync()
    start = time.perf_counter()
    output = call()
    sync()
    first = time.perf_counter() - start
    if audio_s is None and output is not None:  # end to end: the length is what came out
        audio_s = float(np.asarray(output).size) / float(job["sample_rate"])
    for _ in range(int(job["warmup"]) - 1):  # the first call was the first warm-up
        call()
    times, cpu = [], []
    for i in range(int(job["repeats"])):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        call()
        sync()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        if i + 1 >= int(job["min_repeats"]) and sum(times) > float(job["budget_s"]):
            break
    cpu_s = float(np.median(cpu))
    return {**summarize(times, audio_s), "audio_s": audio_s, "first_run_s": first, "times_s": times,
            "cpu_s_median": cpu_s, "cpu_per_wall": cpu_s / max(float(np.median(times)), 1e-9),
            "peak_rss_mb": peak_rss_mb(),
            "rss_method": "VmHWM reset per row" if resettable else "process peak since start"}


# ---------------------------------------------------------------------------------------------
# Cases: what one row runs


def _torch_inputs(record: Record, graph: str) -> set[str]:
    """Input names of a torch artifact's graph (torch records carry no tensor specs)."""
    from voxport.models import registry

    return set(registry.graph_specs(registry.build_module(record.model), record.model)[graph].input_names)


def graph_case(record: Record, graph: str, infer: Callable[[dict], dict], inputs: BenchInputs,
               label: str) -> Case:
    a, m = inputs.arrays, inputs.meta["lengths"][label]
    # The feed follows the graph's input contract (its tensor names), not the component's name.
    names = {t.name for t in record.inputs} or _torch_inputs(record, graph)
    if names == {"mels"}:  # partial-utterance mels: the speaker encoder
        feed = {"mels": a[f"{label}.mels16"]}
        return (lambda: infer(feed)), m["recording_s"], {"item": m["item"], "partials": int(feed["mels"].shape[0])}
    if names == {"mel"}:  # a mel spectrogram in: the vocoder, the postnet
        feed = {"mel": a[f"{label}.mel"][None]}
        return (lambda: infer(feed)), m["vocoder_audio_s"], {"item": m["item"], "frames": m["frames"]}
    text = {"text_item": m["text_item"], "text": m["text"], "symbols": m["symbols"]}
    if graph == "encoder":
        feed = {"chars": a[f"{label}.chars"], "speaker_embedding": a["speaker_embedding"],
                "style_idx": np.zeros(1, dtype=np.int64), "encoder_masks": a[f"{label}.encoder_masks"]}
        return (lambda: infer(feed)), m["text_audio_s"], text
    return _decoder_case(record, infer, inputs, label, text)


def _decoder_case(record: Record, infer: Callable[[dict], dict], inputs: BenchInputs, label: str,
                  text: dict[str, Any]) -> Case:
    """N decoder steps through the real host loop (state fed back, stop token ignored), drawing the
    prenet masks as the served runtime does (NumpyMasks)."""
    from voxport.models.prenet_masks import NumpyMasks
    from voxport.models.synthesizer_config import SynthesizerConfig
    from voxport.runtime.synthesizer_loop import run_host_loop

    a, m = inputs.arrays, inputs.meta["lengths"][label]
    cfg = SynthesizerConfig.from_dict(record.model["config"])
    encoded = {"encoder_seq": a[f"{label}.encoder_seq"], "encoder_seq_proj": a[f"{label}.encoder_seq_proj"]}
    steps = int(m["decoder_steps"])

    def call() -> Any:
        masks = NumpyMasks(int(inputs.meta["seed"]))
        return run_host_loop(lambda _: encoded, infer, lambda f: {"mel_post": f["mel"]}, a[f"{label}.chars"],
                             a["speaker_embedding"], 0, masks, cfg, max_decoder_steps=steps,
                             stop_on_token=False)

    return call, m["decoder_audio_s"], {**text, "steps": steps}


# ---------------------------------------------------------------------------------------------
# Jobs


def run_job(job: dict[str, Any]) -> list[dict[str, Any]]:
    """Every row of one job (see run.plan_jobs for the job fields)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(int(job["threads"]))
    try:
        if job["kind"] == "graph":
            return _graph_job(job)
        from voxport.benchmarks.pipeline import pipeline_job

        return pipeline_job(job)
    finally:
        torch.set_num_threads(previous)


def cuda_sync(device: str) -> Callable[[], None]:
    if device != "cuda":
        return lambda: None
    import torch

    return torch.cuda.synchronize


def _graph_job(job: dict[str, Any]) -> list[dict[str, Any]]:
    from voxport.runtime.backends import open_backend

    bundle = Path(job["bundle"])
    record = next(r for r in read_bundle(bundle) if r.file == job["file"])
    options: dict[str, Any] = {}
    if record.format == "onnx":
        # ONNX Runtime CUDA keeps the CPU provider for the ops CUDA lacks, as the runtime asks it.
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if job["device"] == "cuda" else [
            "CPUExecutionProvider"]
        # The bench pins intra-op threads (as torch's) over the record's session settings; the rest
        # (graph optimization, spinning) is what the build timed, and the row says what was used.
        options = {"providers": providers, "intra_op_threads": int(job["threads"]) or None}
    elif record.format == "openvino":
        options = {"threads": int(job["threads"]) or None}
    elif record.format == "trt":
        from voxport.runtime.host import detect

        options = {"host": detect()}
    inputs = BenchInputs.load(Path(job["inputs"]))
    before = _status_mb("VmRSS")
    reset_peak()
    start = time.perf_counter()
    backend = open_backend(record, bundle, graph=job["graph"], **options)
    load_s = time.perf_counter() - start
    load_peak = peak_rss_mb()
    sync = cuda_sync(job["device"])
    settings = getattr(backend, "settings", None)  # ONNX Runtime only
    session = settings.to_dict() if settings is not None else None
    if session is not None:
        log.info("%s: ONNX Runtime session %s", record.file, session)
    rows = []
    try:
        for label in job["lengths"]:
            call, audio_s, described = graph_case(record, job["graph"], backend.infer, inputs, label)
            figures = measure(call, audio_s, job, sync)
            rows.append({
                "id": f"{record.component}/{job['graph']} | {record.file} | {job['device']} | {label}",
                "kind": "graph", "component": record.component, "graph": job["graph"], "file": record.file,
                "format": record.format, "precision": record.precision, "stage": record.stage,
                "sparsity": record.sparsity, "weights": record.weights, "device": job["device"],
                "backend": type(backend).__name__, "providers": list(backend.providers), "length": label,
                "input": described, "threads": int(job["threads"]), "session": session, "warmup": int(job["warmup"]),
                "load_s": load_s, "load_peak_rss_mb": load_peak, "baseline_rss_mb": before, **figures,
            })
    finally:
        backend.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    job = json.loads(Path(args[0]).read_text())
    rows = run_job(job)
    Path(args[1]).write_text(json.dumps(rows, default=_plain))
    return 0


def _plain(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


if __name__ == "__main__":
    raise SystemExit(main())
