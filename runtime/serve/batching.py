"""Dynamic batching for the vocoder: concurrent requests share one vocoder call.

One thread owns the vocoder. It takes the first waiting mel, then waits up to `window_s` for
more (at most `max_batch`), pads them to the longest with the silence floor and runs them as one
batch (`VoiceCloner.vocode_batch`), cutting each output back to hop·T_i samples. Callers block
on a future. Items of equal length (concurrent stream chunks, the same text twice) come out
exactly as alone; a shorter item padded in a batch differs only in its last ~12 frames' samples.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future

import numpy as np

from voxport.errors import VoxportError

log = logging.getLogger(__name__)

BatchFn = Callable[[Sequence[np.ndarray]], list[np.ndarray]]


class VocoderBatcher:
    def __init__(self, vocode_batch: BatchFn, max_batch: int = 8, window_s: float = 0.01,
                 on_batch: Callable[[int, float], None] | None = None) -> None:
        self._vocode_batch = vocode_batch
        self._max_batch = max(1, int(max_batch))
        self._window_s = max(0.0, float(window_s))
        self._on_batch = on_batch
        self._queue: queue.Queue[tuple[np.ndarray, Future[np.ndarray]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="voxport-vocoder", daemon=True)
        self._closed = False
        self._thread.start()

    @property
    def alive(self) -> bool:
        return not self._closed and self._thread.is_alive()

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def submit(self, mel: np.ndarray) -> Future[np.ndarray]:
        """Queue one (n_mels, T) mel; the future holds its waveform once its batch has run."""
        if self._closed:
            raise VoxportError("the vocoder batcher is closed")
        future: Future[np.ndarray] = Future()
        self._queue.put((np.asarray(mel, dtype=np.float32), future))
        return future

    def vocode(self, mel: np.ndarray, timeout: float | None = None) -> np.ndarray:
        """Vocode one mel; blocks until its batch has run."""
        return self.submit(mel).result(timeout=timeout)

    def _collect(self, first: tuple[np.ndarray, Future[np.ndarray]]) -> tuple[list, bool]:
        batch, stop = [first], False
        deadline = time.monotonic() + self._window_s
        while len(batch) < self._max_batch:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                stop = True
                break
            batch.append(item)
        return batch, stop

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, stop = self._collect(first)
            live = [(mel, fut) for mel, fut in batch if fut.set_running_or_notify_cancel()]
            if live:
                start = time.perf_counter()
                try:
                    outputs = self._vocode_batch([mel for mel, _ in live])
                except BaseException as exc:  # every waiter gets the failure, the thread lives on
                    log.exception("vocoder batch of %d failed", len(live))
                    for _, fut in live:
                        fut.set_exception(exc)
                else:
                    for (_, fut), wav in zip(live, outputs, strict=True):
                        fut.set_result(wav)
                if self._on_batch is not None:
                    self._on_batch(len(live), time.perf_counter() - start)
            if stop:
                return

    def close(self) -> None:
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=30)
