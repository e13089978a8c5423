"""Pass `tensorrt`: a serialized TensorRT engine per graph, from an FP16 (or FP32) ONNX artifact.

Written against the TensorRT Python API (10.x / 11.x) and imported lazily: this host has neither
CUDA nor TensorRT, so here the stage stops with one line naming what is missing. The engine is
built on, and only loads on, the GPU whose fingerprint its record carries (GPU, compute
capability, TensorRT, CUDA, driver) together with its optimization profiles, which come from the
lengths real inputs have (export/profiles.py). Precision: TensorRT >= 10.12 builds a strongly
typed network, so FP16 vs FP32 per node is exactly the ONNX tensor types (the overflow-prone
nodes the fp16 stage kept FP32 stay FP32); older releases get the FP16 builder flag with every
FP32-typed layer pinned to FP32, which emulates the same.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from voxport.errors import ConfigError, EngineBuildError
from voxport.export.profiles import ProfileConfig, axis_ranges, profile_shapes
from voxport.pipeline.passes import Candidate, PassContext, known_settings
from voxport.pipeline.records import Record
from voxport.runtime.host import Host, detect, missing_requirements

log = logging.getLogger(__name__)

STRONG_TYPING_SINCE = (10, 12)


@dataclass(frozen=True)
class TensorRTConfig:
    workspace_mb: int = 2048
    optimization_level: int = 3  # builder optimization level, 0..5
    timing_cache: str | None = None  # persistent timing cache file (None: none)
    strongly_typed: str = "auto"  # auto | always | never
    tf32: bool = False
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    graph: str = ""

    def __post_init__(self) -> None:
        if self.strongly_typed not in ("auto", "always", "never"):
            raise ConfigError(f"tensorrt.strongly_typed must be auto, always or never, got '{self.strongly_typed}'")
        if not 0 <= self.optimization_level <= 5:
            raise ConfigError(f"tensorrt.optimization_level must be in 0..5, got {self.optimization_level}")

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> TensorRTConfig:
        data = known_settings(cls, settings, "tensorrt", ignored=())
        data["profile"] = ProfileConfig.from_dict(data.get("profile"))
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def require_tensorrt(host: Host) -> Any:
    """The `tensorrt` module, or BackendUnavailable in one line naming everything that is missing."""
    from voxport.errors import BackendUnavailable

    missing = missing_requirements(("cuda", "tensorrt"), host)
    if missing:
        raise BackendUnavailable("cannot build TensorRT engines on this host: " + "; ".join(missing))
    import tensorrt

    return tensorrt


def strongly_typed(version: str, mode: str) -> bool:
    """Whether to build a strongly typed network with this TensorRT version (pure)."""
    if mode != "auto":
        return mode == "always"
    numbers = tuple(int(p) for p in re.findall(r"\d+", version)[:2])
    return numbers >= STRONG_TYPING_SINCE


def parser_errors(parser: Any) -> list[str]:
    """Every error the ONNX parser recorded, with the node it names where the release says."""
    errors = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        where = [f"node {err.node()}"] if err.node() >= 0 else []
        for attr in ("node_name", "node_operator"):
            if hasattr(err, attr) and getattr(err, attr)():
                where.append(str(getattr(err, attr)()))
        errors.append(f"{' '.join(where) or 'graph'}: {err.desc()} ({err.code()})")
    return errors


def _pin_fp32_layers(trt: Any, network: Any) -> int:
    """Weakly typed builds: keep every layer the ONNX typed FP32 in FP32 (the FP16 flag would let
    TensorRT run the overflow-prone nodes in FP16 too)."""
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if outputs and all(t.dtype == trt.float32 for t in outputs) and layer.type != trt.LayerType.CONSTANT:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            pinned += 1
    return pinned


def build_engine(trt: Any, onnx_path: Path, profiles: Mapping[str, Mapping[str, list[int]]],
                 cfg: TensorRTConfig, fp16: bool) -> tuple[bytes, dict[str, Any]]:
    """Parse, configure and build; (serialized engine, build facts for the record)."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strong = strongly_typed(trt.__version__, cfg.strongly_typed)
    flags = 0
    if strong and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    parsed = parser.parse_from_file(str(onnx_path))
    errors = parser_errors(parser)
    if not parsed or errors:
        raise EngineBuildError(f"{onnx_path.name}: the TensorRT ONNX parser failed: "
                               + " | ".join(errors or ["no detail"]))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, cfg.workspace_mb << 20)
    config.builder_optimization_level = cfg.optimization_level
    if not cfg.tf32 and hasattr(trt.BuilderFlag, "TF32"):  # FP32 layers (kept FP32 on purpose) stay FP32
        config.clear_flag(trt.BuilderFlag.TF32)
    pinned = 0
    if fp16 and not strong:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        pinned = _pin_fp32_layers(trt, network)
    profile = builder.create_optimization_profile()
    for name, shapes in profiles.items():
        profile.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(profile)
    cache_path = Path(cfg.timing_cache) if cfg.timing_cache else None
    cache_bytes = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"{onnx_path.name}: TensorRT could not build the engine (see its log above)")
    if cache_path is not None:
        _write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
    facts = {"strongly_typed": strong, "fp16_builder_flag": fp16 and not strong, "layers_pinned_fp32": pinned,
             "layers": network.num_layers, "timing_cache": str(cache_path) if cache_path else None,
             "timing_cache_reused": bool(cache_bytes)}
    return bytes(serialized), facts


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


CONFIG = TensorRTConfig


def transform(parent: Record, tcfg: TensorRTConfig, ctx: PassContext) -> Candidate:
    """Engine of `parent` (an ONNX artifact) built on this GPU; its record carries the fingerprint."""
    if parent.format != "onnx":
        raise ConfigError(f"tensorrt stage needs an ONNX parent, got {parent.file} ({parent.format})")
    ctx.component.gate(parent.precision)  # before the (long) build: a missing gate fails fast
    host = detect()
    trt = require_tensorrt(host)
    lengths, provenance = ctx.component.axis_lengths()
    ranges = axis_ranges(lengths, tcfg.profile)
    profiles = profile_shapes(parent.inputs, ranges)
    engine, facts = build_engine(trt, ctx.bundle_dir / parent.file, profiles, tcfg, fp16=parent.precision == "fp16")
    path = ctx.bundle_dir / f"{Path(parent.file).stem}.plan"
    _write_bytes(path, engine)
    draft = Record(
        component=parent.component, graph=parent.graph, format="trt", precision=parent.precision, file=path.name,
        sha256="", weights=parent.weights, stage="tensorrt", inputs=parent.inputs, outputs=parent.outputs,
        parent=parent.file, parent_sha256=parent.sha256, model=parent.model, contract=parent.contract,
        host={**host.fingerprint(), "profiles": profiles},
        config={**tcfg.to_dict(), **facts, "axis_ranges": ranges, "profile_sources": provenance},
        speed={"note": "engine on the GPU vs PyTorch FP32 on this host's CPU, in one process"},
    )
    # Timed against PyTorch only: its FP16 ONNX parent on ONNX Runtime CPU says nothing of a GPU.
    return Candidate([draft], {"label": f"{parent.key} TensorRT {parent.precision}", "time_parent": False})
