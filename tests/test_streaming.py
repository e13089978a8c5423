"""Streaming synthesis and the synthesis controls (runtime/streaming.py, runtime/controls.py)."""

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import librosa
import numpy as np
import pytest
from conftest import compose_config

from voxport.errors import ConfigError
from voxport.models import text as text_frontend
from voxport.models.audio import HIFIGAN_V1_22K
from voxport.models.prenet_masks import NumpyMasks
from voxport.runtime.controls import TimeResampler, change_rate, mel_floor, shift_pitch
from voxport.runtime.streaming import StreamConfig, chunk_sizes, decoder_frames, postnet_frames, vocoded_chunks
from voxport.runtime.synthesizer_loop import run_host_loop, trim_lengths


def _snr_db(ref: np.ndarray, x: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / max(np.sum((ref - x) ** 2), 1e-30)))


@pytest.mark.parametrize("rate", [0.5, 0.7, 1.0, 1.3, 2.0])
def test_time_resampler_streams_exactly_like_one_shot(rate: float) -> None:
    rng = np.random.default_rng(0)
    mel = rng.normal(size=(80, 97)).astype(np.float32)
    one_shot = change_rate(mel, rate)
    assert one_shot.shape == (80, int(np.floor(96 / rate)) + 1)
    resampler, pieces, i = TimeResampler(rate), [], 0
    for size in (1, 2, 5, 3, 30, 7, 49):
        pieces.append(resampler.push(mel[:, i:i + size]))
        i += size
    pieces.append(resampler.flush())
    np.testing.assert_array_equal(np.concatenate(pieces, axis=1), one_shot)
    # Output frame j is read at source position j·rate.
    j = one_shot.shape[1] // 2
    lo, frac = int(np.floor(j * rate)), j * rate - np.floor(j * rate)
    expected = mel[:, lo] if frac == 0 else mel[:, lo] * (1 - frac) + mel[:, lo + 1] * frac
    np.testing.assert_allclose(one_shot[:, j], expected, rtol=1e-5, atol=1e-5)


def test_controls_reject_out_of_range() -> None:
    with pytest.raises(ConfigError, match="speaking rate"):
        TimeResampler(2.5)
    with pytest.raises(ConfigError, match="pitch"):
        shift_pitch(np.zeros((80, 3), np.float32), 13.0, HIFIGAN_V1_22K)


def test_shift_pitch_moves_a_spectral_peak_by_the_interval() -> None:
    cfg = HIFIGAN_V1_22K
    centres = librosa.mel_frequencies(cfg.n_mels + 2, fmin=cfg.fmin, fmax=cfg.fmax)[1:-1]
    peak = int(np.argmin(np.abs(centres - 500.0)))
    # A smooth bump (a harmonic blurred by the mel filters), not a one-bin spike that a 2:1
    # compression of the frequency axis could step over.
    bump = np.exp(-0.5 * ((np.arange(cfg.n_mels) - peak) / 2.0) ** 2)
    frame = (mel_floor(cfg) * (1 - bump))[:, None].astype(np.float32)
    assert shift_pitch(frame, 0.0, cfg) is frame
    up = shift_pitch(frame, 12.0, cfg)  # one octave: the peak moves to about 2 × its frequency
    moved = centres[int(np.argmax(up[:, 0]))]
    assert abs(moved - 2 * centres[peak]) < 0.1 * 2 * centres[peak]
    down = shift_pitch(frame, -12.0, cfg)
    assert abs(centres[int(np.argmax(down[:, 0]))] - centres[peak] / 2) < 0.1 * centres[peak]
    assert np.isclose(up.min(), mel_floor(cfg))  # bins read from outside the range are silent


def test_vocoded_chunks_trim_the_context_exactly() -> None:
    hop, reach = 4, 3  # a toy "vocoder" whose samples depend on frames within ±3

    def vocode(mel: np.ndarray) -> np.ndarray:
        energy = mel.sum(axis=0)
        padded = np.pad(energy, reach)
        smooth = np.array([padded[i:i + 2 * reach + 1] @ np.arange(1, 2 * reach + 2) for i in range(len(energy))])
        return np.repeat(smooth, hop).astype(np.float32)

    rng = np.random.default_rng(1)
    mel = rng.normal(size=(5, 50)).astype(np.float32)
    cfg = StreamConfig(chunk_frames=8, vocoder_context=reach)
    chunks = list(vocoded_chunks((mel[:, i:i + 3] for i in range(0, 50, 3)), vocode, hop, cfg))
    # Full chunks while look-ahead exists; the rest (< chunk + context frames) comes at the end.
    assert [len(c) for c in chunks] == [8 * hop] * 5 + [10 * hop]
    np.testing.assert_allclose(np.concatenate(chunks), vocode(mel), rtol=1e-6)
    # Too little context is visibly different: the trim is what makes the stream exact.
    short = np.concatenate(list(vocoded_chunks([mel], vocode, hop, StreamConfig(chunk_frames=8, vocoder_context=1))))
    assert not np.allclose(short, vocode(mel))


def test_postnet_frames_trim_the_quiet_tail_like_the_one_shot_path() -> None:
    mel = np.full((4, 30), -10.0, np.float32)
    mel[:, :12] = 0.0
    mel[:, 17] = 0.0  # a loud frame after a quiet gap: the gap is kept, the tail after 17 is not
    identity = lambda feeds: {"mel_post": feeds["mel"]}  # noqa: E731
    cfg = StreamConfig(chunk_frames=4, postnet_context=2, postnet_lookahead=2)
    out = np.concatenate(list(postnet_frames((mel[:, i:i + 2] for i in range(0, 30, 2)), identity, -5.0, cfg)),
                         axis=1)
    assert out.shape[1] == trim_lengths(mel[None], -5.0)[0] == 18
    np.testing.assert_array_equal(out, mel[:, :18])


def test_stream_matches_the_one_shot_pipeline(bundle: Path) -> None:
    from voxport.runtime.cloner import VoiceCloner

    cloner = VoiceCloner(bundle, threads=1)
    try:
        rng = np.random.default_rng(2)
        embedding = rng.normal(size=256).astype(np.float32)
        embedding /= np.linalg.norm(embedding)
        ids = text_frontend.encode_text("stream me", cloner.synth_cfg.n_symbols)[0]
        b = cloner._backends
        reference = run_host_loop(b["synthesizer/encoder"].infer, b["synthesizer/decoder_step"].infer,
                                  b["synthesizer/postnet"].infer, np.asarray([ids]), embedding[None],
                                  np.asarray([0]), NumpyMasks(3), cloner.synth_cfg,
                                  max_decoder_steps=20)
        frames = list(decoder_frames(b["synthesizer/encoder"].infer, b["synthesizer/decoder_step"].infer, ids,
                                     embedding, 0, NumpyMasks(3), cloner.synth_cfg, 20, 0.5))
        np.testing.assert_array_equal(np.concatenate(frames, axis=1), reference.decoder_mel[0])

        one_shot = cloner.vocode(cloner.synthesize("stream me", embedding, seed=3, max_decoder_steps=20))
        cfg = StreamConfig(chunk_frames=8, postnet_context=16, postnet_lookahead=16, vocoder_context=12)
        chunks = list(cloner.stream("stream me", embedding, seed=3, max_decoder_steps=20, stream_cfg=cfg))
        assert len(chunks) >= 4
        streamed = np.concatenate(chunks)
        assert streamed.shape == one_shot.shape
        assert _snr_db(one_shot, streamed) > 40.0  # windowed postnet and chunked vocoder vs whole
    finally:
        cloner.close()


def _toy_vocoder(hop: int, reach: int):
    """A "vocoder" whose samples depend on the frames within ±reach (as HiFi-GAN's receptive field)."""
    def vocode(mel: np.ndarray) -> np.ndarray:
        energy = mel.sum(axis=0)
        padded = np.pad(energy, reach)
        smooth = np.array([padded[i:i + 2 * reach + 1] @ np.arange(1, 2 * reach + 2) for i in range(len(energy))])
        return np.repeat(smooth, hop).astype(np.float32)

    return vocode


def test_chunks_grow_from_a_small_first_chunk_and_stay_exact() -> None:
    hop, reach = 4, 3
    vocode = _toy_vocoder(hop, reach)
    mel = np.random.default_rng(3).normal(size=(5, 60)).astype(np.float32)
    cfg = StreamConfig(chunk_frames=16, vocoder_context=reach, first_chunk_frames=2)
    sizes = chunk_sizes(cfg)
    assert [next(sizes) for _ in range(6)] == [2, 4, 8, 16, 16, 16]
    chunks = list(vocoded_chunks((mel[:, i:i + 2] for i in range(0, 60, 2)), vocode, hop, cfg))
    assert [len(c) // hop for c in chunks] == [2, 4, 8, 16, 16, 14]
    np.testing.assert_allclose(np.concatenate(chunks), vocode(mel), rtol=1e-6)
    with pytest.raises(ConfigError, match="first_chunk_frames"):
        StreamConfig(chunk_frames=16, first_chunk_frames=17)
    with pytest.raises(ConfigError, match="first_chunk_frames"):
        StreamConfig(first_chunk_frames=0)


@pytest.mark.parametrize("first", [None, 8, 4])
def test_first_audio_waits_for_the_first_chunk_and_its_contexts_only(first: int | None) -> None:
    """Decoder frames consumed before the first audio chunk: the first chunk + the vocoder's right
    context + the postnet's look-ahead (not a whole chunk_frames chunk, nor a second postnet window)."""
    r, hop = 2, 4
    cfg = StreamConfig(chunk_frames=32, postnet_context=16, postnet_lookahead=16, vocoder_context=12,
                       first_chunk_frames=first)
    mel = np.zeros((3, 200), np.float32)  # loud (>= the stop threshold below): nothing is held back
    consumed = []

    def decoder() -> Iterator[np.ndarray]:
        for i in range(0, mel.shape[1], r):
            consumed.append(i + r)
            yield mel[:, i:i + r]

    identity = lambda feeds: {"mel_post": feeds["mel"]}  # noqa: E731
    chunks = vocoded_chunks(postnet_frames(decoder(), identity, -1.0, cfg), _toy_vocoder(hop, 3), hop, cfg)
    first_chunk = next(chunks)
    needed = (first or 32) + 12 + 16
    assert consumed[-1] == -(-needed // r) * r
    assert len(first_chunk) == (first or 32) * hop
    assert sum(len(c) for c in chunks) + len(first_chunk) == mel.shape[1] * hop


def test_stream_with_a_small_first_chunk_matches_the_one_shot_pipeline(bundle: Path) -> None:
    """Growing chunks keep the stream's bar: SNR > 40 dB vs one-shot through the whole pipeline."""
    from voxport.runtime.cloner import VoiceCloner

    cloner = VoiceCloner(bundle, threads=1)
    try:
        embedding = np.random.default_rng(4).normal(size=256).astype(np.float32)
        embedding /= np.linalg.norm(embedding)
        one_shot = cloner.vocode(cloner.synthesize("stream me", embedding, seed=3, max_decoder_steps=20))
        cfg = StreamConfig(chunk_frames=16, postnet_context=16, postnet_lookahead=16, vocoder_context=12,
                           first_chunk_frames=4)
        chunks = list(cloner.stream("stream me", embedding, seed=3, max_decoder_steps=20, stream_cfg=cfg))
        assert [len(c) // cloner.mel_cfg.hop_length for c in chunks[:3]] == [4, 8, 16]
        streamed = np.concatenate(chunks)
        assert streamed.shape == one_shot.shape
        assert _snr_db(one_shot, streamed) > 40.0
    finally:
        cloner.close()


def test_real_hifigan_vocodes_real_speech_in_growing_chunks_as_one_shot(bundle: Path, corpus) -> None:
    """The real HiFi-GAN (FP32 ONNX) vocodes 1 s of held-out speech in the service's chunks (8 frames,
    then 16, 32) as one shot does, to float32 summation order (98.5 dB measured): 12 frames of context
    cover its receptive field (about ±13 frames) but for its outermost, near-zero taps."""
    from voxport.models import audio
    from voxport.runtime.cloner import VocoderOnly

    vocoder = VocoderOnly(bundle, preference=["cpu"], strict=True, threads=1)
    item = next(i for i in corpus.items(split="eval") if i.source != "espeak-ng" and i.duration_s >= 1.0)
    mel = audio.mel_spectrogram(corpus.audio(item, vocoder.sample_rate)[: vocoder.sample_rate],
                                vocoder.mel_cfg).astype(np.float32)
    served = StreamConfig(chunk_frames=32, vocoder_context=12, first_chunk_frames=8)
    hop = vocoder.mel_cfg.hop_length
    pieces = list(vocoded_chunks((mel[:, i:i + 2] for i in range(0, mel.shape[1], 2)), vocoder.vocode, hop, served))
    assert [len(p) // hop for p in pieces[:3]] == [8, 16, 32]
    assert _snr_db(vocoder.vocode(mel), np.concatenate(pieces)) > 90.0


def test_the_service_and_the_bench_stream_with_the_configured_first_chunk() -> None:
    from voxport.benchmarks.run import plan_jobs, stream_settings
    from voxport.runtime.serve.settings import ServeSettings

    cfg = compose_config()
    settings = ServeSettings.from_cfg(cfg.serve, cfg.target)
    assert settings.stream.first_chunk_frames == 16 and settings.stream.chunk_frames == 32
    assert stream_settings(cfg) == dataclasses.asdict(settings.stream)
    jobs, _ = plan_jobs([], cfg.bench, Path("b"), Path("i"), 1, 1, cuda=False, providers=(),
                        stream=stream_settings(cfg))
    assert {j["kind"] for j in jobs} == {"pipeline"}
    assert all(j["stream"]["first_chunk_frames"] == 16 for j in jobs)


def test_playback_gaps_count_the_silence_after_each_late_chunk() -> None:
    from voxport.benchmarks.pipeline import stalls

    # played from 0.1 s: the 2nd chunk comes before the 1st has played, the 3rd 0.1 s after the 2nd ended
    assert stalls([0.1, 0.15, 0.5], [0.1, 0.2, 0.3]) == pytest.approx({"stall_ms": 100.0, "worst_gap_ms": 100.0})
    assert stalls([0.2, 0.5, 0.6], [0.1, 0.1, 0.1]) == pytest.approx({"stall_ms": 200.0, "worst_gap_ms": 200.0})
