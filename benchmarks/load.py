"""Load test of a running `voxport serve`: N concurrent clients on loopback, bounded in count and time.

    python -m voxport.benchmarks.load --url http://127.0.0.1:8000 --clients 4 --requests 40 \
        --duration 120 --mode clone --reference speech.wav [--out load.json]

Each client sends requests one after another (so N clients keep at most N requests in flight)
until the total request count or the duration is reached. The report gives throughput (requests
and seconds of audio per second), latency percentiles of the successful requests, time to first
audio chunk (mode `stream`), counts by HTTP status, and the Retry-After values of 503 answers.
Only loopback URLs are accepted: this is a local benchmark, not a tool to load other hosts.

Any engine serving the API can be the target: `voxport serve` or `voxport serve serve.engine=ray`
(Ray Serve's HTTP proxy, serve.port). The report's `server` says which one it measured (engine, and
for Ray the replicas per deployment and the nodes they run on), read from /health before the load.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np

log = logging.getLogger(__name__)

MODES = ("clone", "embedding", "stream")
MAX_CLIENTS, MAX_REQUESTS, MAX_DURATION_S = 64, 10_000, 1800.0


@dataclass
class LoadReport:
    url: str
    mode: str
    clients: int
    duration_s: float
    requests: int
    ok: int
    throughput_rps: float
    audio_seconds_per_second: float
    latency_s: dict[str, float]
    first_chunk_s: dict[str, float]
    status: dict[str, int]
    retry_after: list[int] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)  # transport errors by exception type
    server: dict[str, Any] = field(default_factory=dict)  # what served the load (/health: engine, replicas)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    arr = np.asarray(values)
    return {"p50": float(np.percentile(arr, 50)), "p95": float(np.percentile(arr, 95)),
            "mean": float(arr.mean()), "max": float(arr.max())}


def check_loopback(url: str) -> str:
    host = urlsplit(url).hostname or ""
    try:
        loop = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loop = host == "localhost"
    if not loop:
        raise ValueError(f"{url}: the load test only targets loopback addresses (127.0.0.1, ::1, localhost)")
    return url.rstrip("/")


def describe_server(url: str, timeout: float = 30.0) -> dict[str, Any]:
    """The engine behind `url` and, for Ray, each deployment's replica count and nodes (from /health)."""
    health = httpx.get(f"{url}/health", timeout=timeout).json()
    deployments = {name: {"replicas": len(d.get("replicas", [])),
                          "nodes": sorted({r.get("node_ip") or "?" for r in d.get("replicas", [])})}
                   for name, d in health.get("deployments", {}).items() if "replicas" in d}
    return {"engine": health.get("engine", "local"), "deployments": deployments,
            "workers": health.get("capacity", {}).get("workers")}


def create_voice(url: str, reference: Path, timeout: float = 120.0) -> str:
    """Upload `reference` to the voice library; returns its id."""
    with open(reference, "rb") as handle:
        r = httpx.post(f"{url}/api/v1/voices", files={"reference": (reference.name, handle, "audio/wav")},
                       data={"name": "load-test"}, timeout=timeout)
    r.raise_for_status()
    return r.json()["id"]


def _one(client: httpx.Client, url: str, mode: str, text: str, voice_id: str | None,
         embedding: list[float] | None, steps: int | None) -> tuple[int, float | None, float, dict[str, str]]:
    """One request: (status, time to first chunk, audio seconds, headers)."""
    extra = {"max_decoder_steps": str(steps)} if steps else {}
    if mode == "embedding":
        body: dict[str, Any] = {"text": text, "embedding": embedding, **({"max_decoder_steps": steps} if steps else {})}
        r = client.post(f"{url}/api/v1/synthesize-with-embedding", json=body)
        return r.status_code, None, float(r.headers.get("x-voxport-duration-s", 0.0)), dict(r.headers)
    data = {"text": text, "voice_id": voice_id or "", **extra}
    if mode == "clone":
        r = client.post(f"{url}/api/v1/clone-voice", data=data)
        return r.status_code, None, float(r.headers.get("x-voxport-duration-s", 0.0)), dict(r.headers)
    start, first, size = time.perf_counter(), None, 0
    with client.stream("POST", f"{url}/api/v1/clone-voice", data={**data, "stream": "true"}) as r:
        for piece in r.iter_raw():
            first = time.perf_counter() - start if first is None else first
            size += len(piece)
        rate = int(r.headers.get("x-voxport-sample-rate", 22050))
        return r.status_code, first, max(0, size - 44) / 2 / rate, dict(r.headers)


def run_load(url: str, clients: int, requests: int, duration_s: float, mode: str = "clone",
             text: str = "Voice cloning on a small server.", voice_id: str | None = None,
             embedding: list[float] | None = None, max_decoder_steps: int | None = None,
             timeout_s: float = 120.0) -> LoadReport:
    url = check_loopback(url)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    if not (1 <= clients <= MAX_CLIENTS and 1 <= requests <= MAX_REQUESTS and 0 < duration_s <= MAX_DURATION_S):
        raise ValueError(f"bounds: 1..{MAX_CLIENTS} clients, 1..{MAX_REQUESTS} requests, (0, {MAX_DURATION_S}] s")
    if mode == "embedding" and embedding is None:
        raise ValueError("mode 'embedding' needs an embedding")
    if mode != "embedding" and voice_id is None:
        raise ValueError(f"mode '{mode}' needs a voice_id")
    lock = threading.Lock()
    issued = 0
    latencies: list[float] = []
    firsts: list[float] = []
    audio = 0.0
    statuses: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    retry_after: list[int] = []
    deadline = time.monotonic() + duration_s

    def client_loop() -> None:
        nonlocal issued, audio
        with httpx.Client(timeout=timeout_s) as client:
            while time.monotonic() < deadline:
                with lock:
                    if issued >= requests:
                        return
                    issued += 1
                start = time.perf_counter()
                try:
                    status, first, seconds, headers = _one(client, url, mode, text, voice_id, embedding,
                                                           max_decoder_steps)
                except httpx.HTTPError as exc:
                    with lock:
                        errors[type(exc).__name__] += 1
                    continue
                elapsed = time.perf_counter() - start
                with lock:
                    statuses[str(status)] += 1
                    if status == 200:
                        latencies.append(elapsed)
                        audio += seconds
                        if first is not None:
                            firsts.append(first)
                    elif status == 503 and "retry-after" in headers:
                        retry_after.append(int(headers["retry-after"]))

    threads = [threading.Thread(target=client_loop, name=f"load-{i}") for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    done = sum(statuses.values())
    return LoadReport(url=url, mode=mode, clients=clients, duration_s=wall, requests=done + sum(errors.values()),
                      ok=statuses.get("200", 0), throughput_rps=statuses.get("200", 0) / wall,
                      audio_seconds_per_second=audio / wall, latency_s=_percentiles(latencies),
                      first_chunk_s=_percentiles(firsts), status=dict(statuses),
                      retry_after=sorted(set(retry_after)), errors=dict(errors))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m voxport.benchmarks.load", description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=40, help="total requests over all clients")
    ap.add_argument("--duration", type=float, default=120.0, help="stop issuing after this many seconds")
    ap.add_argument("--mode", choices=MODES, default="clone")
    ap.add_argument("--text", default="Voice cloning on a small server.")
    ap.add_argument("--voice-id", default=None, help="a stored voice (else --reference is uploaded)")
    ap.add_argument("--reference", type=Path, default=None, help="reference speech to create the voice from")
    ap.add_argument("--max-decoder-steps", type=int, default=None)
    ap.add_argument("--timeout", type=float, default=120.0, help="per-request client timeout (s)")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON report here too")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would drown the report
    url = check_loopback(args.url)
    voice_id, embedding = args.voice_id, None
    if voice_id is None:
        if args.reference is None:
            ap.error("give --voice-id or --reference")
        voice_id = create_voice(url, args.reference)
        log.info("created voice %s from %s", voice_id, args.reference)
    if args.mode == "embedding":
        embedding = httpx.get(f"{url}/api/v1/voices/{voice_id}", timeout=args.timeout).json()["embedding"]
    server = describe_server(url)
    report = run_load(url, args.clients, args.requests, args.duration, args.mode, args.text, voice_id, embedding,
                      args.max_decoder_steps, args.timeout)
    report.server = server
    text = json.dumps(report.to_dict(), indent=2)
    sys.stdout.write(text + "\n")
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
