"""A VoiceCloner-shaped proxy over the component deployments: what the ingress's Engine and Service
call (embed, synthesize, stream, vocode_batch, the configs, `served`), answered by Ray Serve handles.

Cancellation: the synthesizer deployment streams a progress tick every `progress_steps` decoder
steps (runtime/serve/ray/components.py). For each step reported the proxy calls the engine's
`should_stop` (which also charges the request's work budget), so a timeout, a client gone or a
budget exceeded is seen within `progress_steps` steps; the proxy then cancels the Serve call, and
the replica's decoder loop stops before its next step. Failures of Ray itself (a replica or its
node lost, no replica reachable) become ReplicaUnavailable (503 + Retry-After); errors the
component raised on purpose (AudioError, ConfigError, ...) reach the API layer unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from ray.exceptions import GetTimeoutError, RayError, RayTaskError, TaskCancelledError

from voxport.errors import Cancelled, ReplicaUnavailable, RequestTimeout, VoxportError
from voxport.pipeline.records import read_bundle
from voxport.runtime import streaming
from voxport.runtime.cloner import Served, stack_configs

log = logging.getLogger(__name__)

T = TypeVar("T")
RETRY_AFTER_S = 2  # a lost replica is replaced (or routed around) within seconds


def unwrap(call: Callable[[], T], what: str) -> T:
    """`call()`, with Ray's failures turned into voxport's: the component's own VoxportError as raised,
    Ray losing the replica (or none being reachable) as ReplicaUnavailable, waits past the timeout as
    RequestTimeout. Anything else a replica raised stays an internal error (500, logged)."""
    try:
        return call()
    except VoxportError:
        raise
    except RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, VoxportError):
            raise cause from None
        if isinstance(cause, RayError):  # a Ray failure seen inside a replica (e.g. the library actor's node)
            raise ReplicaUnavailable(f"{what}: {type(cause).__name__}; retry", RETRY_AFTER_S) from None
        raise
    except (GetTimeoutError, FutureTimeout, TimeoutError):
        raise RequestTimeout(f"{what} did not answer in time") from None
    except TaskCancelledError:
        raise Cancelled(f"{what}: call cancelled") from None
    except RayError as exc:  # ActorDiedError, ActorUnavailableError, NodeDiedError, Serve's own errors ...
        log.warning("%s unavailable: %s: %s", what, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        raise ReplicaUnavailable(f"{what} is unavailable ({type(exc).__name__}: a replica or its node was lost); "
                                 "retry", RETRY_AFTER_S) from None
    except Exception as exc:  # Serve's RayServeException family does not derive from RayError
        if type(exc).__module__.startswith("ray.serve"):
            raise ReplicaUnavailable(f"{what} is unavailable ({type(exc).__name__}); retry", RETRY_AFTER_S) from None
        raise


class RemoteCloner:
    """`VoiceCloner`'s serving interface over deployment handles.

    `reports`: one `describe()` per component (where a replica runs, what serves each graph); the
    configs come from the bundle's records, which every node sees.
    """

    def __init__(self, bundle_dir: str | Path, handles: dict[str, Any], reports: dict[str, dict[str, Any]],
                 timeout_s: float) -> None:
        self.bundle_dir = Path(bundle_dir)
        self._handles, self.timeout_s = handles, timeout_s
        self.encoder_cfg, self.synth_cfg, self.mel_cfg, self.weights = stack_configs(read_bundle(self.bundle_dir))
        self.served: dict[str, Served] = {}
        for report in reports.values():
            for key, graph in report["graphs"].items():
                self.served[key] = Served(**{k: v for k, v in graph.items() if k != "backend"} | {
                    "providers": tuple(graph["providers"])})

    @property
    def sample_rate(self) -> int:
        return self.mel_cfg.sample_rate

    def _result(self, response: Any, what: str) -> Any:
        return unwrap(lambda: response.result(timeout_s=self.timeout_s), what)

    def embed(self, wav: np.ndarray, sample_rate: int) -> np.ndarray:
        wav = np.asarray(wav, dtype=np.float32)
        return self._result(self._handles["speaker_encoder"].embed.remote(wav, int(sample_rate)), "speaker encoder")

    def _ticks(self, generator: Any, should_stop: Callable[[], bool] | None, what: str) -> Iterator[np.ndarray]:
        """The mels a synthesizer stream yields; `should_stop` called once per decoder step it reports.
        Stopping (or any failure) cancels the Serve call, so the replica stops too."""
        done = False
        try:
            items = iter(generator)
            while True:
                item = unwrap(lambda: next(items, None), what)
                if item is None:
                    done = True
                    return
                kind, value = item
                if kind == "steps":
                    for _ in range(value if should_stop is not None else 0):
                        if should_stop():
                            raise Cancelled("synthesis cancelled")
                else:
                    yield value
        finally:
            if not done:
                generator.cancel()

    def synthesize(self, text: str, embedding: np.ndarray, style_idx: int = 0, seed: int = 0,
                   max_decoder_steps: int | None = None, min_stop_token: float | None = None,
                   should_stop: Callable[[], bool] | None = None) -> np.ndarray:
        """Text + embedding -> mel (n_mels, T); the decoder loop runs inside one synthesizer replica."""
        options = {"style_idx": style_idx, "seed": seed, "max_decoder_steps": max_decoder_steps,
                   "min_stop_token": min_stop_token}
        handle = self._handles["synthesizer"].options(stream=True)
        generator = handle.synthesize.remote(text, np.asarray(embedding, np.float32), options)
        mels = list(self._ticks(generator, should_stop, "synthesizer"))
        if len(mels) != 1:
            raise ReplicaUnavailable("synthesizer stream ended without its mel; retry", RETRY_AFTER_S)
        return mels[0]

    def stream(self, text: str, embedding: np.ndarray, style_idx: int = 0, seed: int = 0,
               max_decoder_steps: int | None = None, min_stop_token: float | None = None,
               rate: float = 1.0, pitch_semitones: float = 0.0,
               vocode: Callable[[np.ndarray], np.ndarray] | None = None,
               stream_cfg: streaming.StreamConfig | None = None,
               should_stop: Callable[[], bool] | None = None) -> Iterator[np.ndarray]:
        """Waveform chunks: mel windows streamed from a synthesizer replica, vocoded here through `vocode`
        (the engine's batcher, i.e. the vocoder deployment) with the same context trim as `VoiceCloner.stream`."""
        scfg = stream_cfg or streaming.StreamConfig()
        options = {"style_idx": style_idx, "seed": seed, "max_decoder_steps": max_decoder_steps,
                   "min_stop_token": min_stop_token, "rate": rate, "pitch_semitones": pitch_semitones}
        handle = self._handles["synthesizer"].options(stream=True)
        generator = handle.stream_mels.remote(text, np.asarray(embedding, np.float32), options, scfg)
        mels = self._ticks(generator, should_stop, "synthesizer")
        yield from streaming.vocoded_chunks(mels, vocode or self.vocode, self.mel_cfg.hop_length, scfg)

    def vocode(self, mel: np.ndarray) -> np.ndarray:
        return self.vocode_batch([mel])[0]

    def vocode_batch(self, mels: Sequence[np.ndarray]) -> list[np.ndarray]:
        """One Serve request per mel: the vocoder replicas' `@serve.batch` groups them with other
        requests' chunks (from every ingress replica), and the router spreads them over the replicas."""
        handle = self._handles["vocoder"]
        responses = [handle.vocode.remote(np.asarray(m, np.float32)) for m in mels]
        return [self._result(r, "vocoder") for r in responses]

    def close(self) -> None:
        """Nothing to release here: the deployments own the sessions."""
