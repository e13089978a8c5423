"""The bench's inputs, made once per run from the real-speech corpus and shared by every job.

Per length class (e.g. short 1 s, medium 3 s, long 6 s):
- a real recording (never espeak-ng) at least that long, cropped to it: its vocoder mel (vocoder
  and postnet rows) and its speaker-encoder partial mels (encoder rows; the clip as is, since VAD
  trimming belongs to the end-to-end path);
- a text from the corpus whose recording lasts about that long: its symbol ids and prenet masks
  (synthesizer encoder rows), and the synthesizer encoder's PyTorch FP32 outputs, which every
  decoder-step row starts from so that all backends decode the same sequence;
- decoder steps covering the length (decoder-step rows and the end-to-end cap).
One reference recording (about `reference_s`) gives the speaker embedding and the end-to-end input.
Arrays go to `inputs.npz`, descriptions to `inputs.json`, so a subprocess reads exactly these.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from voxport.errors import ConfigError
from voxport.evaluate.corpus import Corpus, CorpusItem
from voxport.pipeline.records import Record


@dataclass(frozen=True)
class BenchInputs:
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]  # per length: what each input is, and its audio seconds

    def save(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        np.savez(directory / "inputs.npz", **self.arrays)
        (directory / "inputs.json").write_text(json.dumps(self.meta, indent=1))
        return directory

    @classmethod
    def load(cls, directory: Path) -> BenchInputs:
        with np.load(directory / "inputs.npz") as data:
            arrays = {k: data[k] for k in data.files}
        return cls(arrays, json.loads((directory / "inputs.json").read_text()))


def pick_recording(corpus: Corpus, seconds: float) -> CorpusItem:
    """The shortest real recording lasting at least `seconds` (else the longest there is)."""
    real = sorted((i for i in corpus.items() if i.source != "espeak-ng"), key=lambda i: (i.duration_s, i.id))
    if not real:
        raise ConfigError("the corpus holds no real recordings")
    return next((i for i in real if i.duration_s >= seconds), real[-1])


def pick_text(corpus: Corpus, seconds: float) -> CorpusItem:
    """The corpus item with a transcript whose recording length is closest to `seconds`."""
    texted = [i for i in corpus.items() if i.text]
    if not texted:
        raise ConfigError("the corpus holds no transcribed items")
    return min(texted, key=lambda i: (abs(i.duration_s - seconds), i.id))


def prepare(corpus: Corpus, records: list[Record], bundle_dir: Path, lengths: dict[str, float],
            reference_s: float, seed: int) -> BenchInputs:
    import torch

    from voxport.models import audio, registry
    from voxport.models import speaker_encoder as se
    from voxport.models.prenet_masks_torch import draw_encoder_masks
    from voxport.models.synthesizer import SynthesizerConfig
    from voxport.models.text import encode_text

    sources = {r.component: r for r in records if r.stage == "source"}
    missing = {"speaker_encoder", "synthesizer", "vocoder"} - set(sources)
    if missing:
        raise ConfigError(f"bundle {bundle_dir} has no PyTorch source for {sorted(missing)}")
    mel_cfg = audio.MelConfig.from_dict(sources["vocoder"].contract["mel"])
    enc_cfg = se.SpeakerEncoderConfig.from_dict(sources["speaker_encoder"].model["config"])
    syn_cfg = SynthesizerConfig.from_dict(sources["synthesizer"].model["config"])
    encoder = registry.load_torch_artifact(bundle_dir / sources["speaker_encoder"].file,
                                           sources["speaker_encoder"].model)
    tacotron = registry.load_torch_artifact(bundle_dir / sources["synthesizer"].file, sources["synthesizer"].model)
    text_graph = registry.graph_specs(tacotron, sources["synthesizer"].model)["encoder"].module

    ref_item = pick_recording(corpus, reference_s)
    reference = corpus.audio(ref_item, 16000)[: int(reference_s * 16000)]
    embedding = se.embed_reference(encoder, reference, 16000, enc_cfg)[None].astype(np.float32)
    arrays: dict[str, np.ndarray] = {"reference16": reference, "speaker_embedding": embedding}
    frame_s = mel_cfg.hop_length / mel_cfg.sample_rate
    meta: dict[str, Any] = {"reference": {"item": ref_item.id, "audio_s": len(reference) / 16000},
                            "frame_s": frame_s, "r": syn_cfg.r, "seed": seed, "lengths": {}}
    for label, seconds in lengths.items():
        item = pick_recording(corpus, seconds)
        wav22 = corpus.audio(item, mel_cfg.sample_rate)[: int(seconds * mel_cfg.sample_rate)]
        wav22 = wav22[: len(wav22) // mel_cfg.hop_length * mel_cfg.hop_length]
        mel = audio.mel_spectrogram(wav22, mel_cfg).astype(np.float32)
        wav16 = corpus.audio(item, 16000)[: int(seconds * 16000)]
        text_item = pick_text(corpus, seconds)
        ids = encode_text(text_item.text, syn_cfg.n_symbols)[0]
        chars = torch.tensor([ids], dtype=torch.int64)
        masks = draw_encoder_masks(torch.Generator().manual_seed(seed), 1, len(ids), syn_cfg)
        with torch.inference_mode():
            enc_seq, enc_proj = text_graph(chars, torch.from_numpy(embedding),
                                           torch.zeros(1, dtype=torch.int64), masks)
        steps = math.ceil(seconds / frame_s / syn_cfg.r)
        arrays |= {f"{label}.mel": mel, f"{label}.mels16": se.partial_mels(wav16, enc_cfg).astype(np.float32),
                   f"{label}.chars": chars.numpy(), f"{label}.encoder_masks": masks.numpy(),
                   f"{label}.encoder_seq": enc_seq.numpy(), f"{label}.encoder_seq_proj": enc_proj.numpy()}
        meta["lengths"][label] = {
            "target_s": seconds, "item": item.id, "recording_s": len(wav16) / 16000,
            "frames": int(mel.shape[1]), "vocoder_audio_s": mel.shape[1] * frame_s,
            "text_item": text_item.id, "text": text_item.text, "text_audio_s": text_item.duration_s,
            "symbols": len(ids), "decoder_steps": steps, "decoder_audio_s": steps * syn_cfg.r * frame_s,
        }
    return BenchInputs(arrays, meta)
