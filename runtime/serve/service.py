"""The service's state and the request-level checks shared by the routes.

A voice is always the one asked for: an uploaded reference, a stored `voice_id` or a client's
embedding. Asking for none is an error, an unknown id is 404; there is no default voice.
"""

from __future__ import annotations

import itertools
import logging
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from voxport.errors import RequestError, UploadError
from voxport.models import text as text_frontend
from voxport.pipeline.records import ENGINES
from voxport.runtime import streaming
from voxport.runtime.budget import WorkBudget
from voxport.runtime.cloner import VoiceCloner
from voxport.runtime.controls import mel_floor
from voxport.runtime.serve.engine import Controls, Engine, StopCheck
from voxport.runtime.serve.library import VoiceLibrary, check_voice_id, embedding_sha256
from voxport.runtime.serve.schemas import SynthesisControls
from voxport.runtime.serve.settings import ServeSettings
from voxport.runtime.serve.telemetry import Telemetry
from voxport.runtime.serve.uploads import read_reference

log = logging.getLogger(__name__)

SEEDED_NOTE = "{} weights are seeded (untrained): the output is not speech"


WARM_UP_TEXT = "Warming up."


@dataclass(frozen=True)
class VoiceSource:
    """Where a request's voice comes from: exactly one of reference bytes, a voice id, an embedding."""

    label: str  # "voice:<id>", "upload" or "embedding"
    voice_id: str | None = None
    reference: bytes | None = None
    embedding: np.ndarray | None = None


def wav_stream_header(sample_rate: int) -> bytes:
    """A 16-bit mono WAV header for a stream of unknown length (RIFF and data sizes 0xFFFFFFFF)."""
    unknown = 0xFFFFFFFF
    return (b"RIFF" + struct.pack("<I", unknown) + b"WAVE" + b"fmt "
            + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
            + b"data" + struct.pack("<I", unknown))


def pcm16(wav: np.ndarray) -> bytes:
    return (np.round(np.clip(wav, -1.0, 1.0) * 32767.0)).astype("<i2").tobytes()


class Service:
    def __init__(self, settings: ServeSettings, cloner: VoiceCloner | None = None, library: Any = None) -> None:
        """`cloner`, `library`: given (tests, or the Ray engine's proxies: runtime/serve/ray/), else opened here."""
        self.settings = settings
        self._owns_cloner = cloner is None  # a cloner passed in (tests, embedding) is the caller's to close
        self.cloner = cloner or VoiceCloner(settings.bundle_dir, preference=settings.target.preference,
                                            strict=settings.target.strict, threads=settings.threads,
                                            cpu_arena=settings.cpu_arena)
        self.telemetry = Telemetry()
        self.engine = Engine(self.cloner, settings, self.telemetry)
        self.library = library if library is not None else VoiceLibrary(
            settings.voices_dir, settings.limits.max_voices, settings.limits.max_library_bytes)
        self.sample_rate = self.cloner.sample_rate
        self.encoder_rate = self.cloner.encoder_cfg.sample_rate
        self.embedding_dim = self.cloner.synth_cfg.speaker_embedding_dim
        self.weights = dict(self.cloner.weights)
        self.warnings = [SEEDED_NOTE.format(c) for c, w in sorted(self.weights.items()) if w == "seeded"]
        self.encoder_sha = self.cloner.served["speaker_encoder/speaker_encoder"].sha256
        self.default_steps = settings.default_max_decoder_steps or self.cloner.synth_cfg.max_decoder_steps
        for warning in self.warnings:
            log.warning("%s", warning)
        if self._owns_cloner and settings.warm_up:  # a cloner passed in is warmed (or not) by its owner
            self.warm_up()

    def warm_up(self) -> list[int]:
        """Run once each vocoder input length a request starts with, before the first request: a
        short stream on a neutral voice (its first chunks, as `serve.stream` cuts them) and one
        whole-utterance mel through the same chunking as `vocode_chunked`. Engines prepare per-shape
        work on a shape's first call (OpenVINO about 70 ms more for the vocoder on 2 cores), which
        would otherwise land on the first listener. No telemetry, nothing stored. Returns the mel
        lengths the vocoder ran."""
        start, seen = time.perf_counter(), []
        cloner, scfg = self.cloner, self.settings.stream

        def vocode(mel: np.ndarray) -> np.ndarray:
            seen.append(int(mel.shape[1]))
            return cloner.vocode_batch([mel])[0]

        dim = self.embedding_dim
        voice = np.full(dim, 1.0 / np.sqrt(dim), np.float32)
        frames = (scfg.first_chunk_frames or scfg.chunk_frames) + scfg.chunk_frames + scfg.postnet_lookahead \
            + scfg.vocoder_context + 1
        # min_stop_token 1.0: a stop probability never exceeds it, so the decoder runs every step asked.
        chunks = cloner.stream(WARM_UP_TEXT, voice, max_decoder_steps=-(-frames // cloner.synth_cfg.r),
                               min_stop_token=1.0, vocode=vocode, stream_cfg=scfg)
        for _ in itertools.islice(chunks, 2):
            pass
        chunks.close()
        whole = streaming.StreamConfig(chunk_frames=self.settings.vocoder_chunk_frames,
                                       vocoder_context=scfg.vocoder_context)
        silence = np.full((cloner.mel_cfg.n_mels, 3 * self.settings.vocoder_chunk_frames), mel_floor(cloner.mel_cfg),
                          np.float32)
        for _ in streaming.vocoded_chunks([silence], vocode, cloner.mel_cfg.hop_length, whole):
            pass
        log.info("warmed up in %.2f s: the vocoder ran mel lengths %s once", time.perf_counter() - start,
                 sorted(set(seen)))
        return seen

    # ----------------------------------------------------------------- checks

    def check_text(self, text: str) -> str:
        limit = self.settings.limits.max_text_chars
        if len(text) > limit:
            raise RequestError(f"text is {len(text)} characters; at most {limit} are accepted")
        if not text.strip():
            raise RequestError("text is empty")
        text_frontend.encode_text(text, self.cloner.synth_cfg.n_symbols)  # ConfigError -> 422
        return text

    def controls(self, form: SynthesisControls) -> Controls:
        cap = self.settings.limits.max_decoder_steps
        steps = form.max_decoder_steps or min(self.default_steps, cap)
        if steps > cap:
            raise RequestError(f"max_decoder_steps is {steps}; this server allows at most {cap}")
        return Controls(style_idx=form.style_idx, seed=form.seed, speaking_rate=form.speaking_rate,
                        pitch_semitones=form.pitch_semitones, stop_threshold=form.stop_threshold,
                        max_decoder_steps=steps)

    def check_budget(self, texts: list[str], controls: Controls) -> WorkBudget:
        """413 before admission when the texts' fragments cannot fit the request's work budget even if
        each stops as early as the stop rule allows; the limit is enforced again step by step."""
        budget = self.engine.budget(controls)
        fragments = sum(len(text_frontend.encode_text(t, self.cloner.synth_cfg.n_symbols)) for t in texts)
        budget.check_plan(fragments, controls.max_decoder_steps or self.default_steps)
        return budget

    def check_embedding(self, values: list[float]) -> np.ndarray:
        embedding = np.asarray(values, dtype=np.float32)
        if embedding.shape != (self.embedding_dim,):
            raise RequestError(f"embedding has {embedding.size} values; this bundle's encoder makes "
                               f"{self.embedding_dim}")
        if not np.isfinite(embedding).all():  # float32 overflow of huge finite JSON numbers
            raise RequestError("embedding holds values that are not finite as float32")
        if not np.any(embedding):
            raise RequestError("embedding is all zeros: that is no voice")
        return embedding

    def check_upload_size(self, data: bytes) -> bytes:
        if len(data) > self.settings.limits.max_upload_bytes:
            raise UploadError(413, f"upload too large: {len(data)} bytes; at most "
                                   f"{self.settings.limits.max_upload_bytes} are accepted")
        return data

    def voice(self, reference: bytes | None, voice_id: str | None) -> VoiceSource:
        """Exactly one of an uploaded reference and a stored voice id."""
        if reference is not None and voice_id:
            raise RequestError("give either an `audio` (or `reference`) upload or a `voice_id`, not both")
        if voice_id:
            voice_id = check_voice_id(voice_id)
            return VoiceSource(f"voice:{voice_id}", voice_id=voice_id, embedding=self.library.embedding(voice_id))
        if reference is None:
            raise RequestError("a voice is required: upload `audio` (or `reference`) or give a stored `voice_id` "
                               "(there is no default voice)")
        return VoiceSource("upload", reference=self.check_upload_size(reference))

    # ------------------------------------------------------------ worker side

    def reference(self, data: bytes):
        with self.telemetry.stage("decode_audio"):
            return read_reference(data, self.encoder_rate, self.settings.limits)

    def embedding_of(self, source: VoiceSource) -> np.ndarray:
        """Runs on a worker: the stored/given embedding, or the upload decoded and embedded."""
        if source.embedding is not None:
            return source.embedding
        assert source.reference is not None
        ref = self.reference(source.reference)
        return self.engine.embed(ref.wav, ref.sample_rate)

    def stream_items(self, text: str, source: VoiceSource, controls: Controls,
                     should_stop: StopCheck, wav_header: bool = True) -> Iterator[Any]:
        """First the response headers (a dict), then WAV bytes: header + PCM chunks (bare PCM without
        `wav_header`)."""
        embedding = self.embedding_of(source)
        yield self.audio_headers(source, embedding)
        first = wav_header
        for chunk in self.engine.stream(text, embedding, controls, should_stop):
            yield (wav_stream_header(self.sample_rate) if first else b"") + pcm16(chunk)
            first = False

    # --------------------------------------------------------------- responses

    def audio_headers(self, source: VoiceSource, embedding: np.ndarray) -> dict[str, str]:
        headers = {
            "X-Voxport-Voice": source.label,
            "X-Voxport-Embedding-Sha256": embedding_sha256(embedding),
            "X-Voxport-Sample-Rate": str(self.sample_rate),
        }
        return {**headers, **self.weight_headers()}

    def weight_headers(self) -> dict[str, str]:
        headers = {"X-Voxport-Weights": ",".join(f"{c}={w}" for c, w in sorted(self.weights.items()))}
        if self.warnings:
            headers["X-Voxport-Warning"] = "; ".join(self.warnings)
        return headers

    def health(self) -> dict[str, Any]:
        components: dict[str, Any] = {}
        for key, served in self.cloner.served.items():
            component, graph = key.split("/", 1)
            entry = components.setdefault(component, {"weights": self.weights.get(component), "graphs": {}})
            entry["graphs"][graph] = {**served.as_dict(), "backend": ENGINES.get(served.format, served.format)}
        count, size = self.library.stats()
        limits = self.settings.limits
        return {
            "status": "ok", "bundle_dir": str(Path(self.settings.bundle_dir)), "sample_rate": self.sample_rate,
            "embedding_dim": self.embedding_dim, "weights": self.weights, "warnings": self.warnings,
            "components": components,
            "capacity": {"workers": self.settings.workers, "queue_size": self.settings.queue_size,
                         "in_flight": self.engine.inflight},
            "library": {"voices": count, "bytes": size, "max_voices": limits.max_voices,
                        "max_bytes": limits.max_library_bytes},
            "limits": {**limits.__dict__, "default_max_decoder_steps": self.default_steps},
        }

    def close(self) -> None:
        self.engine.close()
        self.library.close()
        if self._owns_cloner:
            self.cloner.close()
