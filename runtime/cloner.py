"""The cloning pipeline over whatever artifacts a bundle holds.

reference audio -> encoder front end -> embedding; text -> fragments -> symbol ids ->
synthesizer host loop (encoder graph once, decoder-step graph per step, stop rule, postnet) ->
vocoder -> waveform. Every graph is served by a backend chosen from the bundle's records; which
one serves, and why, is logged and available from `served`.

Imports no torch: only opening a torch artifact (runtime/backends/torch.py) loads it. Prenet dropout
masks are drawn with `NumpyMasks(seed)`, one source per call shared by its fragments.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from voxport.errors import AudioError, ConfigError
from voxport.models import speaker_frontend as se
from voxport.models import text as text_frontend
from voxport.models.audio import MelConfig
from voxport.models.prenet_masks import NumpyMasks
from voxport.models.synthesizer_config import SynthesizerConfig
from voxport.pipeline.records import Record, read_bundle
from voxport.runtime import streaming
from voxport.runtime.backends import Backend, open_first
from voxport.runtime.controls import TimeResampler, mel_floor, shift_pitch
from voxport.runtime.host import Host, detect
from voxport.runtime.select import DEFAULT_PREFERENCE, ranked
from voxport.runtime.synthesizer_loop import run_host_loop

log = logging.getLogger(__name__)

GRAPHS = (
    ("speaker_encoder", "speaker_encoder"),
    ("synthesizer", "encoder"),
    ("synthesizer", "decoder_step"),
    ("synthesizer", "postnet"),
    ("vocoder", "vocoder"),
)


@dataclass(frozen=True)
class Served:
    """Which artifact serves one graph, on what, and why it was chosen."""

    key: str
    file: str
    format: str
    precision: str
    weights: str
    sha256: str
    providers: tuple[str, ...]
    reason: str
    session: dict[str, Any] | None = None  # ONNX Runtime: the SessionSettings really used (to_dict)

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "providers": list(self.providers),
                "session": dict(self.session) if self.session is not None else None}


def open_graph(
    records: Sequence[Record], bundle_dir: Path, component: str, graph: str,
    preference: Sequence[str], strict: bool = False, threads: int = 0, host: Host | None = None,
    cpu_arena: str | None = None,
) -> tuple[Backend, Served]:
    """Select and load the artifact serving one graph; log what serves it and why.

    Choices are tried in order: one that fails to load (sha256 changed, ONNX Runtime fell back
    from CUDA, engine refused) gives way to the next, and the reason says so; `strict` does not.
    `threads` > 0 pins ONNX Runtime's intra-op threads; 0 keeps what the artifact's record says.
    """
    host = host or detect()
    choices = ranked(records, component, graph, host, preference, strict=strict)
    backend, choice, reason = open_first(choices, bundle_dir, graph, host, threads, strict, cpu_arena)
    record = choice.record
    # ONNX Runtime: the session settings really used (recorded by the build, `threads` pinned over them).
    settings = getattr(backend, "settings", None)
    session = settings.to_dict() if settings is not None else None
    served = Served(f"{component}/{graph}", record.file, record.format, record.precision,
                    record.weights, record.sha256, tuple(backend.providers), reason, session)
    log.info("%s served by %s (%s %s) on %s%s: %s", served.key, record.file, record.format, record.precision,
             backend.providers, f" with session {session}" if session is not None else "", reason)
    return backend, served


def stack_configs(records: Sequence[Record]) -> tuple[se.SpeakerEncoderConfig, SynthesizerConfig, MelConfig,
                                                       dict[str, str]]:
    """The stack's encoder, synthesizer and mel configs and each component's weights provenance, from
    the bundle's source records (what every cloner, local or remote, is built around)."""
    by_component = {r.component: r for r in records if r.stage == "source"}
    return (se.SpeakerEncoderConfig.from_dict(by_component["speaker_encoder"].model["config"]),
            SynthesizerConfig.from_dict(by_component["synthesizer"].model["config"]),
            MelConfig.from_dict(by_component["vocoder"].contract["mel"]),
            {c: r.weights for c, r in by_component.items()})


def reference_partials(wav: np.ndarray, sample_rate: int, cfg: se.SpeakerEncoderConfig) -> np.ndarray:
    """Reference speech -> the speaker encoder's partial-utterance mels (n, frames, n_mels): the front end
    of `VoiceCloner.embed` (AudioError if too little voiced speech)."""
    processed = se.preprocess_wav(np.asarray(wav, dtype=np.float32), sample_rate, cfg)
    return se.partial_mels(processed, cfg).astype(np.float32)


class VocoderOnly:
    """Just the vocoder of a bundle: copy synthesis (`voxport vocode`) and benchmarks."""

    def __init__(self, bundle_dir: str | Path, preference: Sequence[str] = DEFAULT_PREFERENCE,
                 strict: bool = False, threads: int = 0, host: Host | None = None,
                 cpu_arena: str | None = None) -> None:
        records = read_bundle(Path(bundle_dir))
        self._backend, self.served = open_graph(
            records, Path(bundle_dir), "vocoder", "vocoder", preference, strict, threads, host, cpu_arena
        )
        served = next(r for r in records if r.file == self.served.file)  # its contract: the mel it takes
        self.mel_cfg = MelConfig.from_dict(served.contract["mel"])
        self.sample_rate = self.mel_cfg.sample_rate

    def vocode(self, mel: np.ndarray) -> np.ndarray:
        wav = self._backend.infer({"mel": mel[None].astype(np.float32)})["wav"]
        return wav.reshape(-1)


class VoiceCloner:
    def __init__(
        self, bundle_dir: str | Path, preference: Sequence[str] = DEFAULT_PREFERENCE,
        strict: bool = False, threads: int = 0, host: Host | None = None,
        graphs: Sequence[tuple[str, str]] = GRAPHS, cpu_arena: str | None = None,
    ) -> None:
        """`graphs`: the graphs to load (default all); a Ray Serve replica of one component
        (runtime/serve/ray/) loads only its own, and only the methods needing them work."""
        self.bundle_dir = Path(bundle_dir)
        records = read_bundle(self.bundle_dir)
        host = host or detect()  # probed once for all graphs
        self._backends: dict[str, Backend] = {}
        self.served: dict[str, Served] = {}
        for component, graph in graphs:
            key = f"{component}/{graph}"
            self._backends[key], self.served[key] = open_graph(
                records, self.bundle_dir, component, graph, preference, strict, threads, host, cpu_arena
            )
        self.encoder_cfg, self.synth_cfg, self.mel_cfg, self.weights = stack_configs(records)

    @property
    def sample_rate(self) -> int:
        return self.mel_cfg.sample_rate

    def embed(self, wav: np.ndarray, sample_rate: int) -> np.ndarray:
        """Reference speech -> 256-d unit embedding. AudioError if too little voiced speech."""
        return se.mean_embedding(self.embed_partials(reference_partials(wav, sample_rate, self.encoder_cfg)))

    def embed_partials(self, mels: np.ndarray) -> np.ndarray:
        """Partial-utterance mels (n, frames, n_mels) -> their (n, dim) embeddings: the encoder graph alone
        (a Ray Serve encoder replica runs several requests' partials in one call)."""
        return self._backends["speaker_encoder/speaker_encoder"].infer({"mels": mels})["embeddings"]

    def _check_embedding(self, embedding: np.ndarray) -> np.ndarray:
        embedding = np.asarray(embedding, dtype=np.float32).reshape(-1)
        if embedding.shape[0] != self.synth_cfg.speaker_embedding_dim or not np.isfinite(embedding).all():
            raise ConfigError(
                f"speaker embedding must hold {self.synth_cfg.speaker_embedding_dim} finite values"
            )
        return embedding

    def synthesize(
        self, text: str, embedding: np.ndarray, style_idx: int = 0, seed: int = 0,
        max_decoder_steps: int | None = None, min_stop_token: float | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> np.ndarray:
        """Text + embedding -> mel (n_mels, T), fragments concatenated in time.

        min_stop_token: stop once the stop probability exceeds it (default: the bundle's, 0.5);
        should_stop: checked before every decoder step, raises `streaming.Cancelled` when true.
        """
        embedding = self._check_embedding(embedding)
        fragments = text_frontend.encode_text(text, self.synth_cfg.n_symbols)
        cfg = self.synth_cfg if min_stop_token is None else dataclasses.replace(
            self.synth_cfg, min_stop_token=float(min_stop_token))
        masks = NumpyMasks(seed)
        decoder_step = self._backends["synthesizer/decoder_step"].infer
        if should_stop is not None:
            run_step = decoder_step

            def decoder_step(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
                if should_stop():
                    raise streaming.Cancelled("synthesis cancelled")
                return run_step(feeds)

        mels = []
        for ids in fragments:
            result = run_host_loop(
                self._backends["synthesizer/encoder"].infer, decoder_step,
                self._backends["synthesizer/postnet"].infer,
                np.asarray([ids], dtype=np.int64), embedding[None], np.asarray([style_idx], dtype=np.int64),
                masks, cfg, max_decoder_steps=max_decoder_steps,
            )
            mels.append(result.trimmed()[0])
        return np.concatenate(mels, axis=1)

    def stream(
        self, text: str, embedding: np.ndarray, style_idx: int = 0, seed: int = 0,
        max_decoder_steps: int | None = None, min_stop_token: float | None = None,
        rate: float = 1.0, pitch_semitones: float = 0.0,
        vocode: Callable[[np.ndarray], np.ndarray] | None = None,
        stream_cfg: streaming.StreamConfig | None = None, should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[np.ndarray]:
        """Waveform chunks (float32 at `sample_rate`) as the decoder produces frames.

        The host loop runs step by step; postnet and vocoder run on overlapping windows whose
        overlap is trimmed (see runtime/streaming.py). `vocode` replaces `self.vocode` (the
        service passes its batching vocoder). Text and embedding are checked before any work.
        """
        scfg = stream_cfg or streaming.StreamConfig()
        mels = self.stream_mels(text, embedding, style_idx, seed, max_decoder_steps, min_stop_token, rate,
                                pitch_semitones, scfg, should_stop)
        yield from streaming.vocoded_chunks(mels, vocode or self.vocode, self.mel_cfg.hop_length, scfg)

    def stream_mels(
        self, text: str, embedding: np.ndarray, style_idx: int = 0, seed: int = 0,
        max_decoder_steps: int | None = None, min_stop_token: float | None = None,
        rate: float = 1.0, pitch_semitones: float = 0.0,
        stream_cfg: streaming.StreamConfig | None = None, should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[np.ndarray]:
        """The mel windows `stream` vocodes (postnet, rate and pitch applied), without the vocoder: a
        Ray Serve synthesizer replica streams these and the vocoder runs in its own deployment."""
        embedding = self._check_embedding(embedding)
        fragments = text_frontend.encode_text(text, self.synth_cfg.n_symbols)
        scfg = stream_cfg or streaming.StreamConfig()
        masks = NumpyMasks(seed)  # the same draws as `synthesize` with this seed
        steps = max_decoder_steps or self.synth_cfg.max_decoder_steps
        stop = self.synth_cfg.min_stop_token if min_stop_token is None else float(min_stop_token)
        resampler = TimeResampler(rate)
        shift_pitch(np.zeros((self.mel_cfg.n_mels, 0), np.float32), pitch_semitones, self.mel_cfg)  # validate

        def mels() -> Iterator[np.ndarray]:
            for ids in fragments:
                frames = streaming.decoder_frames(
                    self._backends["synthesizer/encoder"].infer, self._backends["synthesizer/decoder_step"].infer,
                    ids, embedding, style_idx, masks, self.synth_cfg, steps, stop, should_stop)
                for mel in streaming.postnet_frames(frames, self._backends["synthesizer/postnet"].infer,
                                                    self.synth_cfg.stop_threshold, scfg):
                    yield shift_pitch(resampler.push(mel), pitch_semitones, self.mel_cfg)
            yield shift_pitch(resampler.flush(), pitch_semitones, self.mel_cfg)

        return mels()

    def vocode(self, mel: np.ndarray) -> np.ndarray:
        """mel (n_mels, T) -> float32 waveform at `sample_rate`."""
        wav = self._backends["vocoder/vocoder"].infer({"mel": mel[None].astype(np.float32)})["wav"]
        return wav.reshape(-1)

    def vocode_batch(self, mels: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Several mels in one vocoder call: padded to the longest with the silence floor, each
        output cut back to hop·T_i samples. The padding changes the last few samples of the
        shorter items slightly (the vocoder's receptive field reaches past their end)."""
        longest = max(m.shape[1] for m in mels)
        batch = np.full((len(mels), self.mel_cfg.n_mels, longest), mel_floor(self.mel_cfg), dtype=np.float32)
        for i, mel in enumerate(mels):
            batch[i, :, : mel.shape[1]] = mel
        wav = self._backends["vocoder/vocoder"].infer({"mel": batch})["wav"].reshape(len(mels), -1)
        hop = self.mel_cfg.hop_length
        return [wav[i, : hop * mel.shape[1]].copy() for i, mel in enumerate(mels)]

    def clone(self, reference: np.ndarray, reference_sr: int, text: str, **options: Any) -> np.ndarray:
        if reference.size == 0:
            raise AudioError("reference audio is empty")
        embedding = self.embed(reference, reference_sr)
        return self.vocode(self.synthesize(text, embedding, **options))

    def close(self) -> None:
        for backend in self._backends.values():
            backend.close()
        self._backends.clear()

