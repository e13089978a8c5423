"""The GE2E speaker encoder's numpy front end and config, without torch.

reference wav -> `preprocess_wav` (resample to 16 kHz, raise quiet audio to -30 dBFS, trim long
silences with WebRTC VAD) -> `wav_to_mel` (40-band power mel, not log) -> 160-frame partials
(`partial_mels`) -> the encoder graph, whichever backend runs it -> `mean_embedding`.

The serving runtime embeds references with this module and an exported encoder; the PyTorch
`SpeakerEncoder` in `models/speaker_encoder.py` re-exports everything here. Kept apart so that
serving ONNX or TensorRT artifacts never imports torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import _webrtcvad
import librosa
import numpy as np
from scipy.ndimage import binary_dilation

from voxport.errors import AudioError, ConfigError


@dataclass(frozen=True)
class SpeakerEncoderConfig:
    sample_rate: int = 16000
    n_fft: int = 400  # 25 ms window (window length = n_fft)
    hop: int = 160  # 10 ms
    n_mels: int = 40
    # librosa >= 0.9 zero-pads centred frames; the 2019 weights were trained with "reflect". The
    # golden reference (Resemblyzer under the installed librosa) uses "constant".
    stft_pad_mode: str = "constant"
    partial_frames: int = 160  # 1.6 s per partial utterance
    partial_step: int = 77  # Resemblyzer: round(16000 / 1.3 / 160); RTVC / MockingBird: 80
    min_pad_coverage: float = 0.75
    vad_window_ms: int = 30
    vad_moving_average_width: int = 8
    vad_max_silence_length: int = 6
    vad_mode: int = 3
    audio_norm_target_dbfs: float = -30.0
    min_voiced_s: float = 1.0  # shortest reference kept after VAD trimming
    l2_eps: float = 0.0  # Resemblyzer: 0; RTVC / MockingBird: 1e-5
    hidden: int = 256
    layers: int = 3
    embedding: int = 256

    def __post_init__(self) -> None:
        if self.sample_rate not in (8000, 16000, 32000, 48000):
            raise ConfigError(
                f"speaker encoder sample_rate {self.sample_rate}: WebRTC VAD needs 8/16/32/48 kHz"
            )
        if self.vad_window_ms not in (10, 20, 30):
            raise ConfigError(f"vad_window_ms {self.vad_window_ms}: WebRTC VAD takes 10, 20 or 30 ms")
        if not 0 <= self.vad_mode <= 3:
            raise ConfigError(f"vad_mode {self.vad_mode}: must be 0..3")
        if not 0 < self.partial_step <= self.partial_frames:
            raise ConfigError(f"partial_step {self.partial_step}: must be in 1..{self.partial_frames}")
        if not 0 < self.min_pad_coverage <= 1:
            raise ConfigError(f"min_pad_coverage {self.min_pad_coverage}: must be in (0, 1]")
        if self.l2_eps < 0 or self.min_voiced_s < 0:
            raise ConfigError("l2_eps and min_voiced_s must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpeakerEncoderConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown speaker encoder config key(s): {', '.join(unknown)}")
        return cls(**data)


class _WebRtcVad:
    """Voice flags from the `_webrtcvad` C extension, used directly on purpose.

    The Python wrapper `webrtcvad.py` is installed by two distributions (`webrtcvad` sdist and
    `webrtcvad-wheels`) that overwrite each other, and the sdist's version imports
    `pkg_resources`, which current setuptools no longer ships. Both ship the same `_webrtcvad`.
    """

    def __init__(self, mode: int) -> None:
        self._vad = _webrtcvad.create()
        _webrtcvad.init(self._vad)
        _webrtcvad.set_mode(self._vad, mode)

    def is_speech(self, pcm16: np.ndarray, sample_rate: int) -> bool:
        return bool(_webrtcvad.process(self._vad, sample_rate, pcm16.tobytes(), len(pcm16)))


def _normalize_volume(wav: np.ndarray, target_dbfs: float) -> np.ndarray:
    """Raise (never lower) the RMS level to `target_dbfs`, as the reference does."""
    rms = np.sqrt(np.mean((wav * 32767) ** 2))
    if rms == 0:
        raise AudioError("reference audio is silent (all samples are zero)")
    gain_db = target_dbfs - 20 * np.log10(rms / 32767)
    return wav if gain_db < 0 else wav * (10 ** (gain_db / 20))


def _moving_average(flags: np.ndarray, width: int) -> np.ndarray:
    padded = np.concatenate((np.zeros((width - 1) // 2), flags, np.zeros(width // 2)))
    acc = np.cumsum(padded, dtype=float)
    acc[width:] = acc[width:] - acc[:-width]
    return acc[width - 1 :] / width


def trim_long_silences(wav: np.ndarray, cfg: SpeakerEncoderConfig) -> np.ndarray:
    """Drop silences longer than `vad_max_silence_length` windows; the length becomes a multiple
    of the VAD window (30 ms = 480 samples)."""
    win = cfg.vad_window_ms * cfg.sample_rate // 1000
    wav = wav[: len(wav) - len(wav) % win]
    # The reference casts round(x * 32767) to int16 without clipping (wraps on overload); clipping
    # is identical in range and sane outside it.
    pcm = np.clip(np.round(wav * 32767), -32768, 32767).astype(np.int16)
    vad = _WebRtcVad(cfg.vad_mode)
    flags = np.array([vad.is_speech(pcm[i : i + win], cfg.sample_rate) for i in range(0, len(pcm), win)])
    if flags.size == 0:
        return wav[:0]
    mask = np.round(_moving_average(flags, cfg.vad_moving_average_width)).astype(bool)
    mask = binary_dilation(mask, np.ones(cfg.vad_max_silence_length + 1))
    return wav[np.repeat(mask, win)]


def preprocess_wav(wav: np.ndarray, source_sr: int, cfg: SpeakerEncoderConfig | None = None) -> np.ndarray:
    """Mono float wav at `source_sr` -> float32 wav at 16 kHz, level-raised and silence-trimmed.

    Raises AudioError if the input is empty, silent, not mono, or keeps less than
    `cfg.min_voiced_s` seconds after VAD trimming.
    """
    cfg = cfg or SpeakerEncoderConfig()
    wav = np.asarray(wav)
    if wav.ndim != 1:
        raise AudioError(f"reference audio must be mono (1-D), got shape {wav.shape}")
    if not np.issubdtype(wav.dtype, np.floating):
        raise AudioError(f"reference audio must be float samples in [-1, 1], got dtype {wav.dtype}")
    if wav.size == 0:
        raise AudioError("reference audio is empty")
    if not np.all(np.isfinite(wav)):
        raise AudioError("reference audio contains NaN or infinite samples")
    if source_sr <= 0:
        raise AudioError(f"invalid source sample rate {source_sr}")
    # The reference works on float32 throughout (librosa.load); float64 input would round differently.
    wav = wav.astype(np.float32, copy=False)
    if source_sr != cfg.sample_rate:
        wav = librosa.resample(wav, orig_sr=source_sr, target_sr=cfg.sample_rate, res_type="soxr_hq")
    wav = _normalize_volume(wav, cfg.audio_norm_target_dbfs)
    trimmed = trim_long_silences(wav, cfg)
    voiced_s = len(trimmed) / cfg.sample_rate
    if voiced_s < cfg.min_voiced_s:
        raise AudioError(
            f"reference audio has {voiced_s:.2f} s of voiced speech after VAD trimming "
            f"({len(wav) / cfg.sample_rate:.2f} s in all); at least {cfg.min_voiced_s:.2f} s is needed"
        )
    return trimmed.astype(np.float32, copy=False)


def wav_to_mel(wav: np.ndarray, cfg: SpeakerEncoderConfig | None = None) -> np.ndarray:
    """16 kHz wav -> (frames, n_mels) float32 power mel (not log); frames = 1 + len // hop."""
    cfg = cfg or SpeakerEncoderConfig()
    # Arguments spelled out so that a change of librosa defaults cannot change the features.
    mel = librosa.feature.melspectrogram(
        y=wav,
        sr=cfg.sample_rate,
        n_fft=cfg.n_fft,
        hop_length=cfg.hop,
        win_length=cfg.n_fft,
        window="hann",
        center=True,
        pad_mode=cfg.stft_pad_mode,
        power=2.0,
        n_mels=cfg.n_mels,
        fmin=0.0,
        fmax=cfg.sample_rate / 2,
        htk=False,
        norm="slaney",
    )
    return mel.astype(np.float32).T


def compute_partial_slices(
    n_samples: int, cfg: SpeakerEncoderConfig | None = None
) -> tuple[list[slice], list[slice]]:
    """(wav_slices, mel_slices) of the partial utterances; always at least one.

    The last partial is dropped when less than `min_pad_coverage` of it is real audio (unless it
    is the only one). Slices may reach past `n_samples`: pad the wav to `wav_slices[-1].stop`.
    """
    cfg = cfg or SpeakerEncoderConfig()
    n_frames = int(np.ceil((n_samples + 1) / cfg.hop))
    steps = max(1, n_frames - cfg.partial_frames + cfg.partial_step + 1)
    starts = range(0, steps, cfg.partial_step)
    mel_slices = [slice(i, i + cfg.partial_frames) for i in starts]
    wav_slices = [slice(s.start * cfg.hop, s.stop * cfg.hop) for s in mel_slices]
    last = wav_slices[-1]
    coverage = (n_samples - last.start) / (last.stop - last.start)
    if coverage < cfg.min_pad_coverage and len(mel_slices) > 1:
        mel_slices, wav_slices = mel_slices[:-1], wav_slices[:-1]
    return wav_slices, mel_slices


def partial_mels(wav: np.ndarray, cfg: SpeakerEncoderConfig | None = None) -> np.ndarray:
    """Preprocessed 16 kHz wav -> (n_partials, partial_frames, n_mels) float32 encoder input."""
    cfg = cfg or SpeakerEncoderConfig()
    if len(wav) == 0:
        raise AudioError("cannot embed an empty waveform")
    wav_slices, mel_slices = compute_partial_slices(len(wav), cfg)
    # One mel over the whole (padded) wav, then sliced: frame edges see real neighbours.
    wav = np.pad(wav, (0, max(0, wav_slices[-1].stop - len(wav))))
    mel = wav_to_mel(wav, cfg)
    return np.stack([mel[s] for s in mel_slices])


def mean_embedding(partials: np.ndarray) -> np.ndarray:
    """(n_partials, embedding) partial embeddings -> (embedding,) float32 unit vector (L2-normed mean)."""
    mean = np.asarray(partials).mean(axis=0)
    return (mean / np.linalg.norm(mean)).astype(np.float32)
