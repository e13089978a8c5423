"""`voxport build`: the stack's torch originals, their ONNX exports, validated, in one bundle.

The bundle is built in a temporary sibling directory and renamed into place only when every
artifact passed validation, so a failed build leaves the previous bundle untouched and nothing
half-written.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from tqdm import tqdm

from voxport.errors import ConfigError, ParityError, StageSkipped
from voxport.evaluate import inputs, parity
from voxport.evaluate.corpus import Corpus, build_corpus, default_corpus_dir, load_corpus
from voxport.export.onnx import OnnxExportConfig, export_graph, ort_runner, tensor_specs
from voxport.models import registry
from voxport.models.checkpoint import sha256_file
from voxport.models.graph import GraphSpec
from voxport.models.stack import Component, load_stack
from voxport.pipeline.passes import StageContext, stage
from voxport.pipeline.records import Record, now_iso, tool_versions, write_manifest, write_record
from voxport.runtime.host import require_target

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Bundle:
    path: Path
    records: list[Record]


def ensure_corpus(corpus_dir: str | None) -> Corpus:
    path = Path(corpus_dir) if corpus_dir else default_corpus_dir()
    if not (path / "manifest.json").is_file():
        log.info("real-speech corpus missing at %s: assembling it from Debian packages", path)
        build_corpus(path)
    return load_corpus(path)


def build_bundle(cfg: Any) -> Bundle:
    """Run every stage of `cfg` and return the finished bundle (see conf/config.yaml)."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"required config values missing: {', '.join(missing)} "
                          f"(give them as overrides, e.g. `voxport build {missing[0]}=PATH`)")
    # A target this host cannot serve (target=tensorrt without CUDA) stops here, before any work.
    require_target(OmegaConf.to_container(cfg.target, resolve=True),
                   stages=[e.kind for entries in cfg.stages.values() for e in entries or []])
    export_cfg = OnnxExportConfig(exporter=str(cfg.export.exporter), opset=int(cfg.export.opset))
    corpus = ensure_corpus(cfg.corpus_dir)
    stack = load_stack(cfg.stack)
    out_dir = Path(cfg.out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    try:
        records: list[Record] = []
        for component in tqdm(stack.components, desc="export", unit="component"):
            source = write_source(component, staging)
            records.append(source)
            records += export_component(component, source, staging, export_cfg, corpus, cfg)
        # Stages append their records to `records` (the context shares the list).
        ctx = StageContext(
            bundle_dir=staging, corpus=corpus, records=records,
            gates=OmegaConf.to_container(cfg.gates, resolve=True), seed=int(cfg.seed),
            threads=int(cfg.target.threads), timing_repeats=int(cfg.timing.repeats),
            timing_min_seconds=float(cfg.timing.get("min_seconds", 0.0)),
        )
        run_stages(cfg, ctx)
        write_manifest(staging, records, stack.describe(), skipped=ctx.skipped)
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("bundle ready: %s (%d artifacts)", out_dir, len(records))
    return Bundle(out_dir, records)


# Settings shared by every stage of a kind live in one config node (`quantize`, `prune`).
_SETTINGS = {"quantize_dynamic": "quantize", "quantize_static": "quantize", "prune_magnitude": "prune",
             "prune_structured": "prune", "fp16": "fp16", "tensorrt": "tensorrt"}


def run_stages(cfg: Any, ctx: StageContext) -> list[Record]:
    """Run conf `stages` per component, in order; each entry names its kind, graph and parent."""
    planned = [(component, entry) for component in ("speaker_encoder", "synthesizer", "vocoder")
               for entry in cfg.stages.get(component) or []]
    made: list[Record] = []
    for component, entry in tqdm(planned, desc="stages", unit="stage", disable=not planned):
        entry = OmegaConf.to_container(entry, resolve=True)
        kind, graph = entry["kind"], entry.get("graph", component)
        if entry.get("parent", "onnx") == "torch":
            parent = ctx.source(component)
        else:
            parent = ctx.find(component, graph, "onnx", entry.get("parent_precision", "fp32"))
        settings = dict(OmegaConf.to_container(cfg[_SETTINGS[kind]], resolve=True)) if kind in _SETTINGS else {}
        settings.update({k: v for k, v in entry.items() if k not in ("kind", "parent", "parent_precision")})
        settings["timing_seconds"] = float(cfg.timing.seconds)
        log.info("stage %s on %s/%s (parent %s)", kind, component, graph, parent.file)
        try:
            record = stage(kind)(parent, settings, ctx)
        except StageSkipped as exc:  # cannot pay off on this host: no artifact, not a failure
            log.warning("stage %s on %s/%s skipped: %s", kind, component, graph, exc)
            ctx.skipped.append({"component": component, "graph": graph, "kind": kind, "reason": str(exc)})
            continue
        ctx.records.append(record)
        made.append(record)
    return made


def write_source(component: Component, bundle_dir: Path) -> Record:
    """The PyTorch FP32 original in inference form: the reference every other artifact is judged by."""
    name = f"{component.name}_fp32.pt"
    path = registry.save_torch_artifact(component.module, bundle_dir / name)
    graph = component.name if component.name != "synthesizer" else "*"
    record = Record(
        component=component.name, graph=graph, format="torch", precision="fp32", file=name,
        sha256=sha256_file(path), weights=component.weights, stage="source",
        parent=component.source, parent_sha256=component.source_sha256, model=component.model,
        contract=component.contract, config={"source": component.source}, tools=tool_versions(),
        created=now_iso(),
    )
    write_record(record, bundle_dir)
    return record


def export_component(
    component: Component, source: Record, bundle_dir: Path, export_cfg: OnnxExportConfig,
    corpus: Corpus, cfg: Any,
) -> list[Record]:
    """Export every graph of a component to ONNX; validate on real inputs; records only if passed."""
    # Rebuild from the saved artifact, exactly as the runtime will, rather than reuse the module.
    module = registry.load_torch_artifact(bundle_dir / source.file, source.model)
    specs = registry.graph_specs(module, source.model)
    paths = {name: export_graph(spec, bundle_dir / f"{spec.artifact_stem}_fp32.onnx", export_cfg)
             for name, spec in specs.items()}
    runners = {name: ort_runner(path) for name, path in paths.items()}
    try:
        figures, failures = _validate(component.name, specs, runners, corpus, cfg, source.model)
    except BaseException:
        _remove(paths.values())
        raise
    if failures:
        _remove(paths.values())
        raise ParityError(f"{component.name} ONNX FP32", failures, figures)
    records = []
    for name, spec in specs.items():
        ins, outs = tensor_specs(spec)
        record = Record(
            component=component.name, graph=name, format="onnx", precision="fp32",
            file=paths[name].name, sha256=sha256_file(paths[name]), weights=component.weights,
            stage="export", inputs=ins, outputs=outs, parent=source.file,
            parent_sha256=source.sha256, model=source.model, contract=component.contract,
            config={"exporter": export_cfg.exporter, "opset": export_cfg.opset}, parity=figures,
            tools=tool_versions(), created=now_iso(),
        )
        write_record(record, bundle_dir)
        records.append(record)
    return records


def _validate(
    component: str, specs: dict[str, GraphSpec], runners: dict, corpus: Corpus, cfg: Any,
    model: dict[str, Any],
) -> tuple[dict[str, Any], list[str]]:
    v, tol = cfg.validation, cfg.tolerances
    if component == "vocoder":
        spec = specs["vocoder"]
        mel_cfg = spec.module.generator.cfg.mel
        clips = inputs.speech_clips(corpus, mel_cfg, int(v.vocoder_clips), float(v.max_clip_seconds))
        return parity.vocoder(spec, runners["vocoder"], inputs.vocoder_feeds(clips), tol.vocoder)
    if component == "speaker_encoder":
        spec = specs["speaker_encoder"]
        feeds = inputs.encoder_feeds(corpus, spec.module.encoder.cfg, int(v.encoder_clips))
        return parity.speaker_encoder(spec, runners["speaker_encoder"], feeds, tol.speaker_encoder)
    from voxport.models.synthesizer import SynthesizerConfig

    syn_cfg = SynthesizerConfig.from_dict(model["config"])
    cases = synthesizer_cases(corpus, cfg, syn_cfg.n_symbols)
    return parity.synthesizer(
        specs, runners, cases, int(v.synthesizer_steps), int(cfg.seed), tol.synthesizer, syn_cfg
    )


def synthesizer_cases(corpus: Corpus, cfg: Any, n_symbols: int) -> list[tuple[list[int], Any]]:
    """Real text (first fragment of each configured sentence) paired with real speaker embeddings."""
    from voxport.models.speaker_encoder import embed_reference, load_speaker_encoder
    from voxport.models.stack import resolve_checkpoint
    from voxport.models.text import encode_text

    encoder = load_speaker_encoder(resolve_checkpoint(str(cfg.stack.speaker_encoder.checkpoint)))
    clips = inputs._round_robin(corpus.items(split="eval"), len(cfg.validation.texts))
    cases = []
    for text, item in zip(cfg.validation.texts, clips, strict=False):
        embedding = embed_reference(encoder, corpus.audio(item, 16000), 16000, encoder.cfg)
        cases.append((encode_text(str(text), n_symbols)[0], embedding))
    return cases


def _remove(paths: Any) -> None:
    for path in paths:
        Path(path).unlink(missing_ok=True)


def _replace_dir(staging: Path, out_dir: Path) -> None:
    """Swap the finished staging directory into place; the old bundle goes only after that."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{staging.name.rsplit('-', 1)[-1]}")
        out_dir.rename(old)
    staging.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
