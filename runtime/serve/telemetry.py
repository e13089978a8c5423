"""Prometheus metrics of one service instance (its own registry, so several can share a process)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
_RTF_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20)


class Telemetry:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # process_resident_memory_bytes, process_cpu_seconds_total, process_open_fds, ... from /proc/self.
        # The default registry has this collector; this one is our own registry, so it needs its own.
        ProcessCollector(registry=r)
        self.requests = Histogram("voxport_request_seconds", "HTTP request latency (to the last byte)",
                                  ["endpoint", "status"], buckets=_LATENCY_BUCKETS, registry=r)
        self.stages = Histogram("voxport_stage_seconds", "time per pipeline stage", ["stage"],
                                buckets=_LATENCY_BUCKETS, registry=r)
        self.rtf = Histogram("voxport_rtf", "real-time factor: processing seconds per second of audio",
                             ["endpoint"], buckets=_RTF_BUCKETS, registry=r)
        self.queue_depth = Gauge("voxport_queue_depth", "admitted requests not yet finished (running + waiting)",
                                 registry=r)
        self.vocoder_queue = Gauge("voxport_vocoder_queue_depth", "mels waiting for the batching vocoder",
                                   registry=r)
        self.vocoder_batch = Histogram("voxport_vocoder_batch_size", "mels per vocoder call",
                                       buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=r)
        self.errors = Counter("voxport_errors_total", "failed requests by kind", ["kind"], registry=r)
        self.rejected = Counter("voxport_rejected_total", "requests refused with 503 (queue full)", registry=r)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stages.labels(name).observe(time.perf_counter() - start)

    def render(self) -> bytes:
        return generate_latest(self.registry)
