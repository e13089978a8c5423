"""voxport_tts: voice cloning on Triton through BLS calls to the repository's graph models.

Written by `voxport package format=triton` beside `voxport_tts.json` (the bundle's synthesizer
config, sample rate and the names of the graph models) and `voxport_frontend/` (voxport's own
torch-free front end, copied verbatim). Needs numpy and Triton's `triton_python_backend_utils` only.

One request: TEXT (+ EMBEDDING, a 256-d speaker embedding, or SPEAKER_MELS, the speaker encoder's
partial mels of a reference; optional SEED, STYLE_IDX, MAX_DECODER_STEPS, MIN_STOP_TOKEN, STREAM, as
`voxport clone` takes them) -> AUDIO (float32 at SAMPLE_RATE). The loop is the runtime's
(runtime/cloner.py): text front end -> fragments; per fragment the synthesizer encoder once, the
decoder step until the stop rule (models/synthesizer_io.py names, prenet masks from
`NumpyMasks(SEED)` in the runtime's order), postnet, trailing-silence trim; then the vocoder. The
decoder step is a stateful model: each fragment is one Triton sequence (START on its first step),
and its recurrent state stays on the server (implicit state); the loop's own copies of the state are
placeholders this model never sends. STREAM=true sends audio chunks as they are made (decoupled
model), as `VoiceCloner.stream` does; otherwise one response carries the whole waveform, as
`voxport clone` does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import sys
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import triton_python_backend_utils as pb_utils

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from voxport_frontend import streaming  # noqa: E402
from voxport_frontend import text as text_frontend  # noqa: E402
from voxport_frontend.errors import Cancelled, ConfigError  # noqa: E402
from voxport_frontend.prenet_masks import NumpyMasks  # noqa: E402
from voxport_frontend.synthesizer_config import SynthesizerConfig  # noqa: E402
from voxport_frontend.synthesizer_io import STATE_NAMES  # noqa: E402
from voxport_frontend.synthesizer_loop import run_host_loop  # noqa: E402

CONFIG_FILE = "voxport_tts.json"
# The decoder step's state lives in Triton; what the loop carries in its place.
HELD_BY_TRITON = np.zeros((0,), dtype=np.float32)


class GraphCallError(RuntimeError):
    """A BLS call to a graph model failed; the message is Triton's."""


class TritonPythonModel:
    def initialize(self, args: Mapping[str, str]) -> None:
        with open(os.path.join(_HERE, CONFIG_FILE)) as f:
            settings = json.load(f)
        self.synth_cfg = SynthesizerConfig.from_dict(settings["synthesizer"])
        self.models = dict(settings["models"])
        self.sample_rate = int(settings["sample_rate"])
        self.hop_length = int(settings["hop_length"])
        self.stream_cfg = streaming.StreamConfig(**settings["stream"])
        self.encoder_max_batch = max(1, int(settings["speaker_encoder_max_batch"]))
        self.max_text_chars = int(settings["max_text_chars"])
        self.max_speaker_partials = int(settings["max_speaker_partials"])
        self.logger = pb_utils.Logger

    # -- one graph call -------------------------------------------------------------------------
    def _call(self, graph: str, feeds: Mapping[str, np.ndarray], outputs: list[str],
              correlation_id: int = 0, flags: int = 0) -> dict[str, np.ndarray]:
        inputs = [pb_utils.Tensor(name, np.ascontiguousarray(value)) for name, value in feeds.items()]
        options: dict = {"correlation_id": correlation_id, "flags": flags} if correlation_id else {}
        if hasattr(pb_utils, "PreferredMemory"):  # Triton >= 23.04: outputs of GPU instances come back on the host
            options["preferred_memory"] = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)
        request = pb_utils.InferenceRequest(model_name=self.models[graph], requested_output_names=outputs,
                                            inputs=inputs, **options)
        response = request.exec()
        if response.has_error():
            raise GraphCallError(f"{self.models[graph]}: {response.error().message()}")
        return {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in outputs}

    def _runner(self, graph: str, outputs: list[str]) -> Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]:
        return lambda feeds: self._call(graph, feeds, outputs)

    # -- request inputs ---------------------------------------------------------------------------
    @staticmethod
    def _optional(request: object, name: str) -> np.ndarray | None:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy()

    def _scalar(self, request: object, name: str, default: int) -> int:
        value = self._optional(request, name)
        return default if value is None else int(np.asarray(value).reshape(-1)[0])

    def _text(self, request: object) -> str:
        value = self._optional(request, "TEXT")
        if value is None:
            raise ConfigError("TEXT is required")
        item = np.asarray(value, dtype=object).reshape(-1)[0]
        text = item.decode("utf-8") if isinstance(item, bytes) else str(item)
        if len(text) > self.max_text_chars:
            raise ConfigError(f"TEXT has {len(text)} characters; at most {self.max_text_chars}")
        return text

    def embedding(self, request: object) -> np.ndarray:
        """EMBEDDING as given, or the speaker encoder over SPEAKER_MELS: the L2-normed mean of its partial
        embeddings (models/speaker_frontend.mean_embedding), in batches the encoder model accepts."""
        given = self._optional(request, "EMBEDDING")
        if given is not None:
            embedding = np.asarray(given, dtype=np.float32).reshape(-1)
        else:
            mels = self._optional(request, "SPEAKER_MELS")
            if mels is None:
                raise ConfigError("give EMBEDDING or SPEAKER_MELS")
            mels = np.asarray(mels, dtype=np.float32)
            if mels.ndim != 3 or not 1 <= mels.shape[0] <= self.max_speaker_partials:
                raise ConfigError(f"SPEAKER_MELS must be (partials, frames, mels) with 1..{self.max_speaker_partials} "
                                  f"partials, got shape {mels.shape}")
            partials = np.concatenate([
                self._call("speaker_encoder", {"mels": mels[i: i + self.encoder_max_batch]}, ["embeddings"])[
                    "embeddings"] for i in range(0, mels.shape[0], self.encoder_max_batch)])
            mean = partials.mean(axis=0)
            embedding = (mean / np.linalg.norm(mean)).astype(np.float32)
        if embedding.shape[0] != self.synth_cfg.speaker_embedding_dim or not np.isfinite(embedding).all():
            raise ConfigError(f"speaker embedding must hold {self.synth_cfg.speaker_embedding_dim} finite values")
        return embedding

    # -- the decoder step as a Triton sequence ----------------------------------------------------
    def decoder_sequence(self, max_steps: int, should_stop: Callable[[], bool] | None = None) -> DecoderSequence:
        return DecoderSequence(self, max_steps, should_stop)

    # -- synthesis --------------------------------------------------------------------------------
    def synthesize(self, text: str, embedding: np.ndarray, style_idx: int, seed: int, max_steps: int,
                   min_stop_token: float, should_stop: Callable[[], bool] | None = None) -> np.ndarray:
        """Text + embedding -> mel (n_mels, T): VoiceCloner.synthesize over BLS calls."""
        cfg = dataclasses.replace(self.synth_cfg, min_stop_token=float(min_stop_token))
        masks = NumpyMasks(seed)
        mels = []
        for ids in text_frontend.encode_text(text, self.synth_cfg.n_symbols):
            with self.decoder_sequence(max_steps, should_stop) as decoder:
                result = run_host_loop(
                    self._runner("encoder", ["encoder_seq", "encoder_seq_proj"]), decoder,
                    self._runner("postnet", ["mel_post"]),
                    np.asarray([ids], dtype=np.int64), embedding[None], np.asarray([style_idx], dtype=np.int64),
                    masks, cfg, max_decoder_steps=max_steps)
            mels.append(result.trimmed()[0])
        return np.concatenate(mels, axis=1)

    def vocode(self, mel: np.ndarray) -> np.ndarray:
        wav = self._call("vocoder", {"mel": np.asarray(mel, dtype=np.float32)[None]}, ["wav"])["wav"]
        return wav.reshape(-1)

    def stream(self, text: str, embedding: np.ndarray, style_idx: int, seed: int, max_steps: int,
               min_stop_token: float, should_stop: Callable[[], bool] | None = None) -> Iterator[np.ndarray]:
        """Waveform chunks as the decoder makes frames: VoiceCloner.stream (rate 1, no pitch shift)."""
        fragments = text_frontend.encode_text(text, self.synth_cfg.n_symbols)
        masks = NumpyMasks(seed)
        encoder = self._runner("encoder", ["encoder_seq", "encoder_seq_proj"])
        postnet = self._runner("postnet", ["mel_post"])

        def mels() -> Iterator[np.ndarray]:
            for ids in fragments:
                with self.decoder_sequence(max_steps, should_stop) as decoder:
                    frames = streaming.decoder_frames(encoder, decoder, ids, embedding, style_idx, masks,
                                                      self.synth_cfg, max_steps, min_stop_token)
                    yield from streaming.postnet_frames(frames, postnet, self.synth_cfg.stop_threshold,
                                                        self.stream_cfg)

        yield from streaming.vocoded_chunks(mels(), self.vocode, self.hop_length, self.stream_cfg)

    # -- Triton entry points ----------------------------------------------------------------------
    def _response(self, audio: np.ndarray) -> object:
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor("AUDIO", np.ascontiguousarray(audio, dtype=np.float32)),
            pb_utils.Tensor("SAMPLE_RATE", np.asarray([self.sample_rate], dtype=np.int32))])

    def _serve(self, request: object, sender: object) -> None:
        text = self._text(request)
        embedding = self.embedding(request)
        seed = self._scalar(request, "SEED", 0)
        style_idx = self._scalar(request, "STYLE_IDX", 0)
        max_steps = self._scalar(request, "MAX_DECODER_STEPS", self.synth_cfg.max_decoder_steps)
        if not 1 <= max_steps <= self.synth_cfg.max_decoder_steps:
            raise ConfigError(f"MAX_DECODER_STEPS must be in 1..{self.synth_cfg.max_decoder_steps}, got {max_steps}")
        stop = self._optional(request, "MIN_STOP_TOKEN")
        min_stop_token = self.synth_cfg.min_stop_token if stop is None else float(np.asarray(stop).reshape(-1)[0])
        if not 0.0 <= min_stop_token <= 1.0:
            raise ConfigError(f"MIN_STOP_TOKEN must be in 0..1, got {min_stop_token}")
        stream_flag = self._optional(request, "STREAM")
        is_cancelled = getattr(request, "is_cancelled", None)  # Triton >= 23.10
        if stream_flag is not None and bool(np.asarray(stream_flag).reshape(-1)[0]):
            for chunk in self.stream(text, embedding, style_idx, seed, max_steps, min_stop_token, is_cancelled):
                sender.send(self._response(chunk))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            return
        wav = self.vocode(self.synthesize(text, embedding, style_idx, seed, max_steps, min_stop_token, is_cancelled))
        sender.send(self._response(wav), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def execute(self, requests: list) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                self._serve(request, sender)
            except (ConfigError, ValueError) as exc:  # the request's fault: named, no traceback
                self._fail(sender, f"voxport_tts: {exc}")
            except Exception as exc:  # a failed graph call or a bug: answered, and logged with its cause
                self.logger.log_error(f"voxport_tts: {type(exc).__name__}: {exc}")
                self._fail(sender, f"voxport_tts: {type(exc).__name__}: {exc}")
        return None

    @staticmethod
    def _fail(sender: object, message: str) -> None:
        response = pb_utils.InferenceResponse(error=pb_utils.TritonError(message))
        sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


class DecoderSequence:
    """The decoder-step runner for one fragment: one Triton sequence with a fresh correlation id.

    The first step carries SEQUENCE_START (Triton resets the implicit state to its zero initial state,
    which is the runtime's `zero_decoder_state`); the state inputs the loop passes are dropped and the
    state outputs it reads back are placeholders. Leaving the `with` block ends the sequence: the step
    that reaches `max_steps` carries SEQUENCE_END itself; after an earlier stop (or an error) one more
    step is sent with SEQUENCE_END, and its outputs are discarded, so Triton frees the sequence slot
    at once instead of after its idle timeout.
    """

    OUTPUTS = ["mel_frames", "stop", "attention"]

    def __init__(self, model: TritonPythonModel, max_steps: int, should_stop: Callable[[], bool] | None) -> None:
        self.model = model
        self.max_steps = max_steps
        self.should_stop = should_stop
        self.correlation_id = secrets.randbits(63) or 1  # unique among the server's live sequences
        self.steps = 0
        self.ended = False
        self._last: dict[str, np.ndarray] | None = None

    def __enter__(self) -> DecoderSequence:
        return self

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.ended:
            raise GraphCallError("decoder sequence already ended")
        if self.should_stop is not None and self.should_stop():
            raise Cancelled("request cancelled")
        sent = {k: v for k, v in feeds.items() if k not in STATE_NAMES}
        flags = pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START if self.steps == 0 else 0
        if self.steps == self.max_steps - 1:
            flags |= pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END
            self.ended = True
        out = self.model._call("decoder_step", sent, self.OUTPUTS, self.correlation_id, flags)
        self.steps += 1
        self._last = sent
        return {**out, **{f"{name}_out": HELD_BY_TRITON for name in STATE_NAMES}}

    def __exit__(self, *exc: object) -> None:
        if self.ended or self._last is None:
            return
        self.ended = True
        try:
            self.model._call("decoder_step", self._last, self.OUTPUTS, self.correlation_id,
                             pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END)
        except GraphCallError as error:
            if exc[0] is None:
                raise
            self.model.logger.log_warn(f"voxport_tts: ending decoder sequence after an error: {error}")
