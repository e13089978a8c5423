"""The vocoder (HiFi-GAN): judged by copy synthesis of real recordings.

FP32 exports: waveform SNR against a float64 evaluation of the PyTorch weights (two float32
engines differ by summation order, ~90-110 dB apart on real clips) and MR-STFT distance.
Lossy artifacts: copy synthesis of held-out wideband recordings, log-mel distance increase and
wideband PESQ drop relative to the PyTorch FP32 original; waveform SNR is recorded, never gated
(bfloat16 scores 20-25 dB and is inaudible, naive INT8 12-15 dB and broken).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from voxport.errors import ConfigError
from voxport.evaluate import inputs, metrics, parity, quality
from voxport.evaluate.components.base import Component, Judgement, Runner, SearchJudge, TimingFeed
from voxport.evaluate.inputs import SpeechClip
from voxport.models import audio
from voxport.pipeline.records import Record


@dataclass(frozen=True)
class VocoderGate:
    max_log_mel_increase_db: float = 0.3
    max_pesq_drop: float = 0.1
    require_speedup: bool = False


@dataclass(frozen=True)
class VocoderTolerance:
    min_snr_db: float = 100.0  # waveform SNR of an FP32 export vs the float64 evaluation
    accept_torch_floor: bool = True  # ...or no further from float64 than PyTorch FP32 is, per clip
    torch_floor_slack_db: float = 6.0  # ...give or take this (two FP32 engines' summation orders)


class Vocoder(Component):
    name = "vocoder"
    graphs = ("vocoder",)
    precisions = ("int8-static", "bf16", "fp16", "fp32")  # fp32: a pruned model
    Gate = VocoderGate
    Tolerance = VocoderTolerance

    @property
    def mel_cfg(self) -> audio.MelConfig:
        """The mel domain of the original generator (the model's own config, not a copy of it)."""
        return self.reference_specs()["vocoder"].module.generator.cfg.mel

    def parity(self, runners: Mapping[str, Runner], reference: Record) -> Judgement:
        v = self.settings.validation
        clips = self.cached(f"parity_clips:{v.vocoder_clips}:{v.max_clip_seconds}", lambda: inputs.speech_clips(
            self.corpus, self.mel_cfg, v.vocoder_clips, v.max_clip_seconds))
        spec = self.specs_of(reference)["vocoder"]
        return parity.vocoder(spec, runners["vocoder"], inputs.vocoder_feeds(clips),
                              dataclasses.asdict(self.tolerance()))

    def gate_clips(self, split: str = "eval", seconds: float | None = None) -> list[SpeechClip]:
        """Real wideband recordings of `split` (native rate >= 16 kHz), cropped to whole frames."""
        seconds = self.settings.validation.gate_seconds if seconds is None else seconds
        return self.cached(f"gate_clips:{split}:{seconds}",
                           lambda: quality.gate_clips(self.corpus, self.mel_cfg, seconds, split))

    def baseline(self, clips: list[SpeechClip]) -> dict[str, Any]:
        """Copy synthesis of `clips` by the PyTorch FP32 original: computed once per build."""
        # Keyed by length too: the same recording is cropped differently by different judges.
        return self.cached(f"baseline:{self.source.sha256}:{[(c.id, len(c.wav)) for c in clips]}",
                           lambda: quality.copy_synthesis_quality(self.reference_runner("vocoder"), clips,
                                                                  self.mel_cfg.sample_rate))

    def listen(self, runners: Mapping[str, Runner], precision: str) -> Judgement:
        gate = self.gate(precision)
        clips = self.gate_clips()
        figures, failures, _ = quality.vocoder_gate(
            self.reference_runner("vocoder"), runners["vocoder"], clips, self.mel_cfg.sample_rate,
            _thresholds(gate), self.baseline(clips))
        return figures, failures

    def search_judge(self, graph: str, precision: str, margin: float, clips: int = 4,
                     seconds: float = 1.5, reference: Runner | None = None,
                     spent: Mapping[str, Any] | None = None) -> SearchJudge:
        """`reference`: what the budget is measured against (default the PyTorch FP32 original).
        `spent`: the gate figures that reference already uses against the original on held-out
        speech (a pruned parent's record); the budget is then `margin` of what the gate leaves."""
        return _VocoderSearch(self, self.gate(precision), margin, clips, seconds, reference, spent)

    def timing_feed(self, graph: str, seconds: float) -> TimingFeed:
        """`seconds` of one real held-out recording (the first real one long enough, by id)."""
        mel_cfg = self.mel_cfg
        items = sorted(self.corpus.items(split="eval"),
                       key=lambda i: (i.source == "espeak-ng", i.duration_s < seconds, i.id))
        wav = self.corpus.audio(items[0], mel_cfg.sample_rate)[: int(seconds * mel_cfg.sample_rate)]
        wav = wav[: len(wav) // mel_cfg.hop_length * mel_cfg.hop_length]
        mel = audio.mel_spectrogram(wav, mel_cfg)[None].astype(np.float32)
        return TimingFeed({"mel": mel}, len(wav) / mel_cfg.sample_rate, describe=f"{items[0].id} mel")

    def calibration_clips(self, n: int, seconds: float) -> list[SpeechClip]:
        """`n` real calibration clips of at least `seconds`, every one cropped to the same number of
        frames (ONNX Runtime's histogram calibrators fail on ragged inputs). Wideband recordings
        come first: most of the corpus is 8 kHz telephone speech, whose empty upper bands would
        under-state the activation ranges that held-out wideband speech reaches."""
        mel_cfg = self.mel_cfg
        frames = int(seconds * mel_cfg.sample_rate) // mel_cfg.hop_length
        pool = [*quality.gate_clips(self.corpus, mel_cfg, seconds, split="calib"),
                *inputs.speech_clips(self.corpus, mel_cfg, 4 * n, seconds, split="calib")]
        picked: dict[str, SpeechClip] = {}
        for clip in pool:
            if clip.id not in picked and clip.mel.shape[1] >= frames and len(picked) < n:
                picked[clip.id] = SpeechClip(clip.id, clip.wav[: frames * mel_cfg.hop_length], clip.mel[:, :frames])
        if not picked:
            raise ConfigError(f"no calibration clip of the calib split lasts {seconds} s")
        return list(picked.values())

    def training_clips(self, n: int, seconds: float) -> list[SpeechClip]:
        """Calibration speech for statistics and fine-tuning (never the held-out clips)."""
        return inputs.speech_clips(self.corpus, self.mel_cfg, n, seconds, split="calib")

    def drive(self, graph: str, run: Runner, n: int, seconds: float, steps: int) -> dict[str, Any]:
        clips = inputs.speech_clips(self.corpus, self.mel_cfg, n, seconds, split="calib")
        for feed in inputs.vocoder_feeds(clips):
            run(feed)
        return {"split": "calib", "clips": [c.id for c in clips]}

    def axis_lengths(self) -> tuple[dict[str, list[int]], dict[str, str]]:
        return _frames(self.corpus.items(), self.source.contract.get("mel") or {})

    def half_precision_proxy(self, graph: str, seconds: float) -> dict[str, Any]:
        from voxport.export.onnx import torch_half_runner, torch_runner

        spec = self.reference_specs()[graph]
        clip = inputs.speech_clips(self.corpus, self.mel_cfg, 1, seconds)[0]
        feed = {"mel": clip.mel[None].astype(np.float32)}
        ref, out = torch_runner(spec)(feed)["wav"], torch_half_runner(spec)(feed)["wav"]
        return {"input_seconds": round(len(clip.wav) / self.mel_cfg.sample_rate, 3), "clip": clip.id,
                "wav_snr_db_vs_fp32": metrics.snr_db(ref, out), "wav_max_abs_vs_fp32": metrics.max_abs_diff(ref, out)}

    def headline(self, figures: Mapping[str, Any]) -> str:
        if "log_mel_distance_increase_db" in figures:
            return f"log-mel +{figures['log_mel_distance_increase_db']:.2f} dB, PESQ drop {figures['pesq_drop']:.2f}"
        return f"wav SNR {figures.get('wav_snr_db_min', float('nan')):.1f} dB"


def _thresholds(gate: VocoderGate) -> dict[str, Any]:
    return {"max_log_mel_increase_db": gate.max_log_mel_increase_db, "max_pesq_drop": gate.max_pesq_drop,
            "require_speedup": gate.require_speedup}


def _frames(items: list, mel: Mapping[str, Any]) -> tuple[dict[str, list[int]], dict[str, str]]:
    """Mel frames of corpus recordings (the `frames` axis of the vocoder and the postnet)."""
    if not mel:
        return {}, {}
    frames = [int(i.duration_s * mel["sample_rate"]) // mel["hop_length"] + 1 for i in items]
    return {"frames": frames}, {"frames": f"mel frames ({mel['sample_rate']} Hz, hop {mel['hop_length']}) of "
                                          f"{len(items)} corpus recordings"}


class _VocoderSearch(SearchJudge):
    error_name = "log-mel distance vs FP32 output, one layer quantized (dB)"

    def __init__(self, vocoder: Vocoder, gate: VocoderGate, margin: float, clips: int, seconds: float,
                 reference: Runner | None = None, spent: Mapping[str, Any] | None = None) -> None:
        self.vocoder = vocoder
        self.clips = vocoder.gate_clips("calib", seconds)[:clips]
        self.rate = vocoder.mel_cfg.sample_rate
        # Pruning and INT8 share one gate: a parent that already spent part of it (as the gate
        # measured it, held out, vs the original) leaves the search only the rest. A parent that
        # scored better than FP32 spends nothing (no credit beyond the gate).
        spent = spent or {}

        def left(limit: float, figure: str) -> float:
            return max(0.0, limit - max(0.0, float(spent.get(figure, 0.0)))) * margin

        self.gate = {**_thresholds(gate),
                     "max_log_mel_increase_db": left(gate.max_log_mel_increase_db, "log_mel_distance_increase_db"),
                     "max_pesq_drop": left(gate.max_pesq_drop, "pesq_drop")}
        self.reference = reference
        self._reference_baseline: dict[str, Any] | None = None

    def evaluate(self, run_test: Runner) -> Judgement:
        if self.reference is None:
            run_ref, baseline = self.vocoder.reference_runner("vocoder"), self.vocoder.baseline(self.clips)
        else:  # the reference's copy synthesis once per search, not once per trial
            if self._reference_baseline is None:
                self._reference_baseline = quality.copy_synthesis_quality(self.reference, self.clips, self.rate)
            run_ref, baseline = self.reference, self._reference_baseline
        figures, failures, _ = quality.vocoder_gate(run_ref, run_test, self.clips, self.rate, self.gate, baseline)
        return {k: v for k, v in figures.items() if k != "gate"}, failures

    def error(self, figures: Mapping[str, Any]) -> float:
        return float(figures["log_mel_distance_increase_db"])
