"""Real inputs for validation and calibration: mels of held-out speech, real text and embeddings.

Never random tensors: on trained weights, random inputs hide exactly the errors that matter.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from voxport.evaluate.corpus import Corpus
from voxport.models import audio
from voxport.models import speaker_encoder as se


@dataclass(frozen=True)
class SpeechClip:
    """A real utterance at the vocoder's rate, with its mel: copy synthesis source and target."""

    id: str
    wav: np.ndarray  # float32, cropped
    mel: np.ndarray  # (n_mels, T) in the vocoder's mel domain


def speech_clips(
    corpus: Corpus, mel_cfg: audio.MelConfig, n: int, max_seconds: float, split: str = "eval"
) -> list[SpeechClip]:
    """Up to `n` clips from different speakers (round robin), cropped to whole frames."""
    items = _round_robin(corpus.items(split=split), n)
    clips = []
    for item in items:
        wav = corpus.audio(item, mel_cfg.sample_rate)[: int(max_seconds * mel_cfg.sample_rate)]
        wav = wav[: len(wav) // mel_cfg.hop_length * mel_cfg.hop_length]
        clips.append(SpeechClip(item.id, wav, audio.mel_spectrogram(wav, mel_cfg)))
    return clips


def vocoder_feeds(clips: list[SpeechClip]) -> list[dict[str, np.ndarray]]:
    return [{"mel": c.mel[None].astype(np.float32)} for c in clips]


def encoder_feeds(
    corpus: Corpus, cfg: se.SpeakerEncoderConfig, n: int, split: str = "eval"
) -> list[dict[str, np.ndarray]]:
    """Partial-utterance mel batches (P, 160, 40) of real, preprocessed speech."""
    feeds = []
    for item in _round_robin(corpus.items(split=split), n):
        wav = se.preprocess_wav(corpus.audio(item, cfg.sample_rate), cfg.sample_rate, cfg)
        feeds.append({"mels": se.partial_mels(wav, cfg).astype(np.float32)})
    return feeds


def _round_robin(items: list, n: int) -> list:
    """Spread picks over speakers so a handful of inputs still covers several voices."""
    by_speaker: dict[str, list] = {}
    for item in sorted(items, key=lambda i: i.id):
        by_speaker.setdefault(item.speaker, []).append(item)
    picked: list = []
    while len(picked) < n and any(by_speaker.values()):
        for speaker in sorted(by_speaker):
            if by_speaker[speaker] and len(picked) < n:
                picked.append(by_speaker[speaker].pop(0))
    return picked
