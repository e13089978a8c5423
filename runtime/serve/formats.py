"""Output audio formats of `POST /v1/audio/speech`, encoded by libsndfile (through soundfile).

What libsndfile can write depends on its version and build (here: the one bundled in the soundfile
wheel): MP3 needs libsndfile >= 1.1.0 built with LAME and mpg123, Opus needs >= 1.0.29 built with
libopus (Opus carries only 8, 12, 16, 24 or 48 kHz: other rates are resampled to the next one up,
22.05 -> 24 kHz, as the X-Voxport-Sample-Rate header says). AAC is in no libsndfile. A format that
cannot be encoded here is an `UnsupportedFormat` naming what is missing: never another format.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import soundfile as sf

from voxport.errors import UnsupportedFormat

OPUS_RATES = (8000, 12000, 16000, 24000, 48000)


@dataclass(frozen=True)
class OutputFormat:
    name: str
    media_type: str
    container: str  # libsndfile major format ("RAW": bare samples)
    subtype: str
    streams: bool  # sent in chunks as synthesis goes (16-bit PCM needs no look-ahead)
    needs: str  # what encoding it takes, for the error when it is missing


FORMATS = {
    "wav": OutputFormat("wav", "audio/wav", "WAV", "PCM_16", True, "libsndfile"),
    # Little-endian 16-bit mono at the bundle's rate (X-Voxport-Sample-Rate), not OpenAI's fixed 24 kHz.
    "pcm": OutputFormat("pcm", "application/octet-stream", "RAW", "PCM_16", True, "libsndfile"),
    "flac": OutputFormat("flac", "audio/flac", "FLAC", "PCM_16", False, "libsndfile built with libFLAC"),
    "mp3": OutputFormat("mp3", "audio/mpeg", "MP3", "MPEG_LAYER_III", False,
                        "libsndfile >= 1.1.0 built with LAME and mpg123"),
    "opus": OutputFormat("opus", "audio/ogg", "OGG", "OPUS", False, "libsndfile >= 1.0.29 built with libopus"),
}
# OpenAI's formats that no libsndfile writes: named so that asking for one says why, not just "invalid".
NEVER = {"aac": "AAC needs an AAC encoder (e.g. ffmpeg's); libsndfile has none"}


def missing(fmt: OutputFormat, sample_rate: int) -> str | None:
    """Why `fmt` cannot be encoded at `sample_rate` on this host, or None if it can."""
    version = f"this host's libsndfile {sf.__libsndfile_version__}"
    if fmt.container not in sf.available_formats() or fmt.subtype not in sf.available_subtypes(fmt.container):
        return f"{fmt.name} needs {fmt.needs}; {version} cannot write {fmt.container}/{fmt.subtype}"
    return None


def encoded_rate(fmt: OutputFormat, sample_rate: int) -> int:
    """The rate `fmt` is sent at: the bundle's, except Opus at the next rate it carries."""
    if fmt.subtype != "OPUS" or sample_rate in OPUS_RATES:
        return sample_rate
    return next((rate for rate in OPUS_RATES if rate >= sample_rate), OPUS_RATES[-1])


def supported(sample_rate: int) -> list[str]:
    return [name for name, fmt in FORMATS.items() if missing(fmt, sample_rate) is None]


def output_format(name: str, sample_rate: int) -> OutputFormat:
    """The format asked for, or UnsupportedFormat saying what it would need."""
    fmt = FORMATS.get(name)
    reason = NEVER.get(name) if fmt is None else missing(fmt, sample_rate)
    if fmt is None and reason is None:
        reason = f"unknown format {name!r}"
    if reason is not None:
        raise UnsupportedFormat(f"response_format {name}: {reason}; this server can answer in "
                                f"{', '.join(supported(sample_rate))}")
    assert fmt is not None
    return fmt


def encode(wav: np.ndarray, sample_rate: int, fmt: OutputFormat) -> bytes:
    """float waveform -> the file's bytes (clipped to [-1, 1]), at `encoded_rate`."""
    wav, rate = np.asarray(wav, dtype=np.float32), encoded_rate(fmt, sample_rate)
    if rate != sample_rate:
        import librosa  # only for opus at a rate it cannot carry; soxr, as uploads are resampled

        wav = librosa.resample(wav, orig_sr=sample_rate, target_sr=rate, res_type="soxr_hq")
    buffer = io.BytesIO()
    sf.write(buffer, np.clip(wav, -1.0, 1.0), rate, subtype=fmt.subtype, format=fmt.container)
    return buffer.getvalue()
