"""Waveform I/O and the two mel front ends our vocoders were trained on.

- `HIFIGAN_V1_22K`: jik876/hifi-gan `meldataset.mel_spectrogram` (natural log of a magnitude mel,
  reflect padding of (n_fft - hop) / 2 on each side, STFT without centring) -> len(wav) // hop
  frames, so a vocoder producing hop samples per frame lines up with its input.
- `MOCKINGBIRD_16K`: the MockingBird / RTVC synthesizer mel of the pretrained era (preemphasis,
  librosa-centred STFT with reflect padding as librosa < 0.9 did, dB scale normalised to [-4, 4])
  -> 1 + len(wav) // hop frames.

Everything is numpy; librosa supplies the Slaney mel filterbank (the one both projects used),
the STFT and soxr resampling.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

import librosa
import numpy as np
import scipy.signal
import soundfile as sf

from voxport.errors import AudioError, ConfigError

log = logging.getLogger(__name__)

_SCALES = ("ln", "db_normalized")
_PADDINGS = ("jik876", "center_reflect")


@dataclass(frozen=True)
class MelConfig:
    """How a waveform becomes an (n_mels, T) mel spectrogram.

    scale: "ln" = natural log of the magnitude mel clamped at 1e-5 (jik876);
           "db_normalized" = 20*log10 magnitude mel minus `ref_level_db`, mapped linearly from
           [min_level_db, 0] dB to [-max_abs_value, max_abs_value] and clipped (MockingBird).
    padding: "jik876" = reflect-pad (n_fft - hop) / 2 per side, uncentred STFT, len // hop frames;
             "center_reflect" = librosa centred STFT, reflect pad n_fft / 2, 1 + len // hop frames.
    preemphasis: coefficient of the 1 - a z^-1 filter applied before the STFT (0.0 = none).
    """

    sample_rate: int
    n_fft: int
    hop_length: int
    win_length: int
    n_mels: int
    fmin: float
    fmax: float
    scale: str = "ln"
    preemphasis: float = 0.0
    padding: str = "jik876"
    ref_level_db: float = 20.0
    min_level_db: float = -100.0
    max_abs_value: float = 4.0

    def __post_init__(self) -> None:
        if self.scale not in _SCALES:
            raise ConfigError(f"mel scale must be one of {_SCALES}, got {self.scale!r}")
        if self.padding not in _PADDINGS:
            raise ConfigError(f"mel padding must be one of {_PADDINGS}, got {self.padding!r}")
        if not 0 < self.hop_length <= self.win_length <= self.n_fft:
            raise ConfigError(
                f"mel needs 0 < hop_length <= win_length <= n_fft, got hop {self.hop_length}, "
                f"win {self.win_length}, n_fft {self.n_fft}"
            )
        if self.padding == "jik876" and (self.n_fft - self.hop_length) % 2:
            raise ConfigError("jik876 padding needs n_fft - hop_length to be even")
        if not 0 <= self.fmin < self.fmax <= self.sample_rate / 2:
            raise ConfigError(
                f"mel needs 0 <= fmin < fmax <= sample_rate / 2, got {self.fmin}..{self.fmax} "
                f"at {self.sample_rate} Hz"
            )
        if not 0.0 <= self.preemphasis < 1.0:
            raise ConfigError(f"preemphasis must be in [0, 1), got {self.preemphasis}")

    def n_frames(self, n_samples: int) -> int:
        """Frames `mel_spectrogram` returns for a waveform of `n_samples` samples."""
        if self.padding == "jik876":
            return n_samples // self.hop_length
        return 1 + n_samples // self.hop_length

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown MelConfig field(s): {', '.join(unknown)}")
        return cls(**data)


HIFIGAN_V1_22K = MelConfig(22050, 1024, 256, 1024, 80, 0, 8000, "ln", 0.0)
MOCKINGBIRD_16K = MelConfig(
    16000, 800, 200, 800, 80, 55, 7600, "db_normalized", 0.97, padding="center_reflect"
)


def load_wav(source: str | Path | bytes, target_sr: int) -> np.ndarray:
    """Decode a file path or raw file bytes to mono float32 at `target_sr` (soxr resampling).

    Raises AudioError for unreadable or undecodable input, non-finite samples, or empty audio.
    """
    name = "<bytes>" if isinstance(source, bytes | bytearray) else str(source)
    handle = io.BytesIO(source) if isinstance(source, bytes | bytearray) else source
    try:
        data, sr = sf.read(handle, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AudioError(f"{name}: cannot decode audio ({first})") from None
    if data.size == 0:
        raise AudioError(f"{name}: the file holds no audio samples")
    # Channels are averaged rather than picking one: a stereo recording's left channel may be empty.
    wav = data.mean(axis=1)
    if not np.isfinite(wav).all():
        raise AudioError(f"{name}: audio contains NaN or infinite samples")
    if sr != target_sr:
        wav = librosa.resample(wav, orig_sr=sr, target_sr=target_sr, res_type="soxr_hq")
    log.debug("loaded %s: %d Hz -> %d Hz, %d samples", name, sr, target_sr, wav.shape[0])
    return np.ascontiguousarray(wav, dtype=np.float32)


def save_wav(path: str | Path, wav: np.ndarray, sr: int) -> None:
    """Write 16-bit PCM atomically (temp file beside `path`, then rename); clips to [-1, 1]."""
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim != 1:
        raise AudioError(f"save_wav expects a 1-D waveform, got shape {wav.shape}")
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        sf.write(tmp, np.clip(wav, -1.0, 1.0), sr, subtype="PCM_16", format="WAV")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@lru_cache(maxsize=8)
def _mel_basis(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    # librosa defaults (Slaney scale and area normalisation) are what jik876 and MockingBird used.
    return librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)


def mel_spectrogram(wav: np.ndarray, cfg: MelConfig) -> np.ndarray:
    """(n_mels, cfg.n_frames(len(wav))) float32 mel of a 1-D waveform at cfg.sample_rate."""
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim != 1:
        raise AudioError(f"mel_spectrogram expects a 1-D waveform, got shape {wav.shape}")
    if cfg.padding == "jik876":
        pad = (cfg.n_fft - cfg.hop_length) // 2
        if wav.shape[0] < max(cfg.hop_length, pad + 1):
            raise AudioError(f"waveform of {wav.shape[0]} samples is shorter than one frame")
    elif wav.shape[0] < cfg.n_fft // 2 + 1:
        raise AudioError(f"waveform of {wav.shape[0]} samples is shorter than half an FFT window")
    if cfg.preemphasis:
        # float64 from here on, as MockingBird's numpy pipeline ran (lfilter returns float64).
        wav = scipy.signal.lfilter([1.0, -cfg.preemphasis], [1.0], wav.astype(np.float64))

    if cfg.padding == "jik876":
        padded = np.pad(wav, (pad, pad), mode="reflect")
        spec = librosa.stft(
            padded,
            n_fft=cfg.n_fft,
            hop_length=cfg.hop_length,
            win_length=cfg.win_length,
            window="hann",
            center=False,
        )
        # jik876 adds 1e-9 under the square root (a gradient guard that also lifts silent bins).
        mag = np.sqrt(spec.real**2 + spec.imag**2 + 1e-9)
    else:
        spec = librosa.stft(
            wav,
            n_fft=cfg.n_fft,
            hop_length=cfg.hop_length,
            win_length=cfg.win_length,
            window="hann",
            center=True,
            pad_mode="reflect",
        )
        mag = np.abs(spec)

    mel = _mel_basis(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.fmin, cfg.fmax).astype(mag.dtype) @ mag
    if cfg.scale == "ln":
        out = np.log(np.maximum(mel, 1e-5))
    else:
        floor = 10.0 ** (cfg.min_level_db / 20.0)
        db = 20.0 * np.log10(np.maximum(mel, floor)) - cfg.ref_level_db
        scaled = 2 * cfg.max_abs_value * (db - cfg.min_level_db) / -cfg.min_level_db - cfg.max_abs_value
        out = np.clip(scaled, -cfg.max_abs_value, cfg.max_abs_value)
    expected = cfg.n_frames(wav.shape[0])
    if out.shape[1] != expected:  # a broken invariant, not bad input: the vocoder would misalign
        raise AssertionError(f"mel has {out.shape[1]} frames, expected {expected}")
    return np.ascontiguousarray(out, dtype=np.float32)
