"""The gates of the dynamic INT8 stage, per component, on calibration or held-out inputs.

Each gate measures what a user of the component notices, relative to FP32: the encoder's
embedding cosine and same/different-speaker decisions, the synthesizer's mel SNR and stop-step
agreement over fixed decoder steps. `margin` (< 1) tightens the thresholds for the search on
calibration inputs, so the held-out check that follows is not decided by chance.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from voxport.errors import AudioError, ConfigError
from voxport.evaluate import inputs, quality
from voxport.pipeline.passes import StageContext
from voxport.quantize.config import QuantizeConfig

log = logging.getLogger(__name__)

Runner = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]


class ComponentGate:
    error_name: str = ""
    torch_runner: Runner
    steps: int = 1  # time steps one inference runs a recurrent layer for (relative compute)

    def evaluate(self, run_fp32: Runner, run_test: Runner, split: str, margin: float,
                 ) -> tuple[dict[str, Any], list[str]]:
        raise NotImplementedError

    def error(self, figures: Mapping[str, Any]) -> float:
        raise NotImplementedError

    def parity(self, figures: Mapping[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def headline(self, figures: Mapping[str, Any]) -> str:
        raise NotImplementedError

    def speed(self, run_parent: Runner | None, run_test: Runner, repeats: int) -> dict[str, Any]:
        raise NotImplementedError


def component_gate(component: str, graph: str, specs: Mapping[str, Any], ctx: StageContext,
                   qc: QuantizeConfig, gate: Mapping[str, Any]) -> ComponentGate:
    if component == "speaker_encoder":
        return EncoderGate(specs[graph], ctx, qc, gate)
    if component == "synthesizer" and graph == "decoder_step":
        return DecoderStepGate(specs, ctx, qc, gate)
    raise ConfigError(f"no dynamic INT8 gate for {component}/{graph} (speaker_encoder, synthesizer/decoder_step)")


def _speed(run_ref: Runner, run_parent: Runner | None, run_test: Runner, feed: Mapping[str, np.ndarray],
           audio_s: float, repeats: int, min_seconds: float = 0.0) -> dict[str, Any]:
    speed = quality.speed_figures(run_ref, run_parent, run_test, feed, audio_s, repeats, min_seconds)
    if run_parent is not None:
        speed["parent_speedup_vs_torch_fp32"] = speed["torch_fp32_median_s"] / speed["parent_median_s"]
    speed["measured"] = True
    return speed


class EncoderGate(ComponentGate):
    error_name = "1 - min utterance-embedding cosine vs FP32, layer quantized alone"

    def __init__(self, spec: Any, ctx: StageContext, qc: QuantizeConfig, gate: Mapping[str, Any]) -> None:
        from voxport.export.onnx import torch_runner

        self.spec, self.cfg, self.ctx, self.qc, self.gate = spec, spec.module.encoder.cfg, ctx, qc, dict(gate)
        self.steps = int(self.cfg.partial_frames)
        self.torch_runner = torch_runner(spec)
        self._feeds: dict[str, tuple[list, list[np.ndarray]]] = {}

    def _split(self, split: str) -> tuple[list, list[np.ndarray]]:
        if split not in self._feeds:
            kept, feeds = [], []
            for item in quality.encoder_gate_items(self.ctx.corpus, split):
                try:
                    feeds += quality.encoder_feeds_for(self.ctx.corpus, [item], self.cfg)
                except AudioError as exc:  # too little voiced speech for one partial: not a reference
                    log.info("encoder gate: %s left out (%s)", item.id, exc)
                    continue
                kept.append(item)
            self._feeds[split] = (kept, feeds)
        return self._feeds[split]

    def evaluate(self, run_fp32: Runner, run_test: Runner, split: str, margin: float,
                 ) -> tuple[dict[str, Any], list[str]]:
        gate = {**self.gate, "min_cosine": 1.0 - (1.0 - float(self.gate["min_cosine"])) * margin}
        items, feeds = self._split(split)
        figures, failures = quality.encoder_gate(self._memo(run_fp32), run_test, items, feeds, gate)
        return {**figures, "split": split}, failures

    def _memo(self, run: Runner) -> Runner:
        """The FP32 embeddings of the (fixed, cached) gate feeds are computed once, not per trial."""
        cache = self.__dict__.setdefault("_fp32_out", {})

        def go(feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            key = (id(run), id(feed["mels"]))  # feeds live in self._feeds for the gate's lifetime
            if key not in cache:
                cache[key] = run(feed)
            return cache[key]

        return go

    def error(self, figures: Mapping[str, Any]) -> float:
        return 1.0 - float(figures["embedding_cosine_min"])

    def parity(self, figures: Mapping[str, Any]) -> dict[str, Any]:
        return {k: figures[k] for k in ("embedding_cosine_min", "embedding_cosine_mean", "decisions_changed")}

    def headline(self, figures: Mapping[str, Any]) -> str:
        return (f"embedding cosine >= {figures['embedding_cosine_min']:.4f}, "
                f"{figures['decisions_changed']} of {figures['speaker_pairs']} speaker decisions changed")

    def speed(self, run_parent: Runner | None, run_test: Runner, repeats: int) -> dict[str, Any]:
        items, feeds = self._split("eval")
        longest = max(range(len(items)), key=lambda i: (len(feeds[i]), items[i].id))
        feed = {"mels": feeds[longest]}
        return _speed(self.torch_runner, run_parent, run_test, feed, float(items[longest].duration_s), repeats,
                      self.ctx.timing_min_seconds)


class DecoderStepGate(ComponentGate):
    """The three synthesizer graphs through the host loop, only the decoder step quantized."""

    error_name = "mel noise-to-signal ratio vs FP32 (10^(-SNR/10)), layer quantized alone"

    def __init__(self, specs: Mapping[str, Any], ctx: StageContext, qc: QuantizeConfig,
                 gate: Mapping[str, Any]) -> None:
        from voxport.models.synthesizer import SynthesizerConfig
        from voxport.runtime.synthesizer_loop import torch_runner

        self.specs, self.ctx, self.qc, self.gate = specs, ctx, qc, dict(gate)
        self.syn_cfg = SynthesizerConfig.from_dict(ctx.source("synthesizer").model["config"])
        self.decoder_steps = int(gate.get("steps", 30))
        self.torch_runner = torch_runner(specs["decoder_step"])
        self._fp32 = {n: torch_runner(specs[n]) for n in ("encoder", "postnet")}
        self._cases: dict[str, list] = {}

    def _split(self, split: str) -> list[tuple[list[int], np.ndarray]]:
        if split not in self._cases:
            from voxport.models.speaker_encoder import embed_reference
            from voxport.models.text import encode_text

            enc = self.ctx.source("speaker_encoder")
            from voxport.models import registry

            encoder = registry.load_torch_artifact(self.ctx.bundle_dir / enc.file, enc.model)
            items = inputs._round_robin(self.ctx.corpus.items(split=split), len(self.qc.texts))
            self._cases[split] = [
                (encode_text(text, self.syn_cfg.n_symbols)[0],
                 embed_reference(encoder, self.ctx.corpus.audio(item, 16000), 16000, encoder.cfg))
                for text, item in zip(self.qc.texts, items, strict=False)]
        return self._cases[split]

    def evaluate(self, run_fp32: Runner, run_test: Runner, split: str, margin: float,
                 ) -> tuple[dict[str, Any], list[str]]:
        from voxport.evaluate import parity

        tol = {"min_mel_snr_db": float(self.gate["min_mel_snr_db"]) - 10 * math.log10(margin),
               "min_stop_agreement": 1.0 - (1.0 - float(self.gate["min_stop_agreement"])) * margin}
        runners = {**self._fp32, "decoder_step": run_test}
        figures, failures = parity.synthesizer(self.specs, runners, self._split(split), self.decoder_steps,
                                                 self.ctx.seed, tol, self.syn_cfg)
        return {**figures, "split": split, "gate": {**self.gate, **tol}}, failures

    def error(self, figures: Mapping[str, Any]) -> float:
        return float(10 ** (-float(figures["mel_snr_db_min"]) / 10))

    def parity(self, figures: Mapping[str, Any]) -> dict[str, Any]:
        return {k: figures[k] for k in ("mel_snr_db_min", "decoder_mel_snr_db_min", "stop_agreement_min")}

    def headline(self, figures: Mapping[str, Any]) -> str:
        return (f"mel SNR {figures['mel_snr_db_min']:.1f} dB, stop agreement "
                f"{figures['stop_agreement_min']:.2f} over {self.decoder_steps} steps")

    def speed(self, run_parent: Runner | None, run_test: Runner, repeats: int) -> dict[str, Any]:
        """Time `steps` real decoder steps (feeds captured from an FP32 host loop)."""
        import torch

        from voxport.runtime.synthesizer_loop import run_host_loop

        feeds: list[Mapping[str, np.ndarray]] = []

        def capture(feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
            feeds.append(dict(feed))
            return self.torch_runner(feed)

        ids, embedding = self._split("eval")[0]
        run_host_loop(self._fp32["encoder"], capture, self._fp32["postnet"], np.asarray([ids], dtype=np.int64),
                      np.asarray(embedding, dtype=np.float32)[None], 0, torch.Generator().manual_seed(self.ctx.seed),
                      self.syn_cfg, max_decoder_steps=self.decoder_steps, stop_on_token=False)

        def over_steps(run: Runner) -> Runner:
            def go(_: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
                out: dict[str, np.ndarray] = {}
                for feed in feeds:
                    out = run(feed)
                return out
            return go

        mel = self.ctx.source("synthesizer").contract.get("mel", {})
        audio_s = self.decoder_steps * self.syn_cfg.r * mel.get("hop_length", 256) / mel.get("sample_rate", 22050)
        return _speed(over_steps(self.torch_runner), over_steps(run_parent) if run_parent else None,
                      over_steps(run_test), {}, audio_s, repeats, self.ctx.timing_min_seconds)
