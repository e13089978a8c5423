"""OpenVINO backend (CPU plugin): runs an OpenVINO IR that the `openvino` pass made.

The compiled model is configured from the artifact's record (the inference precision and
performance hint its build judged and timed), never from the plugin's defaults: OpenVINO would
otherwise pick bfloat16 on its own wherever the CPU has it, and serve something nobody gated. The
precision the compiled model really runs is read back and a mismatch refused, as the ONNX Runtime
backend refuses a provider fallback.

Concurrency mirrors ONNX Runtime's: unpinned (build, bench, clone), one request at a time on every
core (one stream); with `threads` pinned (the service: `serve.threads` per request, several workers),
as many streams as fit the cores, each running one request on `threads` threads, so two workers
vocode at once instead of queueing (measured: 8 calls of 3 s from two threads 1.25 s with two
streams, 2.31 s with one). An infer request is not thread-safe: each call takes an idle one from a
pool. A new input length costs one slower call (about 70 ms more for the vocoder on 2 cores) while
the plugin prepares kernels for that shape; later calls of that length are fast.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from voxport.errors import BackendUnavailable
from voxport.models.checkpoint import sha256_file
from voxport.pipeline.records import Record
from voxport.runtime.backends.base import Backend, verified_artifact

log = logging.getLogger(__name__)

# The compiled model's precision property, by the names records use.
_PRECISION_NAMES = {"f32": ("f32", "float32"), "bf16": ("bf16", "bfloat16")}


def verified_weights(record: Record, xml: Path) -> Path:
    """The IR's `.bin`, after checking its sha256 against the record (a changed file is refused)."""
    names = (record.config or {}).get("sidecars") or [xml.with_suffix(".bin").name]
    weights = xml.parent / names[0]
    expected = (record.config or {}).get("weights_sha256")
    if not weights.is_file():
        raise BackendUnavailable(f"{record.file}: its weights file {weights.name} is missing")
    if not expected or sha256_file(weights) != expected:
        raise BackendUnavailable(f"{record.file}: {weights.name} does not match the sha256 in its record; "
                                 "the file was changed or replaced after it was validated")
    return weights


class OpenVINOBackend(Backend):
    name = "openvino"

    def __init__(self, threads: int | None = None) -> None:
        """`threads` > 0 pins the plugin's inference threads (None or 0: the plugin's default, every core)."""
        self._threads = threads or None
        self._compiled: Any = None
        self._idle: list[Any] = []  # infer requests not running now
        self._inputs: list[str] = []
        self._outputs: list[str] = []
        self._lock = threading.Lock()
        self._describe = ""

    def load(self, record: Record, bundle_dir: Path) -> None:
        from voxport.export.openvino import native_bf16, recorded_options, require_openvino

        xml = verified_artifact(record, bundle_dir)
        verified_weights(record, xml)
        ov = require_openvino()
        options = recorded_options(record, self._threads)
        precision = options["INFERENCE_PRECISION_HINT"]
        core = ov.Core()
        if precision == "bf16" and not native_bf16(core):
            raise BackendUnavailable(f"{record.file}: built to run in bfloat16, which this CPU does not compute "
                                     "natively (OpenVINO would emulate it)")
        if self._threads:  # one stream per `threads` cores: concurrent requests run side by side
            streams = max(1, (os.cpu_count() or 1) // self._threads)
            options.update(NUM_STREAMS=streams, INFERENCE_NUM_THREADS=streams * self._threads)
        try:
            compiled = core.compile_model(str(xml), "CPU", options)
        except RuntimeError as exc:
            raise BackendUnavailable(f"{record.file}: OpenVINO could not compile it: {str(exc).splitlines()[0]}") \
                from None
        actual = str(compiled.get_property("INFERENCE_PRECISION_HINT")).lower()
        if not any(name in actual for name in _PRECISION_NAMES.get(precision, (precision,))):
            raise BackendUnavailable(f"{record.file}: asked OpenVINO for {precision} but it compiled {actual}; "
                                     "refusing the silent change")
        self._compiled = compiled
        self._idle = [compiled.create_infer_request()]
        self._inputs = [next(iter(i.get_names())) for i in compiled.inputs]
        self._outputs = [next(iter(o.get_names())) for o in compiled.outputs]
        streams = int(compiled.get_property("NUM_STREAMS"))
        threads = int(compiled.get_property("INFERENCE_NUM_THREADS")) // max(1, streams)
        self._describe = f"OpenVINO CPU ({precision}, {threads} threads" + (
            f" per request, {streams} streams)" if streams > 1 else ")")
        log.info("loaded %s on %s (OpenVINO %s)", record.file, self._describe, ov.__version__.split("-")[0])

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        compiled = self._compiled
        if compiled is None:
            raise BackendUnavailable("openvino backend used before load() or after close()")
        with self._lock:
            request = self._idle.pop() if self._idle else compiled.create_infer_request()
        try:
            request.infer({n: np.ascontiguousarray(feeds[n]) for n in self._inputs})
            # The request's output tensors are reused by its next call: copy them out.
            return {n: request.get_output_tensor(i).data.copy() for i, n in enumerate(self._outputs)}
        finally:
            with self._lock:
                self._idle.append(request)

    @property
    def providers(self) -> list[str]:
        return [self._describe] if self._compiled is not None else []

    def close(self) -> None:
        with self._lock:
            self._idle = []
            self._compiled = None
