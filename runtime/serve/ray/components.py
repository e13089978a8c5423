"""One Ray Serve deployment per component: speaker encoder, synthesizer, vocoder.

Each replica selects its artifacts with the unified runtime for the node it runs on (host probe +
runtime/select.py through `VoiceCloner(graphs=...)`: a GPU node picks a matching TensorRT engine, a
CPU node the fastest gate-passing CPU artifact), after checking that the bundle is visible on this
node and that every artifact that could serve its graphs has the sha256 its record names (a
mismatch fails the replica, and so the deployment, loudly, instead of falling back). It registers
what it serves (node, artifact, sha256, backend) with the registry actor for /health.

The encoder and the vocoder batch with `@serve.batch` (sizes and waits from `serve.ray.*`): the
encoder runs the partial-utterance mels of several requests in one call, the vocoder several
requests' mel chunks (padded to the longest, as the local batcher does). The synthesizer streams
progress: every `progress_steps` decoder steps it yields a tick, so the caller charges its work
budget and checks its stop flag; a caller that stops cancels the call, and the replica's decoder
loop sees the cancellation before its next step (runtime/serve/ray/proxy.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray import serve
from ray.serve.exceptions import RayServeException

from voxport.errors import BackendUnavailable, ConfigError
from voxport.models import speaker_frontend as se
from voxport.pipeline.records import ENGINES, read_bundle
from voxport.runtime.backends.base import verified_artifact
from voxport.runtime.cloner import VoiceCloner, reference_partials
from voxport.runtime.host import detect
from voxport.runtime.select import ranked
from voxport.runtime.streaming import StreamConfig

log = logging.getLogger(__name__)

COMPONENT_GRAPHS = {
    "speaker_encoder": (("speaker_encoder", "speaker_encoder"),),
    "synthesizer": (("synthesizer", "encoder"), ("synthesizer", "decoder_step"), ("synthesizer", "postnet")),
    "vocoder": (("vocoder", "vocoder"),),
}


def verify_candidates(bundle_dir: Path, graphs: Sequence[tuple[str, str]], preference: Sequence[str],
                      strict: bool) -> list[str]:
    """sha256 of every artifact that may serve `graphs` on this host, against its record; the files
    checked. BackendUnavailable (naming the file) on a mismatch or a missing file."""
    records, host = read_bundle(bundle_dir), detect()
    checked = []
    for component, graph in graphs:
        for choice in ranked(records, component, graph, host, preference, strict=strict):
            if choice.record.file not in checked:
                verified_artifact(choice.record, bundle_dir)
                checked.append(choice.record.file)
    return checked


def _where() -> dict[str, Any]:
    """This process: node, pid and (inside a replica) the Serve replica and its actor name."""
    where: dict[str, Any] = {"node_id": None, "node_ip": None, "hostname": socket.gethostname(), "pid": os.getpid(),
                             "replica": None, "actor_name": None}
    try:
        where["replica"] = serve.get_replica_context().replica_id.unique_id
    except RayServeException:  # not in a replica (Serve's local testing mode has none)
        pass
    if ray.is_initialized():  # local testing mode runs without Ray: nothing more to say
        ctx = ray.get_runtime_context()
        where.update(node_id=ctx.get_node_id(), node_ip=ray.util.get_node_ip_address(),
                     actor_name=ctx.get_actor_name())
    return where


class Component:
    """What every component replica does at start: check, load its graphs, report."""

    component: str = ""

    def __init__(self, bundle_dir: str, preference: Sequence[str], strict: bool, threads: int,
                 registry: str | None = None, namespace: str | None = None, cpu_arena: str | None = None) -> None:
        bundle = Path(bundle_dir)
        where = _where()
        if not (bundle / "manifest.json").is_file():
            raise ConfigError(f"{self.component} replica on {where['node_ip'] or where['hostname']}: the bundle "
                              f"{bundle} is not visible on this node (serve.bundle_dir must be on every node)")
        graphs = COMPONENT_GRAPHS[self.component]
        checked = verify_candidates(bundle, graphs, preference, strict)
        self.cloner = VoiceCloner(bundle, preference=preference, strict=strict, threads=threads, graphs=graphs,
                                  cpu_arena=cpu_arena)
        self._batches: deque[int] = deque(maxlen=256)
        self.report = {**where, "component": self.component, "verified_sha256": checked, "graphs": {
            key: {**served.as_dict(), "backend": ENGINES.get(served.format, served.format)}
            for key, served in self.cloner.served.items()}}
        log.info("%s replica on node %s (%s): %s", self.component, where["node_ip"], where["replica"],
                 {k: v["file"] for k, v in self.report["graphs"].items()})
        if registry and ray.is_initialized():
            actor = ray.get_actor(registry, namespace=namespace)
            ray.get(actor.register.remote(self.report))

    def describe(self) -> dict[str, Any]:
        """Where this replica runs and which artifact serves each of its graphs (sha256, backend, why)."""
        return self.report

    def batch_sizes(self) -> list[int]:
        """Sizes of this replica's recent `@serve.batch` calls (batched components; empty otherwise)."""
        return list(self._batches)

    def check_health(self) -> None:  # Serve's periodic health check: the sessions are still open
        if not self.cloner.served:
            raise BackendUnavailable(f"{self.component} replica has no open artifact")

    def __del__(self) -> None:
        cloner = getattr(self, "cloner", None)
        if cloner is not None:
            cloner.close()


class SpeakerEncoder(Component):
    component = "speaker_encoder"

    def __init__(self, *args: Any, max_batch_size: int = 8, batch_wait_timeout_s: float = 0.01, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.embed_batch.set_max_batch_size(max_batch_size)
        self.embed_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def embed(self, wav: np.ndarray, sample_rate: int) -> np.ndarray:
        """Reference speech -> unit embedding, as `VoiceCloner.embed` (front end here, graph batched)."""
        # AudioError: too little voiced speech
        mels = await asyncio.to_thread(reference_partials, wav, sample_rate, self.cloner.encoder_cfg)
        partials = await self.embed_batch(mels)
        return se.mean_embedding(partials)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def embed_batch(self, items: list[np.ndarray]) -> list[np.ndarray]:
        """Several requests' partial mels (n_i, frames, n_mels) in one encoder call; each gets its rows."""
        self._batches.append(len(items))
        out = await asyncio.to_thread(self.cloner.embed_partials, np.concatenate(items))
        bounds = np.cumsum([0] + [len(m) for m in items])
        return [out[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


class Vocoder(Component):
    component = "vocoder"

    def __init__(self, *args: Any, max_batch_size: int = 8, batch_wait_timeout_s: float = 0.01, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.vocode.set_max_batch_size(max_batch_size)
        self.vocode.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def vocode(self, mels: list[np.ndarray]) -> list[np.ndarray]:
        """Mel chunks (n_mels, T_i) of any requests -> their waveforms (hop·T_i samples each). One vocoder
        call per length: never padded, so every output equals the chunk vocoded alone (as the local
        batcher, runtime/serve/batching.py); whole utterances arrive as equal-length chunks."""
        self._batches.append(len(mels))
        return await asyncio.to_thread(self._by_length, mels)

    def _by_length(self, mels: list[np.ndarray]) -> list[np.ndarray]:
        out: list[np.ndarray | None] = [None] * len(mels)
        groups: dict[int, list[int]] = {}
        for i, mel in enumerate(mels):
            groups.setdefault(mel.shape[1], []).append(i)
        for indices in groups.values():
            for i, wav in zip(indices, self.cloner.vocode_batch([mels[i] for i in indices]), strict=True):
                out[i] = wav
        return out  # type: ignore[return-value]


Emit = Callable[[str, Any], None]


async def _threaded(work: Callable[[Emit, Callable[[], bool]], None]) -> AsyncIterator[tuple[str, Any]]:
    """Run blocking `work(emit, stopped)` on a thread and yield what it emits. When the consumer stops
    (the caller cancelled the request, or its replica died), `stopped()` turns true: the decoder loop
    checks it before every step and ends with Cancelled."""
    loop = asyncio.get_running_loop()
    items: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    stop = threading.Event()

    def emit(kind: str, value: Any) -> None:
        loop.call_soon_threadsafe(items.put_nowait, (kind, value))

    def run() -> None:
        try:
            work(emit, stop.is_set)
            emit("end", None)
        except BaseException as exc:  # noqa: BLE001 - handed to the async side, which raises it
            emit("error", exc)

    task = loop.run_in_executor(None, run)
    try:
        while True:
            kind, value = await items.get()
            if kind == "end":
                break
            if kind == "error":
                raise value
            yield kind, value
    finally:
        stop.set()
        if not task.done():
            log.info("synthesizer call cancelled by its caller; the decoder loop stops before its next step")


class Synthesizer(Component):
    component = "synthesizer"

    def __init__(self, *args: Any, progress_steps: int = 8, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.progress_steps = progress_steps

    def _counter(self, emit: Emit, stopped: Callable[[], bool]) -> tuple[Callable[[], bool], Callable[[], None]]:
        """A should_stop that reports every `progress_steps` steps, and a flush of the remainder."""
        count = [0]

        def check() -> bool:
            if stopped():
                return True
            count[0] += 1
            if count[0] == self.progress_steps:
                emit("steps", count[0])
                count[0] = 0
            return False

        def flush() -> None:
            if count[0]:
                emit("steps", count[0])
                count[0] = 0

        return check, flush

    async def synthesize(self, text: str, embedding: np.ndarray, options: dict[str, Any]) -> AsyncIterator[tuple]:
        """("steps", n) ticks while the decoder runs, then ("mel", (n_mels, T)): `VoiceCloner.synthesize`."""

        def work(emit: Emit, stopped: Callable[[], bool]) -> None:
            check, flush = self._counter(emit, stopped)
            mel = self.cloner.synthesize(text, embedding, should_stop=check, **options)
            flush()
            emit("mel", mel)

        async for item in _threaded(work):
            yield item

    async def stream_mels(self, text: str, embedding: np.ndarray, options: dict[str, Any],
                          stream_cfg: StreamConfig) -> AsyncIterator[tuple]:
        """("steps", n) ticks and ("mel", window) items: `VoiceCloner.stream_mels`, for the caller to vocode."""

        def work(emit: Emit, stopped: Callable[[], bool]) -> None:
            check, flush = self._counter(emit, stopped)
            mels: Iterator[np.ndarray] = self.cloner.stream_mels(text, embedding, stream_cfg=stream_cfg,
                                                                 should_stop=check, **options)
            for mel in mels:
                flush()
                emit("mel", mel)
            flush()

        async for item in _threaded(work):
            yield item
