"""`voxport package format=triton`: a Triton Inference Server model repository from a built bundle.

    <out>/
      speaker_encoder/           config.pbtxt, 1/model.onnx (or model.plan)  batched, dynamic batching
      synthesizer_encoder/       config.pbtxt, 1/model.onnx                  one text per request
      synthesizer_decoder_step/  config.pbtxt, 1/model.onnx                  stateful: implicit state
      synthesizer_postnet/       config.pbtxt, 1/model.onnx                  batched, dynamic batching
      vocoder/                   config.pbtxt, 1/model.onnx (or model.plan)  batched, dynamic batching
      voxport_tts/               config.pbtxt, 1/model.py + voxport_tts.json + voxport_frontend/  (BLS, decoupled)
      MODEL_CARD.md, voxport_package.json, manifest.json and every record (<artifact>.json) of the bundle

Each graph is served by the artifact the unified runtime selects for the target
(runtime/select.py): `target=cpu` the fastest gate-passing CPU ONNX artifact, `target=tensorrt` a
TensorRT engine whose fingerprint matches this host, else ONNX on CUDA, else the CPU choice (the
reason is written in the model card). Every artifact's sha256 is checked against its record before
it is copied. The repository is assembled in a temporary sibling directory, validated
(validate.py), and renamed into place; a non-empty `out` is replaced only with `force`.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from voxport.errors import BackendUnavailable, PackageError
from voxport.export.triton import configs, stateful
from voxport.export.triton.configs import TensorIO
from voxport.export.triton.model_card import write_model_card
from voxport.export.triton.settings import SETTINGS_HELP, TARGETS, PackageConfig, parse_settings
from voxport.export.triton.tts_model import TTS_MODEL, write_tts_model
from voxport.export.triton.validate import protobuf_schema, validate_repository
from voxport.pipeline.records import Record, now_iso, read_bundle, record_path
from voxport.runtime.host import Host, detect

log = logging.getLogger(__name__)

__all__ = ["SETTINGS_HELP", "Package", "PackageConfig", "package_triton", "parse_settings"]

# Triton model name -> (component, graph) of the bundle.
GRAPH_MODELS = {
    "speaker_encoder": ("speaker_encoder", "speaker_encoder"),
    "synthesizer_encoder": ("synthesizer", "encoder"),
    "synthesizer_decoder_step": ("synthesizer", "decoder_step"),
    "synthesizer_postnet": ("synthesizer", "postnet"),
    "vocoder": ("vocoder", "vocoder"),
}
STATEFUL = "synthesizer_decoder_step"


@dataclass
class PackagedModel:
    """One graph model as packaged: what serves it and why."""

    name: str
    record: Record
    reason: str
    file: str  # model.onnx | model.plan
    sha256: str  # of the packaged file (differs from the record's only for an edited graph)
    backend: str
    config: dict[str, Any]
    edits: list[str] = field(default_factory=list)


@dataclass
class Package:
    path: Path
    models: list[PackagedModel]
    parsed_with_schema: bool

    def summary(self) -> str:
        lines = [f"{m.name:<26} {m.record.file} ({m.record.precision}, {m.backend}"
                 f"{', stateful' if m.name == STATEFUL else ''}): {m.reason}" for m in self.models]
        lines.append(f"{TTS_MODEL:<26} Python backend, BLS over the models above, decoupled (streams audio)")
        check = ("every config.pbtxt parsed with tritonclient's ModelConfig schema" if self.parsed_with_schema
                 else "tritonclient not installed: configs not parsed with Triton's schema")
        return "\n".join([*lines, check, f"repository: {self.path}"])


def package_triton(cfg: PackageConfig, host: Host | None = None) -> Package:
    """Write the Triton model repository `cfg.out` from the bundle `cfg.bundle_dir`."""
    out = cfg.out.resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not cfg.force:
        raise PackageError(f"{out} exists and is not empty; pass --force (force=true) to replace it")
    records = read_bundle(cfg.bundle_dir)
    host = host or detect()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.packaging-", dir=out.parent))
    try:
        models = [_graph_model(name, records, cfg, host, tmp) for name in GRAPH_MODELS]
        tts_config = write_tts_model(records, models, cfg, tmp)
        written = {m.name: m.config for m in models} | {TTS_MODEL: tts_config}
        graphs = {m.name: tmp / m.name / "1" / "model.onnx" if m.file == "model.onnx"
                  else Path(cfg.bundle_dir) / (m.record.parent or "") for m in models}
        parsed = validate_repository(tmp, graphs, written)
        _carry_bundle(cfg.bundle_dir, records, tmp)
        _write_package_json(tmp, cfg, models, host, parsed)
        write_model_card(tmp / "MODEL_CARD.md", records, models, cfg, host, parsed)
        tmp.chmod(0o755)  # mkdtemp makes it private; a server in a container reads it as another user
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    package = Package(out, models, all(parsed.values()) and protobuf_schema() is not None)
    log.info("Triton model repository written to %s (%d models)", out, len(models) + 1)
    return package


def _selection(name: str, records: list[Record], cfg: PackageConfig, host: Host) -> tuple[Record, str]:
    from voxport.runtime.select import ranked

    component, graph = GRAPH_MODELS[name]
    try:
        choices = ranked(records, component, graph, host, TARGETS[cfg.target])
    except BackendUnavailable as exc:
        raise PackageError(f"{name}: nothing in the bundle can serve it on Triton: {exc}") from None
    if name == STATEFUL:  # the state edit needs an ONNX graph; an engine cannot be edited
        onnx = [c for c in choices if c.record.format == "onnx"]
        if not onnx:
            raise PackageError(f"{name}: the stateful decoder step needs an ONNX artifact; the bundle has none")
        skipped = choices[0].record.file if choices[0].record.format != "onnx" else None
        choice = onnx[0]
        reason = choice.reason + (f" (not {skipped}: Triton's implicit state needs the ONNX graph edited, "
                                  "see export/triton/stateful.py)" if skipped else "")
        return choice.record, reason
    return choices[0].record, choices[0].reason


def _graph_model(name: str, records: list[Record], cfg: PackageConfig, host: Host, root: Path) -> PackagedModel:
    import onnx

    from voxport.models.checkpoint import sha256_file
    from voxport.runtime.backends.base import verified_artifact

    record, reason = _selection(name, records, cfg, host)
    try:
        artifact = verified_artifact(record, cfg.bundle_dir)
    except BackendUnavailable as exc:
        raise PackageError(f"{name}: {exc}") from None
    version_dir = root / name / "1"
    version_dir.mkdir(parents=True)
    edits: list[str] = []
    if record.format == "trt":
        parent = Path(cfg.bundle_dir) / (record.parent or "")
        if not record.parent or not parent.is_file():
            raise PackageError(f"{name}: engine {record.file} has no ONNX parent in the bundle to read its "
                               "tensors from")
        inputs, outputs = configs.graph_io(parent)
        target, backend = version_dir / "model.plan", "tensorrt"
        shutil.copyfile(artifact, target)
        states: list[tuple[TensorIO, TensorIO, list[int]]] = []
    else:
        model = onnx.load(str(artifact), load_external_data=False)
        if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
            raise PackageError(f"{name}: {record.file} keeps its weights in external files, which this packager "
                               "does not copy")
        inputs, outputs = configs.graph_io(model)
        target, backend = version_dir / "model.onnx", "onnxruntime"
        states = []
        if name == STATEFUL:
            from voxport.models.synthesizer_io import STATE_NAMES

            pairs = stateful.state_pairs(inputs, outputs, STATE_NAMES)
            model, edits = stateful.broadcast_variable_states(model, pairs, inputs)
            inputs, outputs = configs.graph_io(model)
            pairs = stateful.state_pairs(inputs, outputs, STATE_NAMES)
            states = [(i, o, stateful.initial_dims(i, batched=False)) for i, o in pairs]
        if edits:
            onnx.save(model, str(target))
        else:
            shutil.copyfile(artifact, target)
    batchable = name != STATEFUL and configs.batch_axis(_declared(record, inputs, outputs)) is not None
    config = configs.graph_model_config(
        name, inputs, outputs, backend=backend, max_batch_size=cfg.max_batch_size if batchable else 0,
        kind=cfg.kind, count=cfg.instances, states=states, parameters=_backend_parameters(record, cfg),
        queue_delay_us=cfg.queue_delay_us, idle_us=cfg.sequence_idle_us)
    header = [f"voxport {name}: {record.component}/{record.graph} from {record.file} ({record.format} "
              f"{record.precision}, {record.weights} weights, sha256 {record.sha256})",
              f"selected for target={cfg.target}: {reason}"]
    if edits:
        header.append(f"graph edited for Triton's zero initial state: {', '.join(edits)} broadcast to the text "
                      "width (export/triton/stateful.py)")
    (root / name / "config.pbtxt").write_text(configs.to_pbtxt(config, header))
    return PackagedModel(name, record, reason, target.name, sha256_file(target), backend, config, edits)


def _declared(record: Record, inputs: list[TensorIO], outputs: list[TensorIO]) -> list[TensorIO]:
    """The graph's tensors with the axis names the export declared (record.inputs / outputs), which
    say which axis is the batch; the graph's own names when the record has none."""
    graph = [*inputs, *outputs]
    specs = {t.name: t for t in (*record.inputs, *record.outputs)}
    if not specs:
        return graph
    if set(specs) != {t.name for t in graph}:
        raise PackageError(f"{record.file}: its record names tensors {sorted(specs)}, its graph "
                           f"{sorted(t.name for t in graph)}")
    declared = []
    for t in graph:
        shape = tuple(specs[t.name].shape)
        if len(shape) != len(t.shape):
            raise PackageError(f"{record.file}: tensor {t.name} has rank {len(shape)} in its record, "
                               f"{len(t.shape)} in its graph")
        declared.append(TensorIO(t.name, t.data_type, shape))
    return declared


def _backend_parameters(record: Record, cfg: PackageConfig) -> dict[str, str]:
    """ONNX Runtime threads from the session the build timed the artifact under (speed.session)."""
    if record.format != "onnx" or cfg.target != "cpu":
        return {}
    from voxport.runtime.backends.onnxruntime import SessionSettings

    settings = SessionSettings.from_dict((record.speed or {}).get("session"))
    params = {"inter_op_thread_count": settings.inter_op_threads}
    if settings.intra_op_threads > 0:
        params["intra_op_thread_count"] = settings.intra_op_threads
    return params


def _carry_bundle(bundle_dir: Path, records: list[Record], root: Path) -> None:
    """The bundle's manifest and every record, verbatim, at the repository's top level (Triton only
    loads directories as models, so top-level files ride along)."""
    shutil.copyfile(Path(bundle_dir) / "manifest.json", root / "manifest.json")
    for record in records:
        source = record_path(Path(bundle_dir) / record.file)
        shutil.copyfile(source, root / source.name)


def _write_package_json(root: Path, cfg: PackageConfig, models: list[PackagedModel], host: Host,
                        parsed: Mapping[str, bool]) -> None:
    payload = {
        "format": "triton", "created": now_iso(), "target": cfg.target, "bundle": str(Path(cfg.bundle_dir).resolve()),
        "packaged_on": host.describe(),
        "configs_parsed_with_tritonclient_schema": dict(parsed),
        "models": {m.name: {"artifact": m.record.file, "artifact_sha256": m.record.sha256, "file": m.file,
                            "file_sha256": m.sha256, "backend": m.backend, "precision": m.record.precision,
                            "weights": m.record.weights, "reason": m.reason, "graph_edits": m.edits}
                   for m in models},
    }
    (root / "voxport_package.json").write_text(json.dumps(payload, indent=2) + "\n")


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished repository onto `out`; an existing `out` (checked empty or forced) is
    moved aside first and removed only after the rename succeeded."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.replaced-", dir=out.parent))
        out.rename(old / "previous")
    try:
        tmp.rename(out)
    except OSError:
        if old is not None:
            (old / "previous").rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
