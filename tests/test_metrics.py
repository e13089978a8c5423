"""Parity and quality metrics, on real speech from the corpus wherever audio is involved."""

from __future__ import annotations

import numpy as np
import pytest

from voxport.evaluate.corpus import Corpus
from voxport.evaluate.metrics import (
    SNR_CAP_DB,
    cosine,
    log_mel_distance_db,
    max_abs_diff,
    mel_l1,
    mr_stft_distance,
    pesq_wb,
    snr_db,
    stop_step_agreement,
)


@pytest.fixture(scope="module")
def speech(corpus: Corpus) -> np.ndarray:
    """A held-out, wideband (16 kHz-native) real recording at 16 kHz, float64."""
    item = next(it for it in corpus.items("eval", lang="en")
                if it.source != "espeak-ng" and it.native_sample_rate >= 16000 and it.duration_s >= 3)
    return corpus.audio(item, 16000).astype(np.float64)


def _with_noise(x: np.ndarray, snr: float, seed: int = 0) -> np.ndarray:
    """x plus white noise scaled so that the SNR is exactly `snr` dB."""
    noise = np.random.default_rng(seed).standard_normal(x.shape)
    return x + noise * np.sqrt(np.sum(x**2) / np.sum(noise**2) / 10 ** (snr / 10))


def test_snr_of_identical_signals_is_the_finite_cap(speech: np.ndarray) -> None:
    assert snr_db(speech, speech.copy()) == SNR_CAP_DB
    assert snr_db(np.zeros(8), np.ones(8)) == -SNR_CAP_DB


@pytest.mark.parametrize("target", [0.0, 10.0, 25.0, 40.0])
def test_snr_recovers_a_known_noise_level(speech: np.ndarray, target: float) -> None:
    noisy = _with_noise(speech, target)
    assert snr_db(speech, noisy) == pytest.approx(target, abs=0.1)
    # float32 inputs and any shape (flattened) give the same number.
    n = speech.size // 2 * 2
    shaped = snr_db(speech[:n].reshape(2, -1).astype(np.float32), noisy[:n].reshape(2, -1))
    assert shaped == pytest.approx(snr_db(speech[:n], noisy[:n]), abs=0.01)


def test_size_mismatch_and_empty_input_raise() -> None:
    with pytest.raises(ValueError, match="sizes differ"):
        snr_db(np.ones(10), np.ones(11))
    with pytest.raises(ValueError, match="empty"):
        cosine(np.ones(0), np.ones(0))
    with pytest.raises(ValueError, match="sizes differ"):
        max_abs_diff(np.ones(3), np.ones(4))


def test_cosine_and_max_abs_diff() -> None:
    v = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    assert cosine(v, v * 3.0) == pytest.approx(1.0, abs=1e-12)
    assert cosine(v, -v) == pytest.approx(-1.0, abs=1e-12)
    assert cosine([1.0, 0.0], [0.0, 2.0]) == 0.0
    assert cosine(np.zeros(3), np.zeros(3)) == 1.0 and cosine(np.zeros(3), np.ones(3)) == 0.0
    w = v.copy()
    w[2, 5] += 0.25
    assert max_abs_diff(v, w) == pytest.approx(0.25, abs=1e-6)
    assert cosine(v, w) < 1.0


def test_mel_l1_needs_identical_shapes() -> None:
    a = np.zeros((80, 10))
    assert mel_l1(a, a + 0.5) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="shapes differ"):
        mel_l1(a, np.zeros((10, 80)))


def test_mr_stft_is_zero_for_itself_and_grows_with_noise(speech: np.ndarray) -> None:
    assert mr_stft_distance(speech, speech) == 0.0
    # A vocoder's few extra samples are cropped away, not counted.
    assert mr_stft_distance(speech, np.concatenate([speech, np.full(200, 0.3)])) == 0.0
    values = [mr_stft_distance(speech, _with_noise(speech, snr)) for snr in (40, 25, 10, 0)]
    assert all(a < b for a, b in zip(values, values[1:], strict=False)), values
    assert values[0] > 0.1


def test_length_difference_beyond_padding_is_an_error(speech: np.ndarray) -> None:
    with pytest.raises(ValueError, match="lengths"):
        mr_stft_distance(speech, speech[: speech.size // 2])
    with pytest.raises(ValueError, match="1-D"):
        log_mel_distance_db(speech[None, :], speech[None, :], 16000)


def test_log_mel_distance_is_monotone_in_noise_and_scale_invariant(speech: np.ndarray) -> None:
    assert log_mel_distance_db(speech, speech, 16000) == 0.0
    values = [log_mel_distance_db(speech, _with_noise(speech, snr), 16000) for snr in (40, 30, 20, 10, 0)]
    assert all(a < b for a, b in zip(values, values[1:], strict=False)), values
    # White noise at 0 dB SNR buries speech: far beyond the ~6-10 dB of a broken vocoder.
    assert values[-1] > 15.0
    noisy = _with_noise(speech, 20)
    assert log_mel_distance_db(0.5 * speech, 0.5 * noisy, 16000) == pytest.approx(values[2], abs=1e-6)


def test_log_mel_distance_rejects_a_silent_reference_and_propagates_nan(speech: np.ndarray) -> None:
    with pytest.raises(ValueError, match="silent"):
        log_mel_distance_db(np.zeros(16000), speech[:16000], 16000)
    broken = speech.copy()
    broken[1000] = np.nan
    assert np.isnan(log_mel_distance_db(speech, broken, 16000))


def test_pesq_of_itself_is_excellent_and_of_heavy_noise_is_poor(speech: np.ndarray) -> None:
    assert pesq_wb(speech, speech, 16000) > 4.0
    assert pesq_wb(speech, _with_noise(speech, 0), 16000) < 2.5
    mild = pesq_wb(speech, _with_noise(speech, 30), 16000)
    heavy = pesq_wb(speech, _with_noise(speech, 10), 16000)
    assert 4.0 > mild > heavy


def test_pesq_resamples_other_rates(corpus: Corpus) -> None:
    item = corpus.items("eval", speaker="allison")[0]
    x = corpus.audio(item, 22050).astype(np.float64)
    assert pesq_wb(x, x, 22050) > 4.0
    assert pesq_wb(x, _with_noise(x, 0), 22050) < 2.5


def test_pesq_on_silence_raises_a_clear_error() -> None:
    with pytest.raises(ValueError, match="no utterances"):
        pesq_wb(np.zeros(32000), np.zeros(32000), 16000)


def test_stop_step_agreement() -> None:
    ref = np.array([0.01, 0.2, 0.49, 0.51, 0.9, 1.0])
    assert stop_step_agreement(ref, ref) == 1.0
    test = np.array([0.01, 0.6, 0.49, 0.4, 0.9, 1.0])  # steps 1 and 3 flip
    assert stop_step_agreement(ref, test) == pytest.approx(4 / 6)
    assert stop_step_agreement(ref, test, threshold=0.7) == 1.0
    with pytest.raises(ValueError, match="sigmoid"):
        stop_step_agreement(np.array([-3.0, 4.0]), np.array([0.1, 0.9]))
