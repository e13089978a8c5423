"""Artifact records: the JSON sidecar beside every artifact, and the bundle manifest.

The runtime reads records, never guesses from file names. A record is written only for an
artifact that passed its validation, and only after the artifact itself is in place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import os
import platform
import statistics
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from voxport.errors import ConfigError

RECORD_VERSION = 1
FORMATS = ("torch", "onnx", "trt", "openvino")
# The engine that runs each format, by the name logs, /health and bench rows use.
ENGINES = {"torch": "torch", "onnx": "onnxruntime", "openvino": "openvino", "trt": "tensorrt"}
PRECISIONS = ("fp32", "fp16", "bf16", "int8-dynamic", "int8-static")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32", "int64", ...
    shape: tuple[str | int, ...]  # symbolic axes are strings ("batch", "frames")


@dataclass(frozen=True)
class Record:
    """What one artifact is, where it came from, and how well it matches the PyTorch original."""

    component: str  # speaker_encoder | synthesizer | vocoder
    graph: str  # speaker_encoder | encoder | decoder_step | postnet | vocoder
    format: str  # torch | onnx | trt | openvino
    precision: str  # fp32 | fp16 | bf16 | int8-dynamic | int8-static
    file: str  # file name, relative to the bundle directory
    sha256: str
    weights: str  # "real" (trained weights) | "seeded" (built from a seed: output is not speech)
    stage: str  # source | export | quantize-dynamic | quantize-static | prune | fp16 | tensorrt | openvino
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    parent: str | None = None  # parent artifact file name
    parent_sha256: str | None = None
    model: dict[str, Any] = field(default_factory=dict)  # model config to rebuild a torch module
    contract: dict[str, Any] = field(default_factory=dict)  # sample rate, mel params, dims
    config: dict[str, Any] = field(default_factory=dict)  # the stage config that made it
    sparsity: float = 0.0
    parity: dict[str, Any] = field(default_factory=dict)  # figures vs the PyTorch FP32 original
    quality: dict[str, Any] = field(default_factory=dict)  # listener-side figures (vs recordings)
    speed: dict[str, Any] = field(default_factory=dict)  # timings measured in one process
    tools: dict[str, str] = field(default_factory=dict)
    host: dict[str, Any] = field(default_factory=dict)  # engine fingerprint (TensorRT only)
    created: str = ""

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"record {self.file}: unknown format '{self.format}'")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"record {self.file}: unknown precision '{self.precision}'")
        if self.weights not in ("real", "seeded"):
            raise ConfigError(f"record {self.file}: weights must be 'real' or 'seeded'")

    @property
    def key(self) -> str:
        """Component and graph, e.g. `synthesizer/decoder_step`."""
        return f"{self.component}/{self.graph}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Record:
        data = dict(data)
        data.pop("record_version", None)
        for io in ("inputs", "outputs"):
            data[io] = tuple(
                TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in data.get(io, ())
            )
        return cls(**data)

    def replace(self, **changes: Any) -> Record:
        return dataclasses.replace(self, **changes)


def tool_versions() -> dict[str, str]:
    """Versions of the engines that can make or run artifacts (absent ones are omitted)."""
    import importlib.metadata

    versions = {"python": platform.python_version()}
    for dist in ("voxport", "torch", "onnx", "onnxruntime", "openvino", "tensorrt"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` to write; renamed onto `path` only when the block succeeds,
    so readers never see half a file (and a failed write leaves nothing behind)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through `atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def record_path(artifact: Path) -> Path:
    return Path(str(artifact) + ".json")


def write_record(record: Record, bundle_dir: Path) -> Path:
    """Write `<artifact>.json` beside the artifact (which must already exist)."""
    artifact = Path(bundle_dir) / record.file
    if not artifact.is_file():
        raise ConfigError(f"refusing to write a record for a missing artifact: {artifact}")
    out = record_path(artifact)
    payload = {"record_version": RECORD_VERSION, **record.to_dict()}
    atomic_write_text(out, json.dumps(payload, indent=2, sort_keys=False, default=_json_default) + "\n")
    return out


def read_record(path: Path) -> Record:
    path = Path(path)
    if not path.name.endswith(".json"):
        path = record_path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read record {path}: {exc}") from None
    return Record.from_dict(data)


def read_bundle(bundle_dir: Path) -> list[Record]:
    """All records listed in `<bundle>/manifest.json`."""
    manifest = Path(bundle_dir) / "manifest.json"
    if not manifest.is_file():
        raise ConfigError(f"no manifest.json in {bundle_dir}: run `voxport build` first")
    data = json.loads(manifest.read_text())
    return [read_record(Path(bundle_dir) / name) for name in data["records"]]


def write_manifest(bundle_dir: Path, records: list[Record], stack: dict[str, Any],
                   skipped: list[dict[str, str]] | None = None) -> Path:
    """The bundle's index: every record plus the stack contracts (and stages skipped on this host)."""
    payload = {
        "manifest_version": RECORD_VERSION,
        "created": now_iso(),
        "stack": stack,
        "tools": tool_versions(),
        "records": [r.file + ".json" for r in records],
        "skipped_stages": list(skipped or []),
    }
    out = Path(bundle_dir) / "manifest.json"
    atomic_write_text(out, json.dumps(payload, indent=2, default=_json_default) + "\n")
    return out


def _json_default(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    try:  # numpy scalars and arrays
        return obj.tolist()
    except AttributeError:
        raise TypeError(f"not JSON serialisable: {type(obj).__name__}") from None


def parent_speedups(records: Iterable[Record]) -> dict[str, float]:
    """Speed-ups over PyTorch FP32 of artifacts timed only as some child's parent (an FP32 ONNX
    export is timed beside every INT8 artifact made from it), by file: the median over children."""
    seen: dict[str, list[float]] = {}
    for r in records:
        speed = r.speed or {}
        ratio = speed.get("parent_speedup_vs_torch_fp32") or speed.get("ort_fp32_speedup_vs_torch_fp32")
        if r.parent and ratio:
            seen.setdefault(r.parent, []).append(float(ratio))
    return {file: statistics.median(values) for file, values in seen.items()}
