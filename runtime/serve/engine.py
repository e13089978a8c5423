"""Inference for the service: a bounded worker pool, admission control, timeouts, batching.

A request is admitted only while fewer than `workers + queue_size` are admitted; otherwise it
gets `Overloaded` (503 + Retry-After) at once, before any work. An admitted request holds its slot
until its worker has really finished, so the count is honest even after a timeout. Timeouts and
client disconnects set a flag the synthesizer checks before every decoder step and the vocoder
between chunks, so a worker stops within a chunk's time and frees its slot. Each request also has a
work budget (runtime/budget.py) over all its fragments and texts.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import statistics
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from voxport.errors import Cancelled, ClientGone, Overloaded, RequestTimeout, ShuttingDown
from voxport.runtime import streaming
from voxport.runtime.budget import WorkBudget
from voxport.runtime.cloner import VoiceCloner
from voxport.runtime.controls import apply_controls
from voxport.runtime.serve.batching import VocoderBatcher
from voxport.runtime.serve.settings import ServeSettings
from voxport.runtime.serve.telemetry import Telemetry

log = logging.getLogger(__name__)

T = TypeVar("T")
StopCheck = Callable[[], bool]
Disconnected = Callable[[], Awaitable[bool]]
POLL_S = 0.25  # how often a waiting request asks whether its client is still there


@dataclass(frozen=True)
class Controls:
    """Per-request synthesis settings, already validated by the API layer."""

    style_idx: int = 0
    seed: int = 0
    speaking_rate: float = 1.0
    pitch_semitones: float = 0.0
    stop_threshold: float | None = None  # stop-token probability; None: the bundle's (0.5)
    max_decoder_steps: int | None = None


class _Slot:
    def __init__(self, engine: Engine) -> None:
        self._engine, self._held = engine, True
        self._started: float | None = None

    def begin(self) -> None:
        """A worker picked the job up: from here on it is service time (queue wait excluded)."""
        self._started = time.perf_counter()

    def release(self) -> None:
        with self._engine._lock:
            if self._held:
                self._held = False
                self._engine._inflight -= 1
                self._engine.telemetry.queue_depth.set(self._engine._inflight)
                if self._started is not None:  # never ran (cancelled while queued): no service time
                    self._engine._service_times.append(time.perf_counter() - self._started)


class Engine:
    def __init__(self, cloner: VoiceCloner, settings: ServeSettings, telemetry: Telemetry) -> None:
        self.cloner, self.settings, self.telemetry = cloner, settings, telemetry
        self._pool = ThreadPoolExecutor(settings.workers, thread_name_prefix="voxport-infer")
        self._lock = threading.Lock()
        self._inflight = 0
        self._closed = False
        self._draining = False
        # Seconds a worker spent on each recent request, from pick-up to release: the queue wait is
        # not in it (retry_after adds the queue itself, so counting the wait here would count it twice).
        self._service_times: deque[float] = deque(maxlen=32)

        def on_batch(size: int, seconds: float) -> None:
            telemetry.vocoder_batch.observe(size)
            telemetry.vocoder_queue.set(self.batcher.depth)

        # One vocoder lane per worker: two requests vocode on two cores at once.
        self.batcher = VocoderBatcher(cloner.vocode_batch, settings.vocoder_max_batch,
                                      settings.vocoder_window_ms / 1000.0, lanes=settings.workers, on_batch=on_batch)

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def alive(self) -> bool:
        """Whether work can run: the pool is open and the vocoder thread is up (/ready)."""
        return not self._closed and self.batcher.alive

    def _submit(self, job: Callable[[], Any]) -> Any:
        # In a copy of the request's context: log lines from the worker carry the request id.
        return self._pool.submit(contextvars.copy_context().run, job)

    def _admit(self) -> _Slot:
        with self._lock:
            if self._draining:
                raise ShuttingDown("the server is shutting down; retry on another instance or later",
                                   self.retry_after())
            if self._inflight >= self.settings.capacity:
                self.telemetry.rejected.inc()
                raise Overloaded(f"server at capacity ({self.settings.capacity} requests admitted); retry later",
                                 self.retry_after())
            self._inflight += 1
            self.telemetry.queue_depth.set(self._inflight)
        return _Slot(self)

    def retry_after(self) -> int:
        """Seconds until the admitted work is likely done: (running + queued) x recent median service
        time / workers, in 1..120 (1 s per request before any has finished)."""
        median = statistics.median(self._service_times) if self._service_times else 1.0
        return max(1, min(120, math.ceil(self._inflight * median / self.settings.workers)))

    def stop_admitting(self) -> None:
        """From now on every new request gets ShuttingDown (503); admitted work goes on."""
        self._draining = True

    @property
    def draining(self) -> bool:
        return self._draining

    async def drain(self, timeout_s: float) -> bool:
        """Stop admitting and wait up to `timeout_s` for the admitted work to finish; True if it did."""
        self.stop_admitting()
        deadline = time.monotonic() + timeout_s
        while self._inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self._inflight == 0

    def _stopper(self) -> tuple[threading.Event, StopCheck]:
        cancel = threading.Event()
        deadline = time.monotonic() + self.settings.request_timeout_s
        return cancel, lambda: cancel.is_set() or time.monotonic() > deadline

    async def run(self, fn: Callable[[StopCheck], T], disconnected: Disconnected | None = None) -> T:
        """Run `fn(should_stop)` on the pool within the request timeout. `disconnected` (the request's
        `is_disconnected`) is polled while waiting: a client gone stops the work (`ClientGone`)."""
        slot = self._admit()
        cancel, should_stop = self._stopper()

        def job() -> T:
            slot.begin()
            try:
                return fn(should_stop)
            finally:
                slot.release()

        future = self._submit(job)
        future.add_done_callback(lambda _: slot.release())  # also when cancelled before it ran
        waited = asyncio.wrap_future(future)
        try:
            result = await self._wait(waited, disconnected)
        except (asyncio.TimeoutError, Cancelled) as exc:
            cancel.set()
            waited.cancel()  # frees the slot at once if the job has not started
            if isinstance(exc, ClientGone):
                raise
            raise RequestTimeout(f"the request took longer than {self.settings.request_timeout_s:g} s") from None
        except BaseException:
            cancel.set()
            waited.cancel()
            raise
        return result

    async def _wait(self, waited: asyncio.Future[T], disconnected: Disconnected | None) -> T:
        """The job's result; TimeoutError past the request timeout, ClientGone once the client left
        (uvicorn does not cancel a handler whose client disconnects, so it has to be asked)."""
        deadline = time.monotonic() + self.settings.request_timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise asyncio.TimeoutError
            done, _ = await asyncio.wait({waited}, timeout=min(POLL_S, remaining))
            if done:
                return waited.result()
            if disconnected is not None and await disconnected():
                raise ClientGone("the client disconnected; its work was stopped")

    async def open_stream(self, fn: Callable[[StopCheck], Iterator[bytes]]) -> AsyncIterator[bytes]:
        """Start `fn(should_stop)` (a generator) on the pool; returns once its first item exists.

        Errors before the first item raise here (so they become a 4xx status); later ones abort
        the response. Closing the returned iterator (client gone) stops the worker.
        """
        slot = self._admit()
        cancel, should_stop = self._stopper()
        loop = asyncio.get_running_loop()
        items: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def post(kind: str, value: Any) -> None:
            loop.call_soon_threadsafe(items.put_nowait, (kind, value))

        def job() -> None:
            slot.begin()
            try:
                for chunk in fn(should_stop):
                    post("data", chunk)
                outcome: tuple[str, Any] = ("end", None)
            except BaseException as exc:  # handed to the response side, which raises it
                outcome = ("error", exc)
            finally:
                slot.release()  # before "end", so a client's next request finds the slot free
            post(*outcome)

        future = self._submit(job)
        future.add_done_callback(lambda _: slot.release())
        try:
            kind, first = await asyncio.wait_for(items.get(), self.settings.request_timeout_s)
        except asyncio.TimeoutError:
            cancel.set()
            raise RequestTimeout(f"no audio within the request timeout of {self.settings.request_timeout_s:g} s") \
                from None
        except BaseException:
            cancel.set()
            raise
        if kind == "error":
            if isinstance(first, Cancelled):
                raise RequestTimeout("the stream was cancelled (request timeout)")
            raise first

        async def rest() -> AsyncIterator[bytes]:
            try:
                if kind == "data":
                    yield first
                    while True:
                        next_kind, value = await items.get()
                        if next_kind == "data":
                            yield value
                        elif next_kind == "error":
                            # Headers are sent: the failure can only abort the response, which a
                            # client sees as an incomplete chunked body, never as a short success.
                            self.telemetry.errors.labels("stream_aborted").inc()
                            raise value
                        else:
                            break
            finally:
                cancel.set()

        return rest()

    # ------------------------------------------------------------------ pipeline steps (workers)

    def embed(self, wav: np.ndarray, sample_rate: int) -> np.ndarray:
        with self.telemetry.stage("embed"):
            return self.cloner.embed(wav, sample_rate)

    def budget(self, c: Controls) -> WorkBudget:
        """A fresh work budget for one request (its limits from `serve.limits`)."""
        limits, cfg = self.settings.limits, self.cloner.mel_cfg
        return WorkBudget(limits.max_request_decoder_steps, limits.max_request_audio_seconds,
                          self.cloner.synth_cfg.r, cfg.hop_length / cfg.sample_rate, c.speaking_rate)

    def mel(self, text: str, embedding: np.ndarray, c: Controls, should_stop: StopCheck) -> np.ndarray:
        """`should_stop` is called before every decoder step (pass a budget's guard to charge them)."""
        with self.telemetry.stage("synthesize"):
            mel = self.cloner.synthesize(text, embedding, style_idx=c.style_idx, seed=c.seed,
                                         max_decoder_steps=c.max_decoder_steps, min_stop_token=c.stop_threshold,
                                         should_stop=should_stop)
        with self.telemetry.stage("controls"):
            return apply_controls(mel, c.speaking_rate, c.pitch_semitones, self.cloner.mel_cfg)

    def vocode_chunked(self, mel: np.ndarray, should_stop: StopCheck) -> np.ndarray:
        """One whole mel -> waveform, vocoded in chunks of `vocoder_chunk_frames` with the streaming
        path's context trim (runtime/streaming.py). Each chunk is a separate batcher item, so memory per
        call is bounded, the work can stop between chunks, and other requests' chunks interleave with
        these instead of waiting for (or being padded to) the whole utterance."""
        scfg = streaming.StreamConfig(chunk_frames=self.settings.vocoder_chunk_frames,
                                      vocoder_context=self.settings.stream.vocoder_context)

        def vocode(piece: np.ndarray) -> np.ndarray:
            if should_stop():
                raise Cancelled("vocoding cancelled")
            return self.batcher.vocode(piece, timeout=self.settings.request_timeout_s)

        with self.telemetry.stage("vocode"):
            pieces = list(streaming.vocoded_chunks([mel], vocode, self.cloner.mel_cfg.hop_length, scfg))
        return np.concatenate(pieces) if pieces else np.zeros(0, np.float32)

    def synthesize(self, texts: list[str], embedding: np.ndarray, c: Controls,
                   should_stop: StopCheck) -> list[np.ndarray]:
        """Texts for one voice -> waveforms (synthesized in turn under one budget, vocoded in chunks)."""
        budget = self.budget(c)
        mels = [self.mel(text, embedding, c, budget.guard(should_stop)) for text in texts]
        if should_stop():
            raise Cancelled("synthesis cancelled")
        return [self.vocode_chunked(mel, should_stop) for mel in mels]

    def stream(self, text: str, embedding: np.ndarray, c: Controls, should_stop: StopCheck) -> Iterator[np.ndarray]:
        def vocode(mel: np.ndarray) -> np.ndarray:
            with self.telemetry.stage("vocode_chunk"):
                return self.batcher.vocode(mel, timeout=self.settings.request_timeout_s)

        return self.cloner.stream(text, embedding, style_idx=c.style_idx, seed=c.seed,
                                  max_decoder_steps=c.max_decoder_steps, min_stop_token=c.stop_threshold,
                                  rate=c.speaking_rate, pitch_semitones=c.pitch_semitones, vocode=vocode,
                                  stream_cfg=self.settings.stream, should_stop=self.budget(c).guard(should_stop))

    def close(self) -> None:
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.batcher.close()
