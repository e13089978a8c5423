"""The speaker encoder (GE2E): judged by its embeddings of real voices.

FP32 exports: partial- and utterance-embedding cosine against PyTorch. Lossy artifacts: embedding
cosine vs FP32 and unchanged same/different-speaker decisions over every pair of held-out real
recordings (speakers with at least two clips first, so 'same' pairs exist).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from voxport.errors import AudioError
from voxport.evaluate import inputs, metrics, parity, quality
from voxport.evaluate.components.base import Component, Judgement, Runner, SearchJudge, TimingFeed, log
from voxport.models import speaker_encoder as se
from voxport.pipeline.records import Record


@dataclass(frozen=True)
class EncoderGate:
    min_cosine: float = 0.995
    same_speaker_threshold: float = 0.75
    require_speedup: bool = False


@dataclass(frozen=True)
class EncoderTolerance:
    min_cosine: float = 0.99999


class SpeakerEncoder(Component):
    name = "speaker_encoder"
    graphs = ("speaker_encoder",)
    precisions = ("int8-dynamic", "fp16")
    Gate = EncoderGate
    Tolerance = EncoderTolerance

    @property
    def cfg(self) -> se.SpeakerEncoderConfig:
        return self.reference_specs()["speaker_encoder"].module.encoder.cfg

    def parity(self, runners: Mapping[str, Runner], reference: Record) -> Judgement:
        n = self.settings.validation.encoder_clips
        feeds = self.cached(f"parity_feeds:{n}", lambda: inputs.encoder_feeds(self.corpus, self.cfg, n))
        return parity.speaker_encoder(self.specs_of(reference)["speaker_encoder"], runners["speaker_encoder"],
                                      feeds, {"min_cosine": self.tolerance().min_cosine})

    def gate_inputs(self, split: str) -> tuple[list[Any], list[np.ndarray]]:
        """Real recordings of `split` and their partial mels, without the ones too short to embed
        (a 1 s clip keeps 0.66 s after VAD trimming, below the encoder's minimum)."""
        def make() -> tuple[list[Any], list[np.ndarray]]:
            items, feeds = [], []
            for item in quality.encoder_gate_items(self.corpus, split):
                try:
                    feeds += quality.encoder_feeds_for(self.corpus, [item], self.cfg)
                except AudioError as exc:
                    log.info("encoder gate: %s left out (%s)", item.id, exc)
                    continue
                items.append(item)
            return items, feeds

        return self.cached(f"gate_inputs:{split}", make)

    def fp32_runner(self) -> Runner:
        """The PyTorch FP32 embeddings of the (fixed, memoised) gate feeds, computed once per build."""
        run, outputs = self.reference_runner("speaker_encoder"), self.cached("fp32_outputs", dict)

        def go(feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            key = id(feed["mels"])  # gate feeds live in the memo for the whole build
            if key not in outputs:
                outputs[key] = run(feed)
            return outputs[key]

        return go

    def judge(self, run_test: Runner, split: str, gate: EncoderGate, margin: float = 1.0) -> Judgement:
        thresholds = {"min_cosine": 1.0 - (1.0 - gate.min_cosine) * margin,
                      "same_speaker_threshold": gate.same_speaker_threshold, "require_speedup": gate.require_speedup}
        items, feeds = self.gate_inputs(split)
        figures, failures = quality.encoder_gate(self.fp32_runner(), run_test, items, feeds, thresholds)
        return {**figures, "split": split}, failures

    def listen(self, runners: Mapping[str, Runner], precision: str) -> Judgement:
        return self.judge(runners["speaker_encoder"], "eval", self.gate(precision))

    def search_judge(self, graph: str, precision: str, margin: float, **_: Any) -> SearchJudge:
        return _EncoderSearch(self, self.gate(precision), margin)

    def timing_feed(self, graph: str, seconds: float) -> TimingFeed:
        """The longest held-out utterance of the gate (the encoder embeds whole references)."""
        items, feeds = self.gate_inputs("eval")
        longest = max(range(len(items)), key=lambda i: (len(feeds[i]), items[i].id))
        return TimingFeed({"mels": feeds[longest]}, float(items[longest].duration_s),
                          describe=f"{items[longest].id}, {len(feeds[longest])} partials")

    def drive(self, graph: str, run: Runner, n: int, seconds: float, steps: int) -> dict[str, Any]:
        feeds = inputs.encoder_feeds(self.corpus, self.cfg, n, split="calib")
        for feed in feeds:
            run(feed)
        return {"split": "calib", "utterances": len(feeds)}

    def axis_lengths(self) -> tuple[dict[str, list[int]], dict[str, str]]:
        items, cfg = self.corpus.items(), se.SpeakerEncoderConfig.from_dict(self.source.model["config"])
        counts = [len(se.compute_partial_slices(int(i.duration_s * cfg.sample_rate), cfg)[0]) for i in items]
        return {"batch": counts}, {"batch": f"partials per utterance of {len(items)} corpus recordings"}

    def half_precision_proxy(self, graph: str, seconds: float) -> dict[str, Any]:
        from voxport.export.onnx import torch_half_runner, torch_runner

        spec = self.reference_specs()[graph]
        feed = {"mels": inputs.encoder_feeds(self.corpus, self.cfg, 1)[0]["mels"][:2]}
        ref, out = torch_runner(spec)(feed)["embeddings"], torch_half_runner(spec)(feed)["embeddings"]
        return {"partials": int(ref.shape[0]),
                "partial_cosine_min": min(metrics.cosine(a, b) for a, b in zip(ref, out, strict=True))}

    def headline(self, figures: Mapping[str, Any]) -> str:
        if "decisions_changed" in figures:
            return (f"embedding cosine >= {figures['embedding_cosine_min']:.4f}, "
                    f"{figures['decisions_changed']} of {figures['speaker_pairs']} speaker decisions changed")
        return f"embedding cosine {figures.get('embedding_cosine_min', float('nan')):.7f}"


class _EncoderSearch(SearchJudge):
    error_name = "1 - min utterance-embedding cosine vs FP32, layer quantized alone"

    def __init__(self, encoder: SpeakerEncoder, gate: EncoderGate, margin: float) -> None:
        self.encoder, self.gate, self.margin = encoder, gate, margin
        self.steps = int(encoder.cfg.partial_frames)

    def evaluate(self, run_test: Runner) -> Judgement:
        return self.encoder.judge(run_test, "calib", self.gate, self.margin)

    def error(self, figures: Mapping[str, Any]) -> float:
        return 1.0 - float(figures["embedding_cosine_min"])
