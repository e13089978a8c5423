"""Which artifact serves a graph: a pure function of the records, the host and a preference.

Tiers, tried in the preference order (default: all of them, fastest first):
- `trt`: a TensorRT engine whose portability fingerprint matches this host;
- `onnx-cuda`: an ONNX artifact on ONNX Runtime's CUDA provider (FP16 before FP32);
- `cpu`: the fastest gate-passing CPU artifact of any format (ONNX Runtime, OpenVINO, PyTorch), by
  its recorded speed-up over PyTorch FP32 (measured side by side in one process when it was built);
- `onnx`: the same, ONNX artifacts only;
- `torch`: the PyTorch FP32 original.
The choice carries its reason (and why every earlier tier was passed over), so logs,
`voxport doctor` and the service's /health say exactly what serves and why. `strict` refuses
anything but the first preference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from voxport.errors import BackendUnavailable, ConfigError
from voxport.pipeline.records import Record, parent_speedups
from voxport.pipeline.schema import build
from voxport.runtime.host import Host, fingerprint_mismatches

TIERS = ("trt", "onnx-cuda", "cpu", "onnx", "torch")
DEFAULT_PREFERENCE = ("trt", "onnx-cuda", "cpu", "torch")
CPU_PROVIDERS = ("CPUExecutionProvider",)
CPU_FORMATS = ("onnx", "openvino", "torch")  # engines of the `cpu` tier: ONNX Runtime, OpenVINO, PyTorch
CUDA_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
# ONNX precisions worth running on ONNX Runtime CUDA, best first (its INT8 kernels are CPU-oriented).
_CUDA_PRECISIONS = ("fp16", "fp32")


@dataclass(frozen=True)
class TargetConfig:
    """The `target:` node (conf/target/*.yaml): what the build must find on the host, and what every
    command that selects artifacts (serve, bench, clone, vocode, doctor) prefers."""

    name: str = "cpu"
    requires: tuple[str, ...] = ()  # host capabilities the build checks first (runtime/host.py)
    preference: tuple[str, ...] = ("cpu", "torch")  # tiers in order, as conf/target/cpu.yaml
    threads: int = 0  # build: threads the stages time with; clone/vocode: intra-op threads (0: engine default)
    strict: bool = False  # refuse any fallback from the first preference

    def __post_init__(self) -> None:
        object.__setattr__(self, "requires", tuple(str(r) for r in self.requires or ()))
        object.__setattr__(self, "preference", tuple(str(p) for p in self.preference or ()))
        unknown = [p for p in self.preference if p not in TIERS]
        if unknown or not self.preference:
            raise ConfigError(f"target.preference must name tiers of {', '.join(TIERS)}, got {list(self.preference)}")
        if not isinstance(self.strict, bool):  # a string such as "maybe" would read as true
            raise ConfigError(f"target.strict must be true or false, got {self.strict!r}")
        if not isinstance(self.threads, int) or self.threads < 0:
            raise ConfigError(f"target.threads must be an integer >= 0, got {self.threads!r}")

    @classmethod
    def from_cfg(cls, node: Any) -> TargetConfig:
        """From the composed `target` node (or any mapping); an unknown key is a one-line ConfigError."""
        return build(cls, node, "target")


@dataclass(frozen=True)
class Selection:
    """The chosen artifact, the tier that serves it, and why. Unpacks as (record, reason)."""

    record: Record
    reason: str
    tier: str

    def __iter__(self):  # `record, reason = select(...)`
        return iter((self.record, self.reason))

    @property
    def providers(self) -> tuple[str, ...]:
        """ONNX Runtime providers to ask for (ONNX tiers only)."""
        return CUDA_PROVIDERS if self.tier == "onnx-cuda" else CPU_PROVIDERS


def candidates(records: Sequence[Record], component: str, graph: str) -> list[Record]:
    """Records that can serve `component/graph` (a torch record with graph '*' serves them all)."""
    return [r for r in records if r.component == component and r.graph in (graph, "*")]


def _ratio(record: Record) -> float | None:
    ratio = record.speed.get("speedup_vs_torch_fp32") if record.speed else None
    return float(ratio) if ratio else None


def _cpu_rank(record: Record, parent_ratios: dict[str, float]) -> tuple[float, int]:
    # Fastest measured first. An FP32 export timed only as a child's parent takes that figure; one
    # never timed counts as PyTorch's speed (it computes the same thing); an unmeasured lossy
    # artifact goes last: only a measured one has earned its place.
    ratio = _ratio(record) or parent_ratios.get(record.file)
    if ratio is None:
        ratio = 1.0 if record.precision == "fp32" else 0.0
    return (-ratio, 0 if record.precision == "fp32" else 1)


def _passed(record: Record) -> bool:
    return record.quality.get("passed", True) is not False


def _cpu_candidates(found: list[Record], host: Host, formats: tuple[str, ...],
                    parent_ratios: dict[str, float]) -> tuple[list[Record], list[str]]:
    ok, notes = [], []
    for r in found:
        if r.format not in formats or r.stage == "source" or not _passed(r):
            continue
        if r.precision == "fp16":
            notes.append(f"{r.file} is a GPU artifact (FP16 on a CPU runs through inserted Casts)")
        elif (r.precision == "bf16" or (r.config or {}).get("inference_precision") == "bf16") \
                and not host.native_bf16:
            notes.append(f"{r.file} needs native bfloat16 (avx512_bf16 / amx_bf16), absent here")
        else:
            ok.append(r)
    return sorted(ok, key=lambda r: _cpu_rank(r, parent_ratios)), notes


def _tier(tier: str, found: list[Record], host: Host) -> tuple[list[Record], str]:
    """(records able to serve, best first, and why the first serves) or ([], why none can)."""
    if tier == "trt":
        engines = [r for r in found if r.format == "trt"]
        if not engines:
            return [], "no TensorRT engine in the bundle"
        if not host.tensorrt_usable:
            return [], f"{len(engines)} engine(s) in the bundle, but " + (
                "no CUDA device here" if not host.cuda_available else
                f"TensorRT is not usable here ({host.tensorrt_error or 'not installed'})")
        matching, mismatched = [], []
        for r in sorted(engines, key=lambda r: r.precision != "fp16"):
            problems = fingerprint_mismatches(r.host, host.fingerprint())
            if problems:
                mismatched.append(f"{r.file}: {'; '.join(problems)}")
            else:
                matching.append(r)
        if not matching:
            return [], "no engine matches this host (" + " | ".join(mismatched) + ")"
        fp = matching[0].host
        return matching, (f"TensorRT {matching[0].precision} engine built for this GPU ({fp.get('gpu')}, sm "
                          f"{fp.get('compute_capability')}, TensorRT {fp.get('tensorrt')})")
    if tier == "onnx-cuda":
        onnx = [r for r in found if r.format == "onnx" and r.precision in _CUDA_PRECISIONS and _passed(r)]
        if not onnx:
            return [], "no FP16/FP32 ONNX artifact"
        if not host.onnxruntime_cuda:
            return [], ("no CUDA device here" if not host.cuda_available
                        else "ONNX Runtime has no CUDAExecutionProvider here")
        onnx.sort(key=lambda r: _CUDA_PRECISIONS.index(r.precision))
        return onnx, f"onnx {onnx[0].precision} on ONNX Runtime CUDA"
    if tier in ("cpu", "onnx"):
        parent_ratios = parent_speedups(found)
        ranked_cpu, notes = _cpu_candidates(found, host, CPU_FORMATS if tier == "cpu" else ("onnx",),
                                            parent_ratios)
        if not ranked_cpu:
            return [], "no CPU artifact" + (f" ({'; '.join(notes)})" if notes else "")
        best = ranked_cpu[0]
        ratio, as_parent = _ratio(best), parent_ratios.get(best.file)
        speed = (f"{ratio:.2f}x PyTorch FP32 measured" if ratio else
                 f"{as_parent:.2f}x PyTorch FP32 measured beside its INT8 children" if as_parent else
                 "speed not measured")
        others = f", fastest of {len(ranked_cpu)} CPU artifacts" if len(ranked_cpu) > 1 else ""
        return ranked_cpu, f"{best.format} {best.precision} on CPU, {speed}{others}"
    if tier == "torch":
        source = [r for r in found if r.format == "torch" and r.stage == "source"]
        if not source:
            return [], "no PyTorch original in the bundle"
        return source[:1], "PyTorch FP32 original on CPU"
    raise BackendUnavailable(f"unknown preference '{tier}' (known: {', '.join(TIERS)})")


def ranked(
    records: Sequence[Record], component: str, graph: str, host: Host,
    preference: Sequence[str] = DEFAULT_PREFERENCE, strict: bool = False,
) -> list[Selection]:
    """Every tier that can serve `component/graph` on `host`, in preference order, with reasons.

    The runtime tries them in order, so an artifact that fails to load (its sha256 changed, ONNX
    Runtime fell back from CUDA) gives way to the next one, saying so; `strict` keeps only the first.
    """
    found = candidates(records, component, graph)
    if not found:
        raise BackendUnavailable(f"no artifact for {component}/{graph} in the bundle")
    preference = tuple(preference)
    if not preference:
        raise BackendUnavailable("empty preference: name at least one of " + ", ".join(TIERS))
    choices: list[Selection] = []
    passed: list[str] = []
    for rank, tier in enumerate(preference):
        records, why = _tier(tier, found, host)
        if not records:
            if strict and rank == 0:
                raise BackendUnavailable(f"{component}/{graph}: strict mode and first preference '{tier}' "
                                         f"cannot serve: {why}")
            passed.append(f"{tier}: {why}")
            continue
        for i, record in enumerate(records):
            if any(c.record.file == record.file for c in choices):
                continue
            if i == 0:
                reason = f"{why}: " + ("first preference" if rank == 0 else
                                       "fallback" + (f" ({'; '.join(passed)})" if passed else ""))
            else:  # only served when every earlier choice failed to load
                reason = f"{record.format} {record.precision} ({tier}): next in line after {records[0].file}"
            choices.append(Selection(record, reason, tier))
        if strict:
            return choices[:1]
    if not choices:
        raise BackendUnavailable(f"{component}/{graph}: nothing in the bundle can serve on this host: "
                                 + "; ".join(passed))
    return choices


def select(
    records: Sequence[Record], component: str, graph: str, host: Host,
    preference: Sequence[str] = DEFAULT_PREFERENCE, strict: bool = False,
) -> Selection:
    """The artifact for `component/graph` on `host`; unpacks as (record, reason)."""
    return ranked(records, component, graph, host, preference, strict)[0]
