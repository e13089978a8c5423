"""Gate one graph of a lossy artifact (FP16 ONNX, TensorRT engine) the way its component is heard.

vocoder: copy synthesis of held-out recordings, log-mel distance increase and PESQ drop vs FP32;
speaker encoder: embedding cosine and unchanged same/different-speaker decisions; synthesizer:
mel SNR and stop-step agreement through the host loop over fixed steps (same prenet masks), the
graph under test beside the other two graphs (`others`, PyTorch FP32 where not given).
The reference is always the component's PyTorch FP32 original from the bundle.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from voxport.evaluate import inputs, metrics, quality
from voxport.models import registry
from voxport.models.graph import GraphSpec
from voxport.pipeline.passes import StageContext
from voxport.pipeline.records import Record

log = logging.getLogger(__name__)

Runner = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]


def quiet_runner(path: Any, threads: int = 0) -> Runner:
    """A CPU ONNX Runtime session over feeds keyed by input name, without spin-waiting workers.

    Stages interleave ONNX Runtime and PyTorch calls; ONNX Runtime's worker threads spin after
    each run and starve the next PyTorch call on a small machine (PyTorch FP32 timed at 1.2 s
    instead of ~10 ms on 2 cores). `path` is a file or a serialized model.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    model = path if isinstance(path, bytes) else str(path)
    session = ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
    in_names = [i.name for i in session.get_inputs()]
    out_names = [o.name for o in session.get_outputs()]

    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(out_names, session.run(None, {n: feeds[n] for n in in_names}), strict=True))

    return run


def reference_specs(ctx: StageContext, component: str) -> tuple[Record, dict[str, GraphSpec]]:
    """The component's PyTorch FP32 original and its graphs, rebuilt from the bundle (memoised)."""
    source = ctx.source(component)
    key = f"torch_specs:{source.sha256}"
    if key not in ctx.cache:
        module = registry.load_torch_artifact(ctx.bundle_dir / source.file, source.model)
        ctx.cache[key] = registry.graph_specs(module, source.model)
    return source, ctx.cache[key]


def synthesizer_cases(ctx: StageContext, texts: Sequence[str], n_symbols: int,
                      split: str = "eval") -> list[tuple[list[int], np.ndarray]]:
    """Real text (first fragment of each sentence) with real speaker embeddings of `split` speech."""
    from voxport.models import speaker_encoder as se
    from voxport.models.text import encode_text

    key = f"synthesizer_cases:{split}:{tuple(texts)}"
    if key not in ctx.cache:
        source = ctx.source("speaker_encoder")
        encoder = registry.load_torch_artifact(ctx.bundle_dir / source.file, source.model)
        # Real voices, long enough to keep >= 1 s of speech after the encoder's VAD trimming.
        voices = [i for i in ctx.corpus.items(split=split) if i.source != "espeak-ng" and i.duration_s >= 2.0]
        items = inputs._round_robin(voices, len(texts))
        ctx.cache[key] = [
            (encode_text(str(text), n_symbols)[0],
             se.embed_reference(encoder, ctx.corpus.audio(item, encoder.cfg.sample_rate),
                                encoder.cfg.sample_rate, encoder.cfg))
            for text, item in zip(texts, items, strict=False)
        ]
    return ctx.cache[key]


def encoder_gate_inputs(ctx: StageContext, cfg: Any) -> tuple[list[Any], list[np.ndarray]]:
    """Held-out recordings for the encoder gate, without the ones too short to embed (a 1 s clip
    keeps 0.66 s after VAD trimming, below the encoder's minimum)."""
    from voxport.errors import AudioError

    key = f"encoder_gate_inputs:{cfg}"
    if key in ctx.cache:  # VAD and mels of every held-out clip: computed once per build
        return ctx.cache[key]
    items, feeds = [], []
    for item in quality.encoder_gate_items(ctx.corpus):
        try:
            feeds += quality.encoder_feeds_for(ctx.corpus, [item], cfg)
        except AudioError as exc:
            log.info("encoder gate: skipping %s (%s)", item.id, exc)
            continue
        items.append(item)
    ctx.cache[key] = (items, feeds)
    return items, feeds


def gate_graph(parent: Record, run_test: Runner, ctx: StageContext, gate: Mapping[str, Any],
               settings: Mapping[str, Any], others: Mapping[str, Runner] | None = None,
               ) -> tuple[dict[str, Any], list[str]]:
    """(figures, failures) of the artifact serving `parent.graph`, against PyTorch FP32."""
    from voxport.export.onnx import torch_runner

    source, specs = reference_specs(ctx, parent.component)
    if parent.component == "vocoder":
        from voxport.models.audio import MelConfig

        mel_cfg = MelConfig.from_dict(source.contract["mel"])
        clips = quality.gate_clips(ctx.corpus, mel_cfg, float(settings.get("gate_seconds", 3.0)))
        key = f"vocoder_fp32_baseline:{source.sha256}:{[c.id for c in clips]}"
        figures, failures, baseline = quality.vocoder_gate(
            torch_runner(specs["vocoder"]), run_test, clips, mel_cfg.sample_rate, gate, ctx.cache.get(key))
        ctx.cache[key] = baseline
        return figures, failures
    if parent.component == "speaker_encoder":
        spec = specs["speaker_encoder"]
        items, feeds = encoder_gate_inputs(ctx, spec.module.encoder.cfg)
        return quality.encoder_gate(torch_runner(spec), run_test, items, feeds, gate)
    from voxport.evaluate import parity
    from voxport.models.synthesizer import SynthesizerConfig
    from voxport.runtime.synthesizer_loop import torch_runner as loop_runner

    cfg = SynthesizerConfig.from_dict(source.model["config"])
    runners = {name: loop_runner(spec) for name, spec in specs.items()}
    runners.update(others or {})
    runners[parent.graph] = run_test
    cases = synthesizer_cases(ctx, list(settings.get("texts") or ()), cfg.n_symbols)
    figures, failures = parity.synthesizer(specs, runners, cases, int(gate.get("steps", 30)), ctx.seed, gate, cfg)
    figures["graphs_under_test"] = sorted({parent.graph, *(others or {})})
    return figures, failures


def timing_feed(parent: Record, ctx: StageContext, seconds: float) -> tuple[dict[str, np.ndarray], float]:
    """A real input for side-by-side timing: `seconds` of held-out speech for the vocoder, the
    graph's example inputs otherwise (audio seconds 0: no real-time factor)."""
    source, specs = reference_specs(ctx, parent.component)
    if parent.component == "vocoder":
        from voxport.models.audio import MelConfig

        mel_cfg = MelConfig.from_dict(source.contract["mel"])
        clip = inputs.speech_clips(ctx.corpus, mel_cfg, 1, seconds)[0]
        return {"mel": clip.mel[None].astype(np.float32)}, len(clip.wav) / mel_cfg.sample_rate
    spec = specs[parent.graph]
    return {n: t.numpy() for n, t in zip(spec.input_names, spec.example_inputs, strict=True)}, 0.0


def _half_runner(spec: GraphSpec) -> Runner:
    """The graph in torch float16 on CPU: float inputs cast to half, float outputs back to float32."""
    module = copy.deepcopy(spec.module).half().eval()

    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = []
        for name in spec.input_names:
            t = torch.from_numpy(np.ascontiguousarray(feeds[name]))
            args.append(t.half() if t.is_floating_point() else t)
        with torch.inference_mode():
            outs = module(*args)
        return {n: (o.float() if o.is_floating_point() else o).numpy()
                for n, o in zip(spec.output_names, outs, strict=True)}

    return run


def torch_half_figures(parent: Record, ctx: StageContext, seconds: float, texts: Sequence[str]) -> dict[str, Any]:
    """Fidelity of torch `.half()` on CPU vs FP32 on a short real input: a better proxy of GPU FP16
    arithmetic than ONNX Runtime CPU, which computes most FP16 nodes in FP32 behind inserted Casts.
    CPU FP16 kernels are reference code (50-70x slower than FP32), hence the short input."""
    from voxport.export.onnx import torch_runner

    source, specs = reference_specs(ctx, parent.component)
    spec = specs[parent.graph]
    half = _half_runner(spec)
    if parent.component == "vocoder":
        from voxport.models.audio import MelConfig

        mel_cfg = MelConfig.from_dict(source.contract["mel"])
        clip = inputs.speech_clips(ctx.corpus, mel_cfg, 1, seconds)[0]
        feed = {"mel": clip.mel[None].astype(np.float32)}
        ref, out = torch_runner(spec)(feed)["wav"], half(feed)["wav"]
        return {"input_seconds": round(len(clip.wav) / mel_cfg.sample_rate, 3), "clip": clip.id,
                "wav_snr_db_vs_fp32": metrics.snr_db(ref, out), "wav_max_abs_vs_fp32": metrics.max_abs_diff(ref, out)}
    if parent.component == "speaker_encoder":
        feed = inputs.encoder_feeds(ctx.corpus, spec.module.encoder.cfg, 1)[0]
        feed = {"mels": feed["mels"][:2]}
        ref, out = torch_runner(spec)(feed)["embeddings"], half(feed)["embeddings"]
        return {"partials": int(ref.shape[0]),
                "partial_cosine_min": min(metrics.cosine(a, b) for a, b in zip(ref, out, strict=True))}
    from voxport.evaluate import parity
    from voxport.models.synthesizer import SynthesizerConfig
    from voxport.runtime.synthesizer_loop import torch_runner as loop_runner

    cfg = SynthesizerConfig.from_dict(source.model["config"])
    runners = {name: loop_runner(s) for name, s in specs.items()}
    runners[parent.graph] = half
    steps = 10  # a handful of decoder steps: CPU half kernels are slow, and errors show early
    cases = synthesizer_cases(ctx, list(texts)[:1], cfg.n_symbols)
    figures, _ = parity.synthesizer(specs, runners, cases, steps, ctx.seed,
                                      {"min_mel_snr_db": 0.0, "min_stop_agreement": 0.0}, cfg)
    return {"decoder_steps": steps, "mel_snr_db_min": figures["mel_snr_db_min"],
            "stop_agreement_min": figures["stop_agreement_min"]}
