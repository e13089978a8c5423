"""Which artifact serves a graph: a pure function of the records and the preference order.

It returns its reason with the choice, so logs, `voxport doctor` and the service's /health can
say exactly what serves and why; `strict` refuses anything but the first preference.
"""

from __future__ import annotations

from collections.abc import Sequence

from voxport.errors import BackendUnavailable
from voxport.records import Record


def candidates(records: Sequence[Record], component: str, graph: str) -> list[Record]:
    """Records that can serve `component/graph` (a torch record with graph '*' serves them all)."""
    return [r for r in records if r.component == component and r.graph in (graph, "*")]


def _rank(record: Record) -> tuple[float, int]:
    # Fastest measured first (ratio vs PyTorch FP32 in one run); unmeasured FP32 ahead of
    # unmeasured lossy artifacts, since only a measured, gated artifact earns its place.
    ratio = record.speed.get("speedup_vs_torch_fp32")
    return (-(ratio or 0.0), 0 if record.precision == "fp32" else 1)


def select(
    records: Sequence[Record], component: str, graph: str,
    preference: Sequence[str] = ("onnx", "torch"), strict: bool = False,
) -> tuple[Record, str]:
    """Pick the artifact for `component/graph`; returns (record, reason)."""
    found = candidates(records, component, graph)
    if not found:
        raise BackendUnavailable(f"no artifact for {component}/{graph} in the bundle")
    for rank, fmt in enumerate(preference):
        of_format = sorted((r for r in found if r.format == fmt), key=_rank)
        if not of_format:
            if strict:
                raise BackendUnavailable(
                    f"{component}/{graph}: strict mode and no '{fmt}' artifact (first preference)"
                )
            continue
        best = of_format[0]
        ratio = best.speed.get("speedup_vs_torch_fp32")
        why = f"{fmt} {best.precision}"
        why += f", {ratio:.2f}x PyTorch FP32 measured" if ratio else ""
        if rank == 0:
            return best, f"{why}: first preference"
        skipped = ", ".join(preference[:rank])
        return best, f"{why}: fallback, no {skipped} artifact for {component}/{graph}"
    raise BackendUnavailable(
        f"{component}/{graph}: none of the preferred formats {list(preference)} is in the bundle "
        f"(have {sorted({r.format for r in found})})"
    )
