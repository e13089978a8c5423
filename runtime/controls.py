"""Synthesis controls applied to the mel before the vocoder: speaking rate and pitch.

Both work frame by frame or on a running stream of frames, so a streamed request and a one-shot
request with the same controls get the same mel (`change_rate(mel)` is `TimeResampler` pushed
once and flushed).

- Speaking rate: the mel is resampled in time by linear interpolation; output frame j is read at
  source position j·rate, so rate 2.0 halves the duration and rate 1.0 is the identity.
- Pitch: each frame's spectrum is warped along frequency, S'(f) = S(f / α) with α = 2^(s/12), by
  linear interpolation between the mel bins' centre frequencies (Hz); bins that would read outside
  the mel range get the domain's silence floor. It moves the harmonics and the spectral envelope
  together (formants shift too, like a tape-speed change with the tempo kept), which is what
  resampling-based waveform methods such as librosa.effects.pitch_shift do as well, and it needs
  no look-ahead, so streaming is unaffected.
"""

from __future__ import annotations

import logging
import math
from functools import lru_cache

import librosa
import numpy as np

from voxport.errors import ConfigError
from voxport.models.audio import MelConfig

log = logging.getLogger(__name__)

RATE_RANGE = (0.5, 2.0)
PITCH_RANGE_SEMITONES = (-12.0, 12.0)


def mel_floor(cfg: MelConfig) -> float:
    """The value a silent mel bin has in this mel domain (vocoder padding, pitch-warp fill)."""
    return float(np.log(1e-5)) if cfg.scale == "ln" else -float(cfg.max_abs_value)


class TimeResampler:
    """Incremental linear time resampling of (n_mels, T) mels; output frame j ↔ source j·rate."""

    def __init__(self, rate: float) -> None:
        if not RATE_RANGE[0] <= rate <= RATE_RANGE[1]:
            raise ConfigError(f"speaking rate must be in {RATE_RANGE[0]}..{RATE_RANGE[1]}, got {rate}")
        self.rate = float(rate)
        self._buf: np.ndarray | None = None  # source frames from absolute index self._start on
        self._start = 0
        self._next = 0  # index of the next output frame

    def _emit(self, last_source: int) -> np.ndarray:
        """Output frames whose interpolation needs source frames <= last_source."""
        assert self._buf is not None
        end = self._start + self._buf.shape[1]  # exclusive
        js = []
        while True:
            pos = self._next * self.rate
            lo = math.floor(pos)
            hi = lo + 1 if pos > lo else lo  # an exact position needs no right neighbour
            if hi > last_source or lo >= end:
                break
            js.append(pos)
            self._next += 1
        if not js:
            return self._buf[:, :0]
        pos = np.asarray(js)
        lo = np.floor(pos).astype(np.int64)
        frac = (pos - lo).astype(np.float32)
        hi = np.minimum(lo + 1, end - 1)
        a, b = self._buf[:, lo - self._start], self._buf[:, hi - self._start]
        out = a + (b - a) * frac[None, :]
        # Frames before floor(next position) are never read again.
        drop = min(math.floor(self._next * self.rate), end) - self._start
        if drop > 0:
            self._buf = self._buf[:, drop:]
            self._start += drop
        return out.astype(np.float32)

    def push(self, frames: np.ndarray) -> np.ndarray:
        """Add source frames (n_mels, k); return the output frames now computable (n_mels, k')."""
        frames = np.asarray(frames, dtype=np.float32)
        self._buf = frames if self._buf is None else np.concatenate([self._buf, frames], axis=1)
        if self.rate == 1.0:  # the identity: pass through without copying through the interpolator
            self._start += self._buf.shape[1]
            self._next = self._start
            out, self._buf = self._buf, self._buf[:, :0]
            return out
        return self._emit(self._start + self._buf.shape[1] - 1)

    def flush(self) -> np.ndarray:
        """The remaining output frames (positions up to the last source frame)."""
        if self._buf is None or self._buf.shape[1] == 0:
            return np.zeros((0 if self._buf is None else self._buf.shape[0], 0), dtype=np.float32)
        return self._emit(self._start + self._buf.shape[1] - 1)


def change_rate(mel: np.ndarray, rate: float) -> np.ndarray:
    """(n_mels, T) -> (n_mels, floor((T − 1) / rate) + 1): speaking rate by time resampling."""
    resampler = TimeResampler(rate)
    return np.concatenate([resampler.push(mel), resampler.flush()], axis=1)


@lru_cache(maxsize=32)
def _warp_matrix(n_mels: int, fmin: float, fmax: float, semitones: float) -> tuple[np.ndarray, np.ndarray]:
    """(W, fill): warped = W @ frame + fill · (1 − row sum of W), per frame."""
    # Centre frequencies of the mel filters (librosa's Slaney scale, as the mel basis).
    centres = librosa.mel_frequencies(n_mels + 2, fmin=fmin, fmax=fmax)[1:-1]
    alpha = 2.0 ** (semitones / 12.0)
    query = centres / alpha
    weights = np.zeros((n_mels, n_mels), dtype=np.float32)
    for k, q in enumerate(query):
        if q < centres[0] or q > centres[-1]:
            continue  # outside the mel range: silence floor
        i = min(int(np.searchsorted(centres, q, side="right")) - 1, n_mels - 2)
        t = (q - centres[i]) / (centres[i + 1] - centres[i])
        weights[k, i], weights[k, i + 1] = 1.0 - t, t
    return weights, 1.0 - weights.sum(axis=1)


def shift_pitch(mel: np.ndarray, semitones: float, cfg: MelConfig) -> np.ndarray:
    """Pitch shift by frequency warping of each mel frame (see the module docstring)."""
    if not PITCH_RANGE_SEMITONES[0] <= semitones <= PITCH_RANGE_SEMITONES[1]:
        raise ConfigError(f"pitch must be in {PITCH_RANGE_SEMITONES} semitones, got {semitones}")
    if semitones == 0.0:
        return mel
    weights, outside = _warp_matrix(mel.shape[0], float(cfg.fmin), float(cfg.fmax), float(semitones))
    return (weights @ mel + mel_floor(cfg) * outside[:, None]).astype(np.float32)


def apply_controls(mel: np.ndarray, rate: float, semitones: float, cfg: MelConfig) -> np.ndarray:
    """Speaking rate, then pitch: what the vocoder gets for a one-shot request."""
    return shift_pitch(change_rate(mel, rate), semitones, cfg)
