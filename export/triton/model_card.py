"""MODEL_CARD.md of a Triton package: what each model is and how good and fast it was measured to be.

Every figure comes from the bundle's records (parity vs the PyTorch FP32 original, listener-side
quality vs recordings, speed measured side by side at build time); nothing is measured here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from voxport.pipeline.records import Record
from voxport.runtime.host import Host

if TYPE_CHECKING:
    from voxport.export.triton.repository import PackageConfig, PackagedModel

WHAT = {
    "speaker_encoder": "GE2E speaker encoder: partial log-mels (partials, 160 frames, 40 mels) -> 256-d embeddings",
    "synthesizer_encoder": "Tacotron text encoder (+ speaker embedding, GST): symbol ids -> encoder sequence",
    "synthesizer_decoder_step": "Tacotron decoder, one step (r mel frames, stop probability); stateful",
    "synthesizer_postnet": "Tacotron postnet (CBHG): decoder mels -> final mels",
    "vocoder": "HiFi-GAN V1: mel (80 bins) -> waveform",
}
_WEIGHTS = {"real": "real (trained)", "seeded": "**seeded** (untrained: its output is not speech)"}


def _figures(values: Mapping[str, Any], skip: Sequence[str] = ()) -> str:
    """Scalar figures of a parity/quality dict, rounded; nested details are left to the record."""
    parts = []
    for key, value in values.items():
        if key in skip or isinstance(value, (dict, list)) or value is None:
            continue
        parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return ", ".join(parts) or "-"


def _speed(record: Record) -> str:
    speed = record.speed or {}
    ratio = speed.get("speedup_vs_torch_fp32") or speed.get("parent_speedup_vs_torch_fp32")
    if not ratio:
        return "not measured"
    text = f"{ratio:.2f}x PyTorch FP32"
    if speed.get("rtf") is not None:
        text += f", RTF {speed['rtf']:.3f}"
    if speed.get("input"):
        text += f" ({speed['input']})"
    return text


def model_card(records: Sequence[Record], models: Sequence[PackagedModel], cfg: PackageConfig, host: Host,
               parsed: Mapping[str, bool]) -> str:
    measured = sorted({r.speed.get("measured_on") for r in records if r.speed and r.speed.get("measured_on")})
    lines = [
        "# voxport Triton model repository",
        "",
        f"Packaged by `voxport package format=triton target={cfg.target}` from `{Path(cfg.bundle_dir).resolve()}`. "
        "Every figure below is copied from the bundle's records (the JSON files beside this card), which the "
        "build measured; nothing was measured while packaging.",
        "",
        "| model | what it is | artifact | precision | weights | parity vs PyTorch FP32 | listener / quality "
        "figures | speed (build time) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in models:
        r = m.record
        lines.append(f"| `{m.name}` | {WHAT[m.name]} | `{r.file}` ({r.format}, Triton backend `{m.backend}`) | "
                     f"{r.precision} | {_WEIGHTS[r.weights]} | {_figures(r.parity, ('reference',))} | "
                     f"{_figures(r.quality, ('split',))} | {_speed(r)} |")
    lines += [
        "| `voxport_tts` | Python backend: text + speaker embedding (or partial mels) -> audio, through BLS calls to "
        "the models above; decoupled (STREAM=true streams chunks) | `model.py` + voxport's front end | - | - | - | - "
        "| - |",
        "",
        "## Why each artifact serves",
        "",
        *[f"- `{m.name}`: {m.reason}" + (f"; parent `{m.record.parent}`" if m.record.parent else "")
          for m in models],
        "",
        "## Provenance",
        "",
    ]
    sources = [r for r in records if r.stage == "source"]
    for r in sources:
        lines.append(f"- {r.component}: {_WEIGHTS[r.weights]} weights, PyTorch original `{r.file}` "
                     f"(sha256 `{r.sha256[:16]}…`)")
    for m in models:
        edited = (f"; the packaged graph differs: {', '.join(m.edits)} broadcast to the text width for Triton's "
                  f"zero initial state (sha256 `{m.sha256[:16]}…`)") if m.edits else ""
        lines.append(f"- `{m.name}/1/{m.file}`: `{m.record.file}` sha256 `{m.record.sha256[:16]}…`{edited}")
    if any(r.weights == "seeded" for r in sources):
        lines += ["", "**The synthesizer's weights are seeded, not trained: the audio this repository makes is not "
                  "speech.** The graphs, the loop and the serving path are real; a trained checkpoint "
                  "(`voxport build stack=mockingbird ...`) gives speech through the same package."]
    tools = sorted({f"{k} {v}" for r in records for k, v in (r.tools or {}).items()})
    lines += [
        "",
        "## Where it was measured",
        "",
        f"- Speed figures: timed at build time ({', '.join(measured[:1] + measured[-1:]) or 'no timestamp'}), "
        "side by side with PyTorch FP32 in one process, on the build host (records name the time, not the CPU). "
        "Triton's own overheads (queueing, BLS calls, gRPC/HTTP) are not in them.",
        f"- Packaged on: {host.describe()}.",
        f"- Tools: {', '.join(tools)}.",
        f"- Configs parsed with tritonclient's ModelConfig schema: "
        f"{'yes' if parsed and all(parsed.values()) else 'no (tritonclient not installed when packaged)'}.",
        "",
        "## Serving notes",
        "",
        "- `synthesizer_decoder_step` keeps its recurrent state in Triton (sequence batcher, implicit state, zero "
        "initial state); one fragment of text is one sequence. It cannot be batched across sequences (its prenet "
        "masks carry the batch on axis 1), so each instance serves one sequence at a time: raise `instances` for "
        "concurrent requests.",
        "- `voxport_tts` ends every sequence explicitly (one extra, discarded decoder step after the stop token), so "
        "slots are freed at once; `max_sequence_idle_microseconds` frees those of crashed clients.",
        "- Reference audio is turned into SPEAKER_MELS (or an EMBEDDING) on the client with voxport's speaker front "
        "end (`voxport.models.speaker_frontend`: resampling, voice activity detection, mel): it needs librosa and "
        "webrtcvad, which a stock Triton Python backend does not have.",
    ]
    return "\n".join(lines) + "\n"


def write_model_card(path: Path, records: Sequence[Record], models: Sequence[PackagedModel], cfg: PackageConfig,
                     host: Host, parsed: Mapping[str, bool]) -> None:
    path.write_text(model_card(records, models, cfg, host, parsed))  # inside the repository's temp dir
