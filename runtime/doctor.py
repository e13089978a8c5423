"""`voxport doctor`: this host, and which artifact would serve each graph of a bundle, and why."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from voxport.errors import VoxportError
from voxport.pipeline.records import read_bundle
from voxport.runtime.host import Host, detect
from voxport.runtime.select import DEFAULT_PREFERENCE, ranked

GRAPHS = (("speaker_encoder", "speaker_encoder"), ("synthesizer", "encoder"),
          ("synthesizer", "decoder_step"), ("synthesizer", "postnet"), ("vocoder", "vocoder"))


def host_lines(host: Host) -> list[str]:
    gpus = ", ".join(f"{g['name']} (compute capability {g['compute_capability']})" for g in host.gpus)
    flags = host.cpu_flags
    vector = [f for f in ("avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_int8", "amx_bf16")
              if f in flags]
    trt = host.tensorrt_version or "not installed"
    if host.tensorrt_error:
        trt = f"{trt}, NOT importable: {host.tensorrt_error}"
    return [
        "host:",
        f"  cpu: {host.cpu_model} ({host.cores} cores; {', '.join(flags) or 'no vector flags'})",
        f"  cpu int8/bf16: AVX-512 {'yes' if 'avx512f' in flags else 'no'}, VNNI "
        f"{'yes' if 'avx512_vnni' in flags or 'avx_vnni' in flags else 'no'}, native bf16 "
        f"{'yes' if host.native_bf16 else 'no'}" + (f" ({', '.join(vector)})" if vector else ""),
        f"  cuda: {'yes, CUDA ' + str(host.cuda_version) if host.cuda_available else 'no'}"
        + (f"; driver {host.driver_version}" if host.driver_version else ""),
        f"  gpu: {gpus or 'none'}",
        f"  tensorrt: {trt}",
        f"  onnxruntime providers: {', '.join(host.onnxruntime_providers)}",
        f"  engine fingerprint: {host.fingerprint()}",
        f"  libraries: {', '.join(f'{k} {v}' for k, v in host.library_versions.items())}",
    ]


def report(bundle_dir: Path, preference: Sequence[str] = DEFAULT_PREFERENCE, host: Host | None = None,
           strict: bool = False) -> str:
    """Host description, then per graph the artifact that would serve it, why, and what else could
    (`voxport doctor` passes the composed config's target.preference / target.strict)."""
    host = host or detect()
    lines = host_lines(host)
    lines.append(f"bundle: {bundle_dir} (preference: {' > '.join(preference)}{', strict' if strict else ''})")
    try:
        records = read_bundle(Path(bundle_dir))
    except VoxportError as exc:
        lines.append(f"  {exc}")
        return "\n".join(lines)
    for component, graph in GRAPHS:
        try:
            choices = ranked(records, component, graph, host, preference, strict)
        except VoxportError as exc:
            lines.append(f"  {component}/{graph}: unavailable: {exc}")
            continue
        first = choices[0]
        lines.append(f"  {component}/{graph}: {first.record.file} ({first.record.weights} weights, "
                     f"{first.tier}) <- {first.reason}")
        if len(choices) > 1:
            lines.append("      then: " + ", ".join(f"{c.record.file} ({c.tier})" for c in choices[1:]))
    return "\n".join(lines)
