"""Dynamic batching for the vocoder: concurrent requests share vocoder calls, fairly.

`lanes` threads run vocoder calls (one per inference worker by default, so two requests on two
cores vocode at once). A lane takes the oldest waiting mel, then waits up to `window_s` for more
of the SAME length (at most `max_batch`) and runs them as one batch (`VoiceCloner.vocode_batch`).
Nothing is ever padded: a short item is not made as slow as a long one, and every output equals
the item vocoded alone. Whole utterances arrive here as fixed-size chunks (runtime/serve/engine.py
`vocode_chunked`), so concurrent requests' chunks batch together, and a short request waits for at
most one chunk of a long one instead of the whole long utterance.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future

import numpy as np

from voxport.errors import VoxportError

log = logging.getLogger(__name__)

BatchFn = Callable[[Sequence[np.ndarray]], list[np.ndarray]]
Item = tuple[np.ndarray, Future]


class VocoderBatcher:
    def __init__(self, vocode_batch: BatchFn, max_batch: int = 8, window_s: float = 0.01, lanes: int = 1,
                 on_batch: Callable[[int, float], None] | None = None) -> None:
        self._vocode_batch = vocode_batch
        self._max_batch = max(1, int(max_batch))
        self._window_s = max(0.0, float(window_s))
        self._on_batch = on_batch
        self._pending: deque[Item] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._threads = [threading.Thread(target=self._run, name=f"voxport-vocoder-{i}", daemon=True)
                         for i in range(max(1, int(lanes)))]
        for thread in self._threads:
            thread.start()

    @property
    def alive(self) -> bool:
        return not self._closed and all(t.is_alive() for t in self._threads)

    @property
    def depth(self) -> int:
        return len(self._pending)

    def submit(self, mel: np.ndarray) -> Future[np.ndarray]:
        """Queue one (n_mels, T) mel; the future holds its waveform once its batch has run."""
        future: Future[np.ndarray] = Future()
        with self._cond:
            if self._closed:
                raise VoxportError("the vocoder batcher is closed")
            self._pending.append((np.asarray(mel, dtype=np.float32), future))
            self._cond.notify()
        return future

    def vocode(self, mel: np.ndarray, timeout: float | None = None) -> np.ndarray:
        """Vocode one mel; blocks until its batch has run."""
        return self.submit(mel).result(timeout=timeout)

    def _take_same_length(self, batch: list[Item]) -> None:
        frames = batch[0][0].shape[-1]
        for item in [it for it in self._pending if it[0].shape[-1] == frames][: self._max_batch - len(batch)]:
            self._pending.remove(item)
            batch.append(item)

    def _next_batch(self) -> list[Item] | None:
        """The oldest waiting item and its same-length company; None once closed and drained."""
        with self._cond:
            while not self._pending:
                if self._closed:
                    return None
                self._cond.wait()
            batch = [self._pending.popleft()]
            deadline = time.monotonic() + self._window_s
            while True:
                self._take_same_length(batch)
                remaining = deadline - time.monotonic()
                if len(batch) >= self._max_batch or remaining <= 0 or self._closed:
                    return batch
                self._cond.wait(remaining)  # other lanes keep taking other lengths meanwhile

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            live = [(mel, fut) for mel, fut in batch if fut.set_running_or_notify_cancel()]
            if not live:
                continue
            start = time.perf_counter()
            try:
                outputs = self._vocode_batch([mel for mel, _ in live])
            except BaseException as exc:  # every waiter gets the failure, the lane lives on
                log.exception("vocoder batch of %d failed", len(live))
                for _, fut in live:
                    fut.set_exception(exc)
            else:
                for (_, fut), wav in zip(live, outputs, strict=True):
                    fut.set_result(wav)
            if self._on_batch is not None:
                self._on_batch(len(live), time.perf_counter() - start)

    def close(self) -> None:
        """Stop admitting; what is queued still runs, then the lanes exit."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=30)
