"""Uploaded reference audio -> the normalized reference the service embeds and stores.

Normalized = mono (channels averaged), resampled to the speaker encoder's rate (soxr), 16-bit PCM
WAV. The embedding is computed from exactly the samples of that WAV, so re-embedding a stored
reference reproduces its stored embedding. Each failure is an `UploadError` carrying its HTTP
status: 413 too large (bytes, or decoded samples as the header declares them), 415 not decodable
as audio, 422 empty / too long / non-finite / too many channels / too high a sample rate.
"""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import soundfile as sf

from voxport.errors import AudioError, UploadError
from voxport.models.audio import load_wav

if TYPE_CHECKING:
    from voxport.runtime.serve.settings import Limits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reference:
    wav: np.ndarray  # float32 mono at `sample_rate`, exactly the samples of `wav_bytes`
    wav_bytes: bytes  # 16-bit PCM WAV
    sample_rate: int
    source_sample_rate: int
    duration_s: float


def encode_wav(wav: np.ndarray, sample_rate: int) -> bytes:
    """float waveform -> 16-bit PCM WAV bytes (clipped to [-1, 1])."""
    buffer = io.BytesIO()
    sf.write(buffer, np.clip(np.asarray(wav, dtype=np.float32), -1.0, 1.0), sample_rate, subtype="PCM_16",
             format="WAV")
    return buffer.getvalue()


def check_header(info: sf._SoundFileInfo, limits: Limits) -> None:
    """The decoded size as the header declares it, checked before anything is decoded."""
    if info.samplerate > limits.max_sample_rate:
        raise UploadError(422, f"the reference declares {info.samplerate} Hz; at most "
                               f"serve.limits.max_sample_rate = {limits.max_sample_rate} Hz is accepted")
    if info.channels > limits.max_channels:
        raise UploadError(422, f"the reference declares {info.channels} channels; at most "
                               f"serve.limits.max_channels = {limits.max_channels} are accepted")
    samples = info.frames * info.channels
    if samples > limits.max_decoded_samples:
        raise UploadError(413, f"the reference would decode to {samples} samples ({info.frames} frames x "
                               f"{info.channels} channels); at most serve.limits.max_decoded_samples = "
                               f"{limits.max_decoded_samples} are accepted")


def read_reference(data: bytes, sample_rate: int, limits: Limits) -> Reference:
    max_bytes, max_seconds = limits.max_upload_bytes, limits.max_clip_seconds
    if len(data) == 0:
        raise UploadError(422, "the uploaded reference file is empty")
    if len(data) > max_bytes:
        raise UploadError(413, f"upload too large: {len(data)} bytes; at most {max_bytes} are accepted")
    try:
        info = sf.info(io.BytesIO(data))
    except (sf.LibsndfileError, RuntimeError, TypeError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        first = re.sub(r"^Error opening <[^>]*>: ", "", first)  # libsndfile names the in-memory buffer
        formats = ", ".join(sorted(sf.available_formats()))
        raise UploadError(415, f"cannot decode the reference as audio ({first}); "
                               f"supported formats: {formats}") from None
    if info.frames <= 0 or info.samplerate <= 0:
        raise UploadError(422, "the reference file holds no audio samples")
    check_header(info, limits)
    duration = info.frames / info.samplerate
    if duration > max_seconds:
        raise UploadError(422, f"the reference is {duration:.1f} s long; at most {max_seconds:g} s is accepted")
    try:
        wav = load_wav(data, sample_rate)
    except AudioError as exc:
        raise UploadError(422, str(exc).replace("<bytes>: ", "reference: ")) from None
    wav_bytes = encode_wav(wav, sample_rate)
    stored, _ = sf.read(io.BytesIO(wav_bytes), dtype="float32")
    log.debug("reference: %d Hz, %.2f s -> %d Hz PCM16", info.samplerate, duration, sample_rate)
    return Reference(np.ascontiguousarray(stored), wav_bytes, sample_rate, int(info.samplerate),
                     len(stored) / sample_rate)
