"""Streaming synthesis: audio chunks as soon as the decoder has produced enough frames.

The host loop runs step by step (`decoder_frames`, the same encoder/decoder-step calls, prenet
mask order and stop rule as `runtime.synthesizer_loop.run_host_loop`, so its frames are identical).
Two stages are not causal and get a window instead of the whole utterance:

- The postnet (a CBHG ending in a bidirectional GRU) runs on windows of new frames plus
  `postnet_context` frames of left context and `postnet_lookahead` frames of look-ahead; a window
  ends where the vocoder can run its next chunk (that chunk's frames plus `vocoder_context`).
  Trailing quiet frames are held back until a loud frame follows, so the trailing-silence trim of
  the one-shot path (drop final frames whose max < stop_threshold) also holds for the stream.
- The vocoder runs on each chunk with `vocoder_context` frames of context on both sides, and the
  samples of the context are cut off (trimming, not cross-fading: HiFi-GAN is convolutional, so
  with enough context the kept samples are what a one-shot pass gives, and no sample is weighted
  twice). The concatenated chunks are hop·T samples long, as the one-shot waveform.
- Chunks are `first_chunk_frames` long first, then double up to `chunk_frames`: the first audio
  waits for first_chunk_frames + vocoder_context + postnet_lookahead decoder frames, not for a
  whole chunk. A first chunk shorter than what the vocoder computes while it plays leaves a gap
  before the second (`voxport bench` reports these playback gaps beside time to first audio).

Speaking rate and pitch (`runtime.controls`) run between the two, on the stream of mel frames.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from voxport.errors import Cancelled, ConfigError
from voxport.models.prenet_masks import MaskSource, as_mask_source
from voxport.models.synthesizer_config import SynthesizerConfig
from voxport.models.synthesizer_io import STATE_NAMES, zero_decoder_state
from voxport.runtime.synthesizer_loop import Runner

log = logging.getLogger(__name__)

StopCheck = Callable[[], bool]


@dataclass(frozen=True)
class StreamConfig:
    chunk_frames: int = 32  # mel frames per emitted audio chunk (32 × 256 / 22050 Hz ≈ 0.37 s)
    postnet_context: int = 16
    postnet_lookahead: int = 16  # 8 frames: 48 dB mel SNR vs one-shot; 16: 73 dB (measured)
    # HiFi-GAN V1's receptive field reaches about ±13 frames; 12 leaves out only its outermost, near-zero
    # taps (real speech, FP32: 99 dB vs one-shot; 14: 100 dB; 8: 13 dB, measured).
    vocoder_context: int = 12
    # The first chunk's frames (then doubling up to chunk_frames): the first audio waits for this many
    # frames plus the contexts, not for a whole chunk. None: every chunk is chunk_frames long (whole-mel
    # chunked vocoding, where latency does not matter and every extra call costs 2 x vocoder_context).
    first_chunk_frames: int | None = None

    def __post_init__(self) -> None:
        if self.chunk_frames < 1 or min(self.postnet_context, self.postnet_lookahead, self.vocoder_context) < 0:
            raise ConfigError(f"stream config needs chunk_frames >= 1 and non-negative contexts, got {self}")
        if self.first_chunk_frames is not None and not 1 <= self.first_chunk_frames <= self.chunk_frames:
            raise ConfigError(f"stream config needs 1 <= first_chunk_frames <= chunk_frames, got {self}")


def chunk_sizes(scfg: StreamConfig) -> Iterator[int]:
    """Frames of each audio chunk in turn: first_chunk_frames, doubling up to chunk_frames, then that."""
    size = scfg.first_chunk_frames or scfg.chunk_frames
    while True:
        yield size
        size = min(scfg.chunk_frames, 2 * size)


def decoder_frames(
    run_encoder: Runner, run_decoder_step: Runner, ids: list[int], embedding: np.ndarray,
    style_idx: int, masks: MaskSource, cfg: SynthesizerConfig, max_steps: int,
    min_stop_token: float, should_stop: StopCheck | None = None,
) -> Iterator[np.ndarray]:
    """One fragment, batch 1: yield the decoder's (n_mels, r) frames step by step. `masks` is
    drawn as run_host_loop draws it: give both the same kind of source and seed to compare them."""
    masks = as_mask_source(masks)
    chars = np.asarray([ids], dtype=np.int64)
    n_text = chars.shape[1]
    encoded = run_encoder({
        "chars": chars, "speaker_embedding": np.asarray(embedding, dtype=np.float32).reshape(1, -1),
        "style_idx": np.asarray([style_idx], dtype=np.int64),
        "encoder_masks": masks.encoder(1, n_text, cfg)})
    state = zero_decoder_state(1, n_text, cfg)
    prev_frame = np.zeros((1, cfg.n_mels), dtype=np.float32)
    stop_level = np.float32(min_stop_token * 10.0)
    for step in range(max_steps):
        if should_stop is not None and should_stop():
            raise Cancelled("synthesis cancelled")
        out = run_decoder_step({
            "prev_frame": prev_frame, "decoder_masks": masks.decoder(1, cfg),
            **state, "encoder_seq": encoded["encoder_seq"],
            "encoder_seq_proj": encoded["encoder_seq_proj"], "chars": chars})
        mel_frames = out["mel_frames"]  # (1, n_mels, r)
        yield mel_frames[0]
        state = {name: out[f"{name}_out"] for name in STATE_NAMES}
        prev_frame = np.ascontiguousarray(mel_frames[:, :, -1])
        # The stop rule of run_host_loop, compared the same way (float32, stop·10 > level, t > 10).
        if step * mel_frames.shape[2] > 10 and bool(np.all(out["stop"].astype(np.float32) * 10 > stop_level)):
            return


def postnet_frames(frames: Iterable[np.ndarray], run_postnet: Runner, stop_threshold: float,
                   scfg: StreamConfig) -> Iterator[np.ndarray]:
    """Decoder frames of one fragment -> windowed postnet frames, trailing quiet frames trimmed.

    Windows end where `vocoded_chunks` can vocode a chunk: after each chunk's frames plus the
    vocoder's right context (the first window: first chunk + vocoder_context), so no chunk waits
    for more decoder steps than its own frames, its vocoder context and the postnet's look-ahead."""
    decoded: list[np.ndarray] = []
    sizes = chunk_sizes(scfg)
    end = next(sizes) + scfg.vocoder_context  # the end of the next window's kept frames
    total = done = 0
    held: list[np.ndarray] = []  # computed frames after the last loud one, released by a loud frame

    def window(upto: int, end: int) -> np.ndarray:
        start = max(0, done - scfg.postnet_context)
        mel = np.concatenate(decoded, axis=1)[:, start:end]
        post = run_postnet({"mel": np.ascontiguousarray(mel[None], dtype=np.float32)})["mel_post"][0]
        return post[:, done - start: upto - start]

    def release(segment: np.ndarray) -> Iterator[np.ndarray]:
        loud = np.flatnonzero(segment.max(axis=0) >= stop_threshold)
        if loud.size == 0:
            held.append(segment)
            return
        last = int(loud[-1]) + 1
        out = np.concatenate([*held, segment[:, :last]], axis=1)
        held[:] = [segment[:, last:]]
        yield out

    for frame in frames:
        decoded.append(frame)
        total += frame.shape[1]
        while total >= end + scfg.postnet_lookahead:
            segment = window(end, end + scfg.postnet_lookahead)
            done, end = end, end + next(sizes)
            yield from release(segment)
    if total > done:
        segment = window(total, total)
        done = total
        yield from release(segment)


def vocoded_chunks(mels: Iterable[np.ndarray], vocode: Callable[[np.ndarray], np.ndarray], hop: int,
                   scfg: StreamConfig) -> Iterator[np.ndarray]:
    """Mel frames in any pieces -> waveform chunks of hop·size samples, size following
    `chunk_sizes(scfg)` (the last chunk shorter or longer: what remains)."""
    ctx, sizes = scfg.vocoder_context, chunk_sizes(scfg)
    chunk = next(sizes)
    buf: np.ndarray | None = None
    start = done = 0  # absolute frame index of buf[:, 0]; frames whose samples were emitted

    def run(upto: int, end: int) -> np.ndarray:
        """Vocode frames [done − ctx, end) and keep the samples of frames [done, upto)."""
        nonlocal buf, start, done
        assert buf is not None
        lo = max(0, done - ctx)
        wav = vocode(np.ascontiguousarray(buf[:, lo - start: end - start]))
        keep = wav[(done - lo) * hop: (upto - lo) * hop]
        done = upto
        drop = max(0, done - ctx) - start
        buf, start = buf[:, drop:], start + drop
        return keep

    for mel in mels:
        if mel.shape[1] == 0:
            continue
        buf = mel if buf is None else np.concatenate([buf, mel], axis=1)
        while start + buf.shape[1] - done >= chunk + ctx:
            yield run(done + chunk, done + chunk + ctx)
            chunk = next(sizes)
    if buf is not None and start + buf.shape[1] > done:
        yield run(start + buf.shape[1], start + buf.shape[1])
