"""Request and response models of the HTTP API (pydantic; out-of-range values get 422)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from voxport.runtime.controls import PITCH_RANGE_SEMITONES, RATE_RANGE

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class SynthesisControls(BaseModel):
    """Synthesis settings shared by every synthesis endpoint."""

    style_idx: int = Field(0, ge=-1, le=9, description=(
        "MockingBird global style token: 0..9 picks a token's style, -1 derives the style from the "
        "speaker embedding (variants C/D; no style term in variant B)."))
    speaking_rate: float = Field(1.0, ge=RATE_RANGE[0], le=RATE_RANGE[1], allow_inf_nan=False, description=(
        "Duration scale: the mel is resampled in time before the vocoder (2.0 = twice as fast)."))
    pitch_semitones: float = Field(0.0, ge=PITCH_RANGE_SEMITONES[0], le=PITCH_RANGE_SEMITONES[1],
                                   allow_inf_nan=False, description=(
        "Pitch shift in semitones by frequency warping of each mel frame (formants move with it)."))
    stop_threshold: float | None = Field(None, ge=0.05, le=0.95, allow_inf_nan=False, description=(
        "Decoding stops once the stop-token probability exceeds this (MockingBird's min_stop_token / 10); "
        "default: the bundle's (0.5)."))
    max_decoder_steps: int | None = Field(None, ge=1, le=100_000, description=(
        "Upper bound on decoder steps (r frames each) per text fragment; at most the server's limit."))
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of the prenet dropout masks (reproducible output).")


class StreamingControls(SynthesisControls):
    stream: bool = Field(False, description=(
        "Return audio as it is produced: a WAV with unknown length (sizes 0xFFFFFFFF) sent in chunks."))


class CloneForm(StreamingControls):
    text: str = Field(min_length=1, description="Text to speak (English or Chinese).")
    voice_id: str | None = Field(None, description="A stored voice, instead of uploading `audio` / `reference`.")


class BatchForm(SynthesisControls):
    texts: list[str] = Field(min_length=1, description="Texts to speak in the same voice.")
    voice_id: str | None = Field(None, description="A stored voice, instead of uploading `audio` / `reference`.")


class VoiceForm(BaseModel):
    name: str | None = Field(None, max_length=200, description="A label for people; not an id.")
    ref_text: str | None = Field(None, max_length=2000, description="Transcript of the reference, if known.")


class EmbeddingSynthesisRequest(StreamingControls):
    model_config = ConfigDict(extra="forbid")  # JSON body: a misspelt control is an error, not ignored

    text: str = Field(min_length=1)
    embedding: list[FiniteFloat] = Field(min_length=1, max_length=4096, description=(
        "Speaker embedding (the encoder's dimension, 256), finite values, not all zero."))


class EmbeddingForm(BaseModel):
    voice_id: str | None = Field(None, description="A stored voice, instead of uploading `audio` / `reference`.")


class SpeechRequest(BaseModel):
    """OpenAI's `POST /v1/audio/speech` body, with this server's voices (no preset ones)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, max_length=100, pattern=r"^[ -~]*$", description=(
        "Accepted for OpenAI clients and ignored: this server speaks with its bundle whatever the model "
        "(echoed in X-Voxport-Model)."))
    input: str = Field(min_length=1, description="Text to speak (English or Chinese).")
    voice: str = Field(description=(
        "The id of a stored voice (POST /api/v1/voices); unknown ids get 404. OpenAI's preset voices "
        "(alloy, ...) do not exist here."))
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"] = Field("mp3", description=(
        "OpenAI's default mp3. Encoded by libsndfile: wav, pcm (16-bit little-endian mono at the bundle's "
        "rate, X-Voxport-Sample-Rate) and flac always; mp3 and opus where this host's libsndfile has them "
        "(opus at 8/12/16/24/48 kHz: a 22.05 kHz bundle's speech is sent at 24 kHz); aac never. A format that "
        "cannot be made here gets 422. "
        "wav and pcm are streamed in chunks as they are synthesized."))
    speed: float = Field(1.0, ge=RATE_RANGE[0], le=RATE_RANGE[1], allow_inf_nan=False, description=(
        "Speaking rate (this server's speaking_rate: 0.5..2.0, narrower than OpenAI's 0.25..4.0)."))


class ErrorBody(BaseModel):
    detail: str = Field(description="What is wrong, as one line for a person.")
    kind: str = Field(description="validation, bad_request, voice_not_found, invalid_voice_id, too_large, "
                                  "unsupported_audio, audio, overloaded, timeout")


class EmbeddingResponse(BaseModel):
    embedding: list[float]
    dim: int
    sha256: str = Field(description="sha256 of the embedding's float32 little-endian bytes")
    voice_id: str | None
    weights: dict[str, str]


class VoiceInfo(BaseModel):
    id: str
    name: str | None
    ref_text: str | None
    created: float
    last_used: float
    duration_s: float
    sample_rate: int
    bytes: int
    embedding_sha256: str
    encoder_sha256: str


class VoiceCreated(VoiceInfo):
    evicted: list[str] = Field(description="Voices removed (least recently used) to make room.")


class VoiceDetail(VoiceInfo):
    embedding: list[float]


class VoiceList(BaseModel):
    voices: list[VoiceInfo]
    count: int
    bytes: int


class BatchItem(BaseModel):
    index: int
    text: str
    sample_rate: int
    duration_s: float
    wav_base64: str


class BatchResponse(BaseModel):
    items: list[BatchItem]
    voice: str
    embedding_sha256: str
    weights: dict[str, str]


class Health(BaseModel):
    status: str
    bundle_dir: str
    sample_rate: int
    embedding_dim: int
    weights: dict[str, str]
    warnings: list[str]
    components: dict[str, Any]
    capacity: dict[str, int]
    library: dict[str, int]
    limits: dict[str, Any]
    quarantined: list[dict[str, Any]] = []  # stored voices that failed verification (id, reason, at, path)
    engine: str = "local"  # serve.engine: local (one process) or ray
    deployments: dict[str, Any] = {}  # engine ray: per deployment, its replicas, their nodes and artifacts
