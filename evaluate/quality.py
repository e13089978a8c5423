"""Listener-side quality gates and side-by-side timing, shared by every optimization stage.

Lossy precisions are judged against the ORIGINAL RECORDING, relative to the FP32 model: the
vocoder by copy synthesis (log-mel spectral distance increase, wideband PESQ drop), the speaker
encoder by embedding cosine and unchanged same/different-speaker decisions on held-out voices.
Waveform SNR against FP32 is recorded but never gates a vocoder: bfloat16 scores 20-25 dB and is
inaudible, naive INT8 scores 12-15 dB and is broken.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from voxport.evaluate import metrics
from voxport.evaluate.corpus import Corpus, CorpusItem
from voxport.evaluate.inputs import SpeechClip, speech_clips
from voxport.models import audio
from voxport.models import speaker_encoder as se
from voxport.runtime.backends.base import Runner

log = logging.getLogger(__name__)



# ---------------------------------------------------------------------------------------------
# Vocoder: copy synthesis of held-out real recordings


def gate_clips(corpus: Corpus, mel_cfg: audio.MelConfig, max_seconds: float = 3.0,
               split: str = "eval") -> list[SpeechClip]:
    """Held-out REAL recordings with content over the whole band (native rate >= 16 kHz)."""
    wideband = [i for i in corpus.items(split=split) if i.source != "espeak-ng"
                and getattr(i, "native_sample_rate", 0) >= 16000]
    clips = []
    for item in wideband:
        wav = corpus.audio(item, mel_cfg.sample_rate)[: int(max_seconds * mel_cfg.sample_rate)]
        wav = wav[: len(wav) // mel_cfg.hop_length * mel_cfg.hop_length]
        clips.append(SpeechClip(item.id, wav, audio.mel_spectrogram(wav, mel_cfg)))
    return clips or speech_clips(corpus, mel_cfg, 4, max_seconds, split)


def copy_synthesis_quality(run: Runner, clips: list[SpeechClip], sample_rate: int) -> dict[str, Any]:
    """Mean log-mel distance (dB) and wideband PESQ of copy synthesis against the recordings."""
    lsd, pesq, outputs = [], [], []
    for clip in clips:
        out = run({"mel": clip.mel[None].astype(np.float32)})["wav"].reshape(-1)
        outputs.append(out)
        lsd.append(metrics.log_mel_distance_db(clip.wav, out, sample_rate))
        pesq.append(metrics.pesq_wb(clip.wav, out, sample_rate))
    return {"log_mel_distance_db": float(np.mean(lsd)), "pesq_wb": float(np.mean(pesq)),
            "per_clip": {c.id: {"log_mel_distance_db": a, "pesq_wb": b}
                         for c, a, b in zip(clips, lsd, pesq, strict=True)},
            "_outputs": outputs}


def vocoder_gate(run_fp32: Runner, run_test: Runner, clips: list[SpeechClip], sample_rate: int,
                 gate: Mapping[str, Any], baseline: dict[str, Any] | None = None,
                 ) -> tuple[dict[str, Any], list[str], dict[str, Any]]:
    """(figures, failures, baseline): quality relative to FP32, plus SNR/MR-STFT vs FP32 (recorded)."""
    baseline = baseline or copy_synthesis_quality(run_fp32, clips, sample_rate)
    test = copy_synthesis_quality(run_test, clips, sample_rate)
    snr = [metrics.snr_db(a, b) for a, b in zip(baseline["_outputs"], test["_outputs"], strict=True)]
    stft = [metrics.mr_stft_distance(a, b) for a, b in zip(baseline["_outputs"], test["_outputs"], strict=True)]
    figures = {
        "clips": [c.id for c in clips],
        "fp32_log_mel_distance_db": baseline["log_mel_distance_db"],
        "log_mel_distance_db": test["log_mel_distance_db"],
        "log_mel_distance_increase_db": test["log_mel_distance_db"] - baseline["log_mel_distance_db"],
        "fp32_pesq_wb": baseline["pesq_wb"],
        "pesq_wb": test["pesq_wb"],
        "pesq_drop": baseline["pesq_wb"] - test["pesq_wb"],
        "wav_snr_db_vs_fp32_min": min(snr),
        "mr_stft_distance_vs_fp32_max": max(stft),
        "gate": dict(gate),
    }
    failures = []
    if figures["log_mel_distance_increase_db"] > gate["max_log_mel_increase_db"]:
        failures.append(f"log-mel distance +{figures['log_mel_distance_increase_db']:.2f} dB vs FP32 "
                        f"> {gate['max_log_mel_increase_db']:.3g} dB")
    if figures["pesq_drop"] > gate["max_pesq_drop"]:
        failures.append(f"PESQ drop {figures['pesq_drop']:.2f} vs FP32 > {gate['max_pesq_drop']:.3g}")
    return figures, failures, baseline


# ---------------------------------------------------------------------------------------------
# Speaker encoder: embeddings and same/different-speaker decisions on held-out voices


def encoder_gate_items(corpus: Corpus, split: str = "eval") -> list[CorpusItem]:
    """Held-out real recordings of speakers with at least two clips (so 'same' pairs exist)."""
    real = [i for i in corpus.items(split=split) if i.source != "espeak-ng"]
    counts: dict[str, int] = {}
    for item in real:
        counts[item.speaker] = counts.get(item.speaker, 0) + 1
    return [i for i in real if counts[i.speaker] >= 2] + [i for i in real if counts[i.speaker] == 1]


def encoder_feeds_for(corpus: Corpus, items: list[CorpusItem], cfg: se.SpeakerEncoderConfig) -> list[np.ndarray]:
    feeds = []
    for item in items:
        wav = se.preprocess_wav(corpus.audio(item, cfg.sample_rate), cfg.sample_rate, cfg)
        feeds.append(se.partial_mels(wav, cfg).astype(np.float32))
    return feeds


def _utterance(run: Runner, mels: np.ndarray) -> np.ndarray:
    partials = run({"mels": mels})["embeddings"]
    mean = partials.mean(axis=0)
    return mean / np.linalg.norm(mean)


def encoder_gate(run_fp32: Runner, run_test: Runner, items: list[CorpusItem], feeds: list[np.ndarray],
                 gate: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    ref = np.stack([_utterance(run_fp32, m) for m in feeds])
    test = np.stack([_utterance(run_test, m) for m in feeds])
    cos = [metrics.cosine(a, b) for a, b in zip(ref, test, strict=True)]
    threshold = float(gate["same_speaker_threshold"])
    changed, pairs = [], 0
    for i, j in itertools.combinations(range(len(items)), 2):
        pairs += 1
        same_ref, same_test = ref[i] @ ref[j] >= threshold, test[i] @ test[j] >= threshold
        if same_ref != same_test:
            changed.append(f"{items[i].id}~{items[j].id}: {ref[i] @ ref[j]:.3f} -> {test[i] @ test[j]:.3f}")
    figures = {"utterances": len(items), "embedding_cosine_min": min(cos), "embedding_cosine_mean": float(np.mean(cos)),
               "speaker_pairs": pairs, "decisions_changed": len(changed), "changed_pairs": changed[:10],
               "gate": dict(gate)}
    failures = []
    if figures["embedding_cosine_min"] < gate["min_cosine"]:
        failures.append(f"embedding cosine {figures['embedding_cosine_min']:.4f} vs FP32 < {gate['min_cosine']:.6g}")
    if changed:
        failures.append(f"{len(changed)} of {pairs} same/different-speaker decisions changed "
                        f"(threshold {threshold}): {changed[0]}")
    return figures, failures
