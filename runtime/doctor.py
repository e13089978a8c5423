"""`voxport doctor`: this host, and which artifact would serve each graph of a bundle, and why."""

from __future__ import annotations

from pathlib import Path

from voxport.errors import VoxportError
from voxport.records import read_bundle
from voxport.runtime.host import detect
from voxport.runtime.select import select

GRAPHS = (("speaker_encoder", "speaker_encoder"), ("synthesizer", "encoder"),
          ("synthesizer", "decoder_step"), ("synthesizer", "postnet"), ("vocoder", "vocoder"))


def report(bundle_dir: Path, preference: tuple[str, ...] = ("onnx", "torch")) -> str:
    host = detect()
    lines = ["host:",
             f"  cpu: {host.cpu_model} ({host.cores} cores; {', '.join(host.cpu_flags) or 'no vector flags'})",
             f"  onnxruntime providers: {', '.join(host.onnxruntime_providers)}",
             f"  cuda: {'yes' if host.cuda_available else 'no'}"
             + (f" ({', '.join(g['name'] for g in host.gpus)})" if host.gpus else ""),
             f"  tensorrt: {host.tensorrt_version or 'not installed'}",
             f"  libraries: {', '.join(f'{k} {v}' for k, v in host.library_versions.items())}",
             f"bundle: {bundle_dir}"]
    try:
        records = read_bundle(Path(bundle_dir))
    except VoxportError as exc:
        lines.append(f"  {exc}")
        return "\n".join(lines)
    for component, graph in GRAPHS:
        try:
            record, reason = select(records, component, graph, preference)
            lines.append(f"  {component}/{graph}: {record.file} ({record.weights} weights) <- {reason}")
        except VoxportError as exc:
            lines.append(f"  {component}/{graph}: unavailable: {exc}")
    return "\n".join(lines)
