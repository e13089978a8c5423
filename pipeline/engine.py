"""`voxport build`: the one engine that plans, runs, judges, times and records every pass.

For each planned stage (conf/stages/<preset>.yaml, after the FP32 ONNX export of every
component) the engine
1. resolves the parent artifact and the pass's typed config;
2. runs the pass (or takes its candidate from the stage cache: same parent sha256, same config);
3. asks the component to judge the candidate: FP32 parity against its parent for an exact
   transform, the listener-side gate against the PyTorch original for a lossy one;
4. times it side by side (rotated order) against PyTorch FP32 and its parent, with the runtime's
   own backends and session settings, and records the settings that were fastest;
5. writes its records, or removes the candidate's files and raises GateError naming every figure.
The bundle is assembled in a temporary sibling directory and renamed into place only when every
stage passed, so a failed build leaves the previous bundle untouched and nothing half-written.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from tqdm import tqdm

from voxport.errors import ConfigError, GateError, StageSkipped
from voxport.evaluate import timing
from voxport.evaluate.components import (
    COMPONENTS,
    Component,
    EvaluationSettings,
    ValidationConfig,
    component_class,
)
from voxport.evaluate.corpus import Corpus, build_corpus, default_corpus_dir, load_corpus
from voxport.models import registry
from voxport.models.checkpoint import sha256_file
from voxport.models.stack import Component as StackComponent
from voxport.models.stack import load_stack
from voxport.pipeline import cache as stage_cache
from voxport.pipeline.passes import Candidate, PassContext, PassKind, isolated, pass_kind
from voxport.pipeline.records import Record, now_iso, tool_versions, write_manifest, write_record
from voxport.pipeline.schema import build

log = logging.getLogger(__name__)
PACKAGE = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class TimingConfig:
    """conf `timing`: how candidates are timed side by side."""

    repeats: int = 5  # at least this many interleaved rounds per timing ...
    min_seconds: float = 0.0  # ... and more for short workloads, until the slowest ran this long
    seconds: float = 3.0  # length of the real-speech input
    # ONNX Runtime session settings tried side by side (every combination); the fastest is recorded.
    session_levels: tuple[str, ...] = ("all", "extended")  # graph optimizations (`all` adds NCHWc layout)
    session_threads: tuple[int, ...] = (0,)  # intra-op threads; 0: the build's (target.threads)
    session_spinning: tuple[bool, ...] = (False,)  # busy-waiting worker threads

    def __post_init__(self) -> None:
        for name in ("session_levels", "session_threads", "session_spinning"):
            values = tuple(getattr(self, name) or ())
            if not values:
                raise ConfigError(f"timing.{name} needs at least one value")
            object.__setattr__(self, name, values)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> TimingConfig:
        return build(cls, data or {}, "timing")


def session_variants(timing_cfg: TimingConfig, build_threads: int) -> list[dict[str, Any]]:
    """Every combination of `timing.session_*` to time, as SessionSettings overrides, in a stable order."""
    return [{"graph_optimization": level, "intra_op_threads": threads or build_threads, "allow_spinning": spin}
            for level in timing_cfg.session_levels for threads in timing_cfg.session_threads
            for spin in timing_cfg.session_spinning]


def variant_label(overrides: Mapping[str, Any], variants: Sequence[Mapping[str, Any]]) -> str:
    """A short name for one session variant: only the settings that vary in this trial (the level alone
    by default, as records have always named it)."""
    varying = [k for k in overrides if len({repr(v[k]) for v in variants}) > 1] or ["graph_optimization"]
    names = {"graph_optimization": "{}", "intra_op_threads": "{}t", "allow_spinning": "spin={}"}
    return ",".join(names[k].format(str(overrides[k]).lower()) for k in varying)


@dataclass(frozen=True)
class Stage:
    """One planned step: a pass kind on one component, from a parent chosen by `parent`."""

    component: str
    kind: str
    graph: str | None = None  # None: every graph of the parent (the FP32 export)
    parent: str = "onnx"  # source | torch | onnx: the newest such FP32 artifact of the graph
    parent_precision: str = "fp32"
    settings: dict[str, Any] = field(default_factory=dict)  # the preset entry's own settings


@dataclass
class BuildContext:
    """What the engine (and the tests that drive single stages) works with."""

    bundle_dir: Path
    corpus: Corpus
    records: list[Record]
    gates: dict[str, Any]
    seed: int = 1234
    threads: int = 0
    timing: TimingConfig = field(default_factory=TimingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    tolerances: dict[str, Any] = field(default_factory=dict)
    cache: stage_cache.StageCache = field(default_factory=lambda: stage_cache.StageCache(None))
    skipped: list[dict[str, str]] = field(default_factory=list)
    memo: dict[str, Any] = field(default_factory=dict)  # inputs chosen once per build
    _components: dict[str, Component] = field(default_factory=dict)

    def component(self, name: str) -> Component:
        if name not in self._components:
            settings = EvaluationSettings(self.validation, self.tolerances, self.gates, self.seed, self.threads)
            self._components[name] = component_class(name)(self.bundle_dir, self.corpus, self.records, settings,
                                                           self.memo)
        return self._components[name]

    def source(self, component: str) -> Record:
        return self.component(component).source

    def find(self, component: str, graph: str, fmt: str, precision: str = "fp32") -> Record:
        """The newest `fmt` `precision` artifact of `component/graph` built so far."""
        for r in reversed(self.records):
            if (r.component, r.graph, r.format, r.precision) == (component, graph, fmt, precision):
                return r
        raise ConfigError(f"no {fmt} {precision} artifact of {component}/{graph} built before this stage")


@dataclass(frozen=True)
class Bundle:
    path: Path
    records: list[Record]
    cache: dict[str, list[str]] = field(default_factory=dict)

    def summary(self) -> str:
        from voxport.pipeline.summary import artifact_table, chains, ranking_table, rows

        table = rows(self.records)
        text = artifact_table(self.records, self.path)
        text += ("\n\nfastest passing artifacts per component (speed measured side by side in this build):\n"
                 + ranking_table(table))
        made = chains(self.records, table)
        if made:
            text += "\n\nhow the fastest passing artifact was made, step by step:\n" + made
        if self.cache.get("hits") or self.cache.get("misses"):
            text += (f"\n\nstage cache: {len(self.cache.get('hits', []))} reused, "
                     f"{len(self.cache.get('misses', []))} computed")
        return text


# ---------------------------------------------------------------------------------------------
# The build


def ensure_corpus(corpus_dir: str | None) -> Corpus:
    path = Path(corpus_dir) if corpus_dir else default_corpus_dir()
    if not (path / "manifest.json").is_file():
        log.info("real-speech corpus missing at %s: assembling it from Debian packages", path)
        build_corpus(path)
    return load_corpus(path)


def build_bundle(cfg: Any) -> Bundle:
    """Run every stage of `cfg` and return the finished bundle (see conf/config.yaml)."""
    from voxport.runtime.host import require_target
    from voxport.runtime.select import TargetConfig

    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"required config values missing: {', '.join(missing)} "
                          f"(give them as overrides, e.g. `voxport build {missing[0]}=PATH`)")
    plan = plan_stages(cfg)
    target = TargetConfig.from_cfg(cfg.target)
    # A target this host cannot serve (target=tensorrt without CUDA) stops here, before any work.
    require_target(dataclasses.asdict(target), stages={s.kind: pass_kind(s.kind).requires for s in plan})
    corpus = ensure_corpus(cfg.corpus_dir)
    stack = load_stack(cfg.stack)
    out_dir = Path(cfg.out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    try:
        ctx = BuildContext(
            bundle_dir=staging, corpus=corpus, records=[], gates=_container(cfg.gates), seed=int(cfg.seed),
            threads=target.threads, timing=TimingConfig.from_dict(_container(cfg.timing)),
            validation=ValidationConfig.from_dict(_container(cfg.validation)),
            tolerances=_container(cfg.tolerances), cache=stage_cache.StageCache(cfg.cache_dir),
        )
        for component in stack.components:
            ctx.records.append(write_source(component, staging))
        for stage in tqdm(plan, desc="stages", unit="stage"):
            run_planned(ctx, stage, cfg)
        write_manifest(staging, ctx.records, stack.describe(), skipped=ctx.skipped)
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("bundle ready: %s (%d artifacts; stage cache: %d reused, %d computed)", out_dir, len(ctx.records),
             len(ctx.cache.hits), len(ctx.cache.misses))
    return Bundle(out_dir, ctx.records, {"hits": ctx.cache.hits, "misses": ctx.cache.misses})


def _container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if node is not None else {}


def plan_stages(cfg: Any) -> list[Stage]:
    """The FP32 ONNX export of every component, then conf `stages` per component, in order."""
    components = tuple(COMPONENTS)  # encoder, synthesizer, vocoder: the order a clone runs them
    plan = [Stage(c, "onnx_export", parent="source") for c in components]
    for component in components:
        for entry in cfg.stages.get(component) or []:
            entry = dict(_container(entry))
            kind = entry.pop("kind")
            pass_kind(kind)  # an unknown kind fails here, before any work
            plan.append(Stage(component, kind, graph=entry.pop("graph", component),
                              parent=entry.pop("parent", "onnx"),
                              parent_precision=entry.pop("parent_precision", "fp32"), settings=entry))
    unknown = sorted(set(cfg.stages) - set(components))
    if unknown:
        raise ConfigError(f"stages: unknown component(s) {unknown} (known: {', '.join(components)})")
    return plan


def resolve_parent(ctx: BuildContext, stage: Stage) -> Record:
    if stage.parent == "source":
        return ctx.source(stage.component)
    if stage.parent == "torch":  # the newest PyTorch FP32 model: the original, or one a pass made
        return next((r for r in reversed(ctx.records) if r.component == stage.component and r.format == "torch"
                     and r.precision == "fp32" and r.graph in (stage.graph, "*")), None) or ctx.source(stage.component)
    if stage.parent == "onnx":
        return ctx.find(stage.component, stage.graph or stage.component, "onnx", stage.parent_precision)
    raise ConfigError(f"stage {stage.kind} on {stage.component}: parent must be source, torch or onnx, "
                      f"got '{stage.parent}'")


def run_planned(ctx: BuildContext, stage: Stage, cfg: Any) -> list[Record]:
    kind = pass_kind(stage.kind)
    settings = dict(_container(cfg[kind.settings])) if kind.settings else {}
    settings.update(stage.settings)
    parent = resolve_parent(ctx, stage)
    log.info("stage %s on %s/%s (parent %s)", stage.kind, stage.component, stage.graph or "*", parent.file)
    try:
        return run_stage(ctx, stage.kind, parent, settings, graph=stage.graph)
    except StageSkipped as exc:  # cannot pay off on this host: no artifact, not a failure
        log.warning("stage %s on %s/%s skipped: %s", stage.kind, stage.component, stage.graph, exc)
        ctx.skipped.append({"component": stage.component, "graph": str(stage.graph), "kind": stage.kind,
                            "reason": str(exc)})
        return []


def run_stage(ctx: BuildContext, kind_name: str, parent: Record, settings: Mapping[str, Any],
              graph: str | None = None) -> list[Record]:
    """One pass on `parent`: transform (or reuse), judge, time, write. Returns the new records,
    which are also appended to `ctx.records`; on a failed gate nothing of the candidate is left."""
    kind = pass_kind(kind_name)
    config = kind.config({**settings, **({"graph": graph} if graph else {})})
    component = ctx.component(parent.component)
    candidate = _candidate(ctx, kind, config, parent, component, graph)
    try:
        records = isolated(judge_and_time)(ctx, kind, candidate, parent, component)
    except BaseException:
        for r in candidate.records:
            for name in (r.file, *stage_cache.sidecars(r)):  # a loss-curve PNG goes with its model
                (ctx.bundle_dir / name).unlink(missing_ok=True)
        raise
    for record in records:
        write_record(record, ctx.bundle_dir)
        ctx.records.append(record)
    return records


def _candidate(ctx: BuildContext, kind: PassKind, config: Any, parent: Record, component: Component,
               graph: str | None) -> Candidate:
    """The pass's candidate: from the stage cache when its inputs are unchanged, else made now."""
    inputs = {"pass": kind.name, "graph": graph, "parent": parent.sha256, "config": kind.key_fields(config),
              "seed": ctx.seed, "corpus": ctx.corpus.fingerprint(), "code": _code(), "tools": tool_versions()}
    if getattr(kind.load(), "SEARCHES", False):  # its search aims at the gate: a new gate, a new search
        inputs["gate"] = ctx.gates.get(parent.component)
    digest = stage_cache.key(inputs)
    label = f"{kind.name} {parent.file}"
    cached = ctx.cache.load_candidate(label, digest, ctx.bundle_dir)
    if cached is not None:
        log.info("%s: reusing the cached candidate %s", label, ", ".join(r.file for r in cached))
        return Candidate(cached, {"cache": digest})
    pctx = PassContext(ctx.bundle_dir, component, ctx.records, ctx.seed, ctx.threads)
    before = set(os.listdir(ctx.bundle_dir))
    try:
        candidate = kind.transform()(parent, config, pctx)
        candidate.records = [r.replace(sha256=sha256_file(ctx.bundle_dir / r.file), tools=tool_versions(),
                                       created=now_iso()) for r in candidate.records]
    except BaseException:  # whatever a failed pass wrote into the bundle goes with it
        for name in set(os.listdir(ctx.bundle_dir)) - before:
            path = ctx.bundle_dir / name
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        raise
    ctx.cache.store_candidate(digest, candidate.records, ctx.bundle_dir)
    return candidate


def _code() -> str:
    """A fingerprint of the product's code: an entry made by other code (an upgrade, a fix) is
    never reused. Coarse on purpose: a stale artifact costs more than a rebuild."""
    if "code" not in _CODE:
        files = [p for p in PACKAGE.rglob("*.py")
                 if not {"tests", ".venv", ".voxport", "artifacts"} & set(p.relative_to(PACKAGE).parts)]
        _CODE["code"] = stage_cache.code_fingerprint(files)
    return _CODE["code"]


_CODE: dict[str, str] = {}


@functools.cache
def _host() -> Any:
    """This machine, probed once per process (timing keys and TensorRT backends need it)."""
    from voxport.runtime.host import detect

    return detect()


# ---------------------------------------------------------------------------------------------
# Judging and timing


def judge_and_time(ctx: BuildContext, kind: PassKind, candidate: Candidate, parent: Record,
                   component: Component) -> list[Record]:
    figures, failures = judge(ctx, kind, candidate, parent, component)
    timed = kind.timed and candidate.notes.get("timed", True) and not (kind.exact and parent.stage == "source")
    speeds: dict[str, dict[str, Any]] = {}
    slower: list[str] = []
    if timed and not failures:
        time_parent = candidate.notes.get("time_parent", True)
        for record in candidate.records:
            speeds[record.file] = time_artifact(ctx, record, parent, component, time_parent)
        gate = None if kind.exact else component.gate(candidate.records[0].precision)
        if gate is not None and gate.require_speedup:
            for file, speed in speeds.items():
                ratio = speed.get("speedup_vs_parent", speed["speedup_vs_torch_fp32"])
                versus = "its parent" if "speedup_vs_parent" in speed else "PyTorch FP32"
                if ratio <= 1.0:
                    slower.append(f"{file} not faster than {versus}: {ratio:.2f}x (gate require_speedup)")
    if slower and kind.alternative and not failures:
        raise StageSkipped(f"{'; '.join(slower)}; the parent serves")
    failures += slower
    if failures:
        label = candidate.notes.get("label") or ", ".join(r.file for r in candidate.records)
        raise GateError(label, failures, {"quality": figures, "speed": speeds,
                                          **{k: v for k, v in candidate.notes.items() if k != "label"}})
    summary = {k: v for k, v in figures.items() if k in _PARITY_KEYS}
    records = []
    for draft in candidate.records:
        speed = speeds.get(draft.file) or ({"measured": False, "why": "exact export: timed as its children's parent"}
                                           if kind.exact else {"measured": False})
        if kind.exact:
            quality = ({**parent.quality, "inherited_from": parent.file} if parent.quality else {})
            records.append(draft.replace(parity={**draft.parity, **figures}, quality=quality,
                                         speed={**draft.speed, **speed}))
        else:
            records.append(draft.replace(parity={**draft.parity, **summary}, quality={**figures, "passed": True},
                                         speed={**draft.speed, **speed}))
    log.info("%s: %s%s", ", ".join(r.file for r in records), component.headline(figures),
             "".join(f"; {f} {s['speedup_vs_torch_fp32']:.2f}x PyTorch FP32" for f, s in speeds.items()))
    return records


# Figures of a lossy artifact's judgement that its record's `parity` repeats (the headline).
_PARITY_KEYS = ("wav_snr_db_vs_fp32_min", "mr_stft_distance_vs_fp32_max", "embedding_cosine_min",
                "embedding_cosine_mean", "decisions_changed", "mel_snr_db_min", "decoder_mel_snr_db_min",
                "stop_agreement_min")


def judge(ctx: BuildContext, kind: PassKind, candidate: Candidate, parent: Record,
          component: Component) -> tuple[dict[str, Any], list[str]]:
    """The component's verdict on the candidate (from the stage cache when nothing it depends on
    changed: the artifacts, the reference, every setting of the gate, the inputs, the code)."""
    precision = candidate.records[0].precision
    under_test = candidate.records + _siblings(ctx, candidate)
    digest = stage_cache.key({
        "judge": "parity" if kind.exact else "listen", "artifacts": [r.sha256 for r in under_test],
        "parent": parent.sha256, "source": component.source.sha256, "precision": precision,
        "gates": ctx.gates.get(component.name), "tolerances": ctx.tolerances.get(component.name),
        "validation": dataclasses.asdict(ctx.validation), "seed": ctx.seed, "corpus": ctx.corpus.fingerprint(),
        "code": _code()})
    cached = ctx.cache.load(f"judge {candidate.records[0].file}", digest)
    if cached is not None:
        return cached["figures"], cached["failures"]
    from voxport.runtime.backends import open_backend

    backends = {r.graph: open_backend(r, ctx.bundle_dir, graph=r.graph, **_options(ctx, r)) for r in under_test}
    try:
        runners = {graph: b.infer for graph, b in backends.items()}
        if kind.exact:
            figures, failures = component.parity(runners, parent)
        else:
            figures, failures = component.listen(runners, precision)
    finally:
        for backend in backends.values():
            backend.close()
    failures = list(failures) + _integer_check(candidate)
    ctx.cache.store(digest, {"figures": figures, "failures": failures})
    return figures, failures


def _siblings(ctx: BuildContext, candidate: Candidate) -> list[Record]:
    """Artifacts of the same kind already made for the component's other graphs: a lossy
    synthesizer graph is judged beside its FP16 (or TensorRT) siblings, as it will serve."""
    first = candidate.records[0]
    graphs = {r.graph for r in candidate.records}
    return [r for r in ctx.records if r.component == first.component and r.stage == first.stage
            and r.format == first.format and r.precision == first.precision and r.graph not in graphs
            and r.stage != "source"]


def _integer_check(candidate: Candidate) -> list[str]:
    """An INT8 artifact must run integer kernels where ONNX Runtime (or torch) really executes."""
    failures = []
    for r in candidate.records:
        ops = (r.parity or {}).get("integer_ops")
        if r.precision.startswith("int8") and ops is not None:
            from voxport.quantize.qdq import integer_op_total

            if integer_op_total(ops.get("runtime") or {}) == 0:
                failures.append(f"{r.file}: INT8 silently stayed float: no integer kernel runs ({ops})")
    return failures


def _options(ctx: BuildContext, record: Record, variant: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Backend options for judging and timing in the build: the runtime's own backends, with the
    build's threads (and, for timing, the session settings under trial)."""
    if record.format == "onnx":
        from voxport.runtime.backends.onnxruntime import SessionSettings

        settings = SessionSettings(intra_op_threads=ctx.threads)
        if variant is not None:
            settings = settings.with_overrides(**variant)
        return {"settings": settings}
    if record.format == "trt":
        return {"host": _host()}
    if record.format == "openvino":
        return {"threads": ctx.threads or None}
    return {}


def time_artifact(ctx: BuildContext, record: Record, parent: Record, component: Component,
                  time_parent: bool = True) -> dict[str, Any]:
    """Speed of `record` vs PyTorch FP32 and vs its parent, interleaved in this process. ONNX
    artifacts are timed under every combination of `timing.session_*` settings (graph optimization
    and layout, threads, spinning) and the fastest is recorded in `speed.session`, with the median of
    every variant, for every consumer (runtime, bench, serve) to open it with: no setting assumed."""
    import platform

    host = _host()
    digest = stage_cache.key({
        "time": record.sha256, "parent": parent.sha256 if time_parent else None, "source": component.source.sha256,
        "timing": dataclasses.asdict(ctx.timing), "threads": ctx.threads, "seed": ctx.seed,
        "host": [host.cpu_model, host.cores, host.cpu_flags, platform.machine()], "tools": tool_versions(),
        "code": _code()})
    cached = ctx.cache.load(f"time {record.file}", digest)
    if cached is not None:
        return {**cached, "reused_from_cache": True}
    from voxport.runtime.backends import open_backend

    feed = component.timing_feed(record.graph, ctx.timing.seconds)
    opened = []

    def runner(r: Record, variant: Mapping[str, Any] | None = None) -> Any:
        # A parent is timed as it serves: with the session settings its own timing recorded.
        options = {} if variant is None and (r.speed or {}).get("session") else _options(ctx, r, variant)
        backend = open_backend(r, ctx.bundle_dir, graph=record.graph, **options)
        opened.append(backend)
        return feed.wrap(backend.infer)

    try:
        runners = {"torch_fp32": feed.wrap(component.reference_runner(record.graph))}
        if parent.stage != "source" and parent.graph in (record.graph, "*") and time_parent:
            runners["parent"] = runner(parent)
        variants = session_variants(ctx.timing, ctx.threads) if record.format == "onnx" else []
        labels = {variant_label(v, variants): v for v in variants} or {None: None}
        for label, variant in labels.items():
            runners[f"artifact:{label}"] = runner(record, variant)
        t = timing.side_by_side(runners, feed.feed, max(1, ctx.timing.repeats), min_seconds=ctx.timing.min_seconds)
    finally:
        for backend in opened:
            backend.close()
    best = min(labels, key=lambda lb: t[f"artifact:{lb}"]["median_s"])
    speed = timing.speed_from_timings(t, feed.audio_seconds, f"artifact:{best}",
                                      "parent" if "parent" in t else None)
    if "parent" in t:
        speed["parent_speedup_vs_torch_fp32"] = speed["torch_fp32_median_s"] / speed["parent_median_s"]
    if best is not None:
        speed["session"] = {**_options(ctx, record, labels[best])["settings"].to_dict(),
                            "medians_s": {lb: t[f"artifact:{lb}"]["median_s"] for lb in labels}}
    speed.update({"measured": True, "threads": ctx.threads, "input": feed.describe, "measured_on": now_iso()})
    ctx.cache.store(digest, speed)
    return speed


# ---------------------------------------------------------------------------------------------
# Sources and the bundle swap


def write_source(component: StackComponent, bundle_dir: Path) -> Record:
    """The PyTorch FP32 original in inference form: the reference every other artifact is judged by."""
    name = f"{component.name}_fp32.pt"
    path = registry.save_torch_artifact(component.module, bundle_dir / name)
    graph = "*" if len(registry.graph_specs(component.module, component.model)) > 1 else component.name
    record = Record(
        component=component.name, graph=graph, format="torch", precision="fp32", file=name,
        sha256=sha256_file(path), weights=component.weights, stage="source",
        parent=component.source, parent_sha256=component.source_sha256, model=component.model,
        contract=component.contract, config={"source": component.source}, tools=tool_versions(),
        created=now_iso(),
    )
    write_record(record, bundle_dir)
    return record


def _replace_dir(staging: Path, out_dir: Path) -> None:
    """Swap the finished staging directory into place; the old bundle goes only after that."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{staging.name.rsplit('-', 1)[-1]}")
        out_dir.rename(old)
    staging.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
