"""The synthesizer (Tacotron as three graphs: encoder, decoder step, postnet): judged through the
host loop, on real text with the embeddings of real voices.

Every comparison runs the same text ids, the same speaker embedding and the same seeded prenet
dropout masks through a fixed number of decoder steps (stop token ignored), once with the PyTorch
FP32 graphs and once with the graphs under test in their place: mel SNR (decoder and postnet) and
stop-step agreement. The cases (text + voice) are chosen here, once, for exports, gates, searches
and timing alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from voxport.evaluate import parity
from voxport.evaluate.components.base import Component, Judgement, Runner, SearchJudge, TimingFeed
from voxport.evaluate.components.vocoder import _frames
from voxport.models.synthesizer import SynthesizerConfig
from voxport.pipeline.records import Record

Case = tuple[list[int], np.ndarray]  # (symbol ids of one text fragment, speaker embedding)


@dataclass(frozen=True)
class SynthesizerGate:
    min_mel_snr_db: float = 20.0
    min_stop_agreement: float = 0.95
    steps: int = 30
    require_speedup: bool = False


@dataclass(frozen=True)
class SynthesizerTolerance:
    min_mel_snr_db: float = 80.0
    min_stop_agreement: float = 1.0


class Synthesizer(Component):
    name = "synthesizer"
    graphs = ("encoder", "decoder_step", "postnet")
    precisions = ("int8-dynamic", "fp16")
    Gate = SynthesizerGate
    Tolerance = SynthesizerTolerance

    @property
    def cfg(self) -> SynthesizerConfig:
        return SynthesizerConfig.from_dict(self.source.model["config"])

    def cases(self, split: str) -> list[Case]:
        """The first fragment of each configured text, each with the embedding of a real voice of
        `split` (round robin over speakers; a recording too short to embed is passed over)."""
        from voxport.models.text import encode_text

        def make() -> list[Case]:
            texts = self.settings.validation.texts
            voices = self.voices(split, 3 * len(texts))
            embeddings = self.embeddings(voices)[: len(texts)]
            return [(encode_text(str(t), self.cfg.n_symbols)[0], e) for t, e in zip(texts, embeddings, strict=False)]

        return self.cached(f"cases:{split}", make)

    def loop_runners(self, specs: Mapping[str, Any]) -> dict[str, Runner]:
        from voxport.models.synthesizer_reference import torch_runner

        return {name: torch_runner(spec) for name, spec in specs.items()}

    def reference_loop_runners(self) -> dict[str, Runner]:
        return self.cached(f"loop_runners:{self.source.sha256}", lambda: self.loop_runners(self.reference_specs()))

    def compare(self, runners: Mapping[str, Runner], split: str, steps: int, tolerance: Mapping[str, float]
                ) -> Judgement:
        """The graphs in `runners` in place of PyTorch FP32 ones, through `steps` decoder steps."""
        loop = {**self.reference_loop_runners(), **runners}
        figures, failures = parity.synthesizer(self.reference_specs(), loop, self.cases(split), steps,
                                               self.settings.seed, tolerance, self.cfg)
        return {**figures, "split": split, "graphs_under_test": sorted(runners)}, failures

    def parity(self, runners: Mapping[str, Runner], reference: Record) -> Judgement:
        tol = self.tolerance()
        specs = self.specs_of(reference)
        figures, failures = parity.synthesizer(
            specs, {**self.loop_runners(specs), **runners}, self.cases("eval"),
            self.settings.validation.synthesizer_steps, self.settings.seed,
            {"min_mel_snr_db": tol.min_mel_snr_db, "min_stop_agreement": tol.min_stop_agreement}, self.cfg)
        return figures, failures

    def listen(self, runners: Mapping[str, Runner], precision: str) -> Judgement:
        gate = self.gate(precision)
        figures, failures = self.compare(runners, "eval", gate.steps, _thresholds(gate, 1.0))
        return {**figures, "gate": _thresholds(gate, 1.0)}, failures

    def search_judge(self, graph: str, precision: str, margin: float, **_: Any) -> SearchJudge:
        return _SynthesizerSearch(self, graph, self.gate(precision), margin)

    def timing_feed(self, graph: str, seconds: float) -> TimingFeed:
        """The decoder step over the real steps of one FP32 host loop (`gates` steps, captured);
        the encoder and the postnet on their example inputs (no audio duration: no RTF)."""
        if graph != "decoder_step":
            spec = self.reference_specs()[graph]
            feed = {n: t.numpy() for n, t in zip(spec.input_names, spec.example_inputs, strict=True)}
            return TimingFeed(feed, 0.0, describe="example inputs")
        from voxport.models.prenet_masks_torch import TorchMasks
        from voxport.runtime.synthesizer_loop import run_host_loop

        steps = self.settings.validation.synthesizer_steps
        ref, feeds = self.reference_loop_runners(), []

        def capture(feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            feeds.append(dict(feed))
            return ref["decoder_step"](feed)

        ids, embedding = self.cases("eval")[0]
        run_host_loop(ref["encoder"], capture, ref["postnet"], np.asarray([ids], dtype=np.int64),
                      np.asarray(embedding, dtype=np.float32)[None], 0,
                      TorchMasks(self.settings.seed), self.cfg, max_decoder_steps=steps,
                      stop_on_token=False)

        def over_steps(run: Runner) -> Runner:
            def go(_: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
                out: dict[str, np.ndarray] = {}
                for feed in feeds:
                    out = run(feed)
                return out
            return go

        mel = self.source.contract.get("mel", {})
        audio_s = steps * self.cfg.r * mel.get("hop_length", 256) / mel.get("sample_rate", 22050)
        return TimingFeed({}, audio_s, wrap=over_steps, describe=f"{steps} real decoder steps")

    def drive(self, graph: str, run: Runner, n: int, seconds: float, steps: int) -> dict[str, Any]:
        from voxport.models.prenet_masks_torch import TorchMasks
        from voxport.runtime.synthesizer_loop import run_host_loop

        loop = {**self.reference_loop_runners(), graph: run}
        cases = self.cases("calib")
        for ids, embedding in cases:
            run_host_loop(loop["encoder"], loop["decoder_step"], loop["postnet"], np.asarray([ids], dtype=np.int64),
                          embedding[None].astype(np.float32), 0, TorchMasks(self.settings.seed),
                          self.cfg, max_decoder_steps=steps, stop_on_token=False)
        return {"split": "calib", "texts": len(cases), "decoder_steps": steps}

    def axis_lengths(self) -> tuple[dict[str, list[int]], dict[str, str]]:
        from voxport.models.text import encode_text

        items = self.corpus.items()
        lengths, sources = _frames(items, self.source.contract.get("mel") or {})
        sentences = [*self.settings.validation.texts, *(i.text for i in items if i.text)]
        lengths["text"] = [len(ids) for s in sentences for ids in encode_text(s, self.cfg.n_symbols)]
        sources["text"] = f"symbols per fragment of {len(sentences)} texts (configured + corpus transcripts)"
        return lengths, sources

    def half_precision_proxy(self, graph: str, seconds: float) -> dict[str, Any]:
        from voxport.export.onnx import torch_half_runner

        steps = 10  # a handful of decoder steps: CPU half kernels are slow, and errors show early
        figures, _ = self.compare({graph: torch_half_runner(self.reference_specs()[graph])}, "eval", steps,
                                  {"min_mel_snr_db": 0.0, "min_stop_agreement": 0.0})
        return {"decoder_steps": steps, "mel_snr_db_min": figures["mel_snr_db_min"],
                "stop_agreement_min": figures["stop_agreement_min"]}

    def torch_scope(self, graph: str) -> str:
        return "decoder" if graph == "decoder_step" else ""

    def headline(self, figures: Mapping[str, Any]) -> str:
        return (f"mel SNR {figures.get('mel_snr_db_min', float('nan')):.1f} dB, stop agreement "
                f"{figures.get('stop_agreement_min', float('nan')):.2f} over {figures.get('decoder_steps')} steps")


def _thresholds(gate: SynthesizerGate, margin: float) -> dict[str, float]:
    """The gate's thresholds, tightened by `margin` (< 1) for a search on calibration inputs."""
    import math

    return {"min_mel_snr_db": gate.min_mel_snr_db - 10 * math.log10(margin),
            "min_stop_agreement": 1.0 - (1.0 - gate.min_stop_agreement) * margin}


class _SynthesizerSearch(SearchJudge):
    error_name = "mel noise-to-signal ratio vs FP32 (10^(-SNR/10)), layer quantized alone"

    def __init__(self, synthesizer: Synthesizer, graph: str, gate: SynthesizerGate, margin: float) -> None:
        self.synthesizer, self.graph, self.gate, self.margin = synthesizer, graph, gate, margin
        self.steps = gate.steps

    def evaluate(self, run_test: Runner) -> Judgement:
        tol = _thresholds(self.gate, self.margin)
        figures, failures = self.synthesizer.compare({self.graph: run_test}, "calib", self.gate.steps, tol)
        return {**figures, "gate": tol}, failures

    def error(self, figures: Mapping[str, Any]) -> float:
        return float(10 ** (-float(figures["mel_snr_db_min"]) / 10))
