"""Wav I/O and the two mel front ends (jik876 HiFi-GAN, MockingBird synthesizer).

tests/data/mel_golden.json was made by a throwaway script outside the repo that ran the reference
front ends themselves (jik876/hifi-gan `meldataset.mel_spectrogram` with torch.stft center=False,
and MockingBird `synthesizer/audio.melspectrogram` with the pretrained-era hparams, librosa
centred STFT with reflect padding) on `_test_signal` below; see its "how" field.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from voxport.errors import AudioError, ConfigError
from voxport.models.audio import (
    HIFIGAN_V1_22K,
    MOCKINGBIRD_16K,
    MelConfig,
    load_wav,
    mel_spectrogram,
    save_wav,
)

GOLDEN = Path(__file__).parent / "data" / "mel_golden.json"
PRESETS = {"hifigan_v1_22k": HIFIGAN_V1_22K, "mockingbird_16k": MOCKINGBIRD_16K}


def _test_signal(sr: int, seconds: float) -> np.ndarray:
    """Closed-form signal (no RNG): modulated 220 Hz tone, a chirp, and a 3.1 kHz tone in the 2nd half."""
    t = np.arange(int(sr * seconds)) / sr
    x = 0.4 * np.sin(2 * np.pi * 220 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    x += 0.2 * np.sin(2 * np.pi * (300 * t + 1500 * t * t))
    x += 0.05 * np.sin(2 * np.pi * 3100 * t) * (t > seconds / 2)
    return x.astype(np.float32)


def golden_seconds() -> float:
    return json.loads(GOLDEN.read_text())["signal_seconds"]


def _write(path: Path, data: np.ndarray, sr: int, subtype: str = "PCM_16") -> Path:
    sf.write(path, data, sr, subtype=subtype)
    return path


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_mel_matches_reference_front_end(name):
    golden = json.loads(GOLDEN.read_text())[name]
    cfg = PRESETS[name]
    mel = mel_spectrogram(_test_signal(cfg.sample_rate, golden_seconds()), cfg)
    assert mel.dtype == np.float32
    assert list(mel.shape) == golden["shape"]
    ref = np.asarray(golden["values"], dtype=np.float64).T  # (n_mels, len(frames))
    # First/last frames check the padding; the middle one the STFT, filterbank and scale.
    np.testing.assert_allclose(mel[:, golden["frames"]], ref, atol=1e-3)
    assert mel.mean() == pytest.approx(golden["mean"], abs=1e-4)


@pytest.mark.parametrize("n", [385, 512, 1000, 22050, 22050 + 255, 22050 + 256])
def test_jik876_frames_are_len_div_hop(n):
    mel = mel_spectrogram(_test_signal(22050, 1.1)[:n], HIFIGAN_V1_22K)
    assert mel.shape == (80, n // 256)
    assert HIFIGAN_V1_22K.n_frames(n) == n // 256


@pytest.mark.parametrize("n", [801, 1600, 16000 + 199])
def test_mockingbird_frames_are_centred(n):
    mel = mel_spectrogram(_test_signal(16000, 1.1)[:n], MOCKINGBIRD_16K)
    assert mel.shape == (80, 1 + n // 200)
    assert mel.min() >= -4.0 and mel.max() <= 4.0


def test_mockingbird_mel_uses_preemphasis():
    x = _test_signal(16000, 0.5)
    plain = mel_spectrogram(x, dataclasses.replace(MOCKINGBIRD_16K, preemphasis=0.0))
    emph = mel_spectrogram(x, MOCKINGBIRD_16K)
    # 0.97 preemphasis attenuates the 220 Hz region by ~25 dB: the low bins must drop clearly.
    assert (plain[:8] - emph[:8]).mean() > 0.5


@pytest.mark.parametrize("cfg", [HIFIGAN_V1_22K, MOCKINGBIRD_16K])
def test_too_short_or_not_1d_is_an_audio_error(cfg):
    with pytest.raises(AudioError, match="shorter"):
        mel_spectrogram(np.zeros(100, np.float32), cfg)
    with pytest.raises(AudioError, match="1-D"):
        mel_spectrogram(np.zeros((2, 4000), np.float32), cfg)


def test_mel_config_dict_round_trip_and_validation():
    for cfg in PRESETS.values():
        data = json.loads(json.dumps(cfg.to_dict()))
        assert MelConfig.from_dict(data) == cfg
    with pytest.raises(ConfigError, match="scale"):
        dataclasses.replace(HIFIGAN_V1_22K, scale="log10")
    with pytest.raises(ConfigError, match="padding"):
        dataclasses.replace(HIFIGAN_V1_22K, padding="zeros")
    with pytest.raises(ConfigError, match="fmax"):
        dataclasses.replace(MOCKINGBIRD_16K, fmax=9000)
    with pytest.raises(ConfigError, match="unknown"):
        MelConfig.from_dict({**HIFIGAN_V1_22K.to_dict(), "hop_size": 256})


def test_load_wav_path_and_bytes_resampled_mono(tmp_path):
    sig = _test_signal(16000, 1.0)
    path = _write(tmp_path / "a.wav", np.stack([sig, 0.5 * sig], axis=1), 16000, "FLOAT")
    from_path = load_wav(path, 22050)
    from_bytes = load_wav(path.read_bytes(), 22050)
    assert from_path.dtype == np.float32 and from_path.ndim == 1
    assert len(from_path) == 22050
    np.testing.assert_array_equal(from_path, from_bytes)
    # Mono = channel mean (0.75 * sig); soxr keeps a 220-3100 Hz signal's level.
    native = load_wav(path, 16000)
    np.testing.assert_allclose(native, 0.75 * sig, atol=1e-6)
    assert np.sqrt(np.mean(from_path**2)) == pytest.approx(np.sqrt(np.mean(native**2)), rel=0.01)


def test_load_wav_errors(tmp_path):
    with pytest.raises(AudioError, match="cannot decode"):
        load_wav(b"this is not a wav file at all", 16000)
    with pytest.raises(AudioError, match="cannot decode"):
        load_wav(tmp_path / "missing.wav", 16000)
    empty = _write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    with pytest.raises(AudioError, match="no audio"):
        load_wav(empty, 16000)
    nan = _write(tmp_path / "nan.wav", np.array([0.0, np.nan, 0.1], np.float32), 16000, "FLOAT")
    with pytest.raises(AudioError, match="NaN"):
        load_wav(nan, 16000)


def test_save_wav_pcm16_atomic_and_clipped(tmp_path):
    out = tmp_path / "out.wav"
    out.write_bytes(b"old content")  # replaced, not appended to
    sig = _test_signal(22050, 0.3)
    sig[:10] = 1.7  # out of range: clipped, not wrapped around
    save_wav(out, sig, 22050)
    info = sf.info(out)
    assert (info.samplerate, info.channels, info.subtype) == (22050, 1, "PCM_16")
    back, _ = sf.read(io.BytesIO(out.read_bytes()), dtype="float32")
    np.testing.assert_allclose(back[:10], 32767 / 32768, atol=1e-6)
    np.testing.assert_allclose(back[10:], sig[10:], atol=1 / 32768 + 1e-7)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.wav"]  # no temp file left behind
    with pytest.raises(AudioError, match="1-D"):
        save_wav(tmp_path / "x.wav", np.zeros((2, 10), np.float32), 22050)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.wav"]
