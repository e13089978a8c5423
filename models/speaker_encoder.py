"""GE2E speaker encoder (RTVC / MockingBird / Resemblyzer) and its numpy audio front end.

Pipeline: reference wav -> `preprocess_wav` (resample to 16 kHz, raise quiet audio to -30 dBFS,
trim long silences with WebRTC VAD) -> `wav_to_mel` (40-band power mel, not log) -> 160-frame
partials -> `SpeakerEncoder` (3-layer LSTM, last hidden state, Linear, ReLU, L2 norm) -> mean of
the partial embeddings, L2-normalised: a (256,) unit vector.

Defaults reproduce Resemblyzer 0.1.4 as run with the installed librosa (checked against golden
embeddings in tests/data/ge2e_golden.json); RTVC / MockingBird differ only in `partial_step=80`
and `l2_eps=1e-5`. The config and the numpy front end are in `models/speaker_frontend.py`
(re-exported here), so the serving runtime embeds references without importing torch.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from voxport.models.checkpoint import load_into, load_state_dict
from voxport.models.graph import GraphSpec

# Re-exported: the config and numpy front end live in a torch-free module the serving runtime imports.
from voxport.models.speaker_frontend import (  # noqa: F401
    SpeakerEncoderConfig,
    compute_partial_slices,
    mean_embedding,
    partial_mels,
    preprocess_wav,
    trim_long_silences,
    wav_to_mel,
)

log = logging.getLogger(__name__)

# Training-only GE2E loss scalars present in every RTVC / MockingBird / Resemblyzer checkpoint.
TRAINING_ONLY_KEYS = frozenset({"similarity_weight", "similarity_bias"})


class SpeakerEncoder(nn.Module):
    """mels (B, partial_frames, n_mels) float32 -> (B, embedding) non-negative unit vectors."""

    def __init__(self, cfg: SpeakerEncoderConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or SpeakerEncoderConfig()
        self.lstm = nn.LSTM(self.cfg.n_mels, self.cfg.hidden, self.cfg.layers, batch_first=True)
        self.linear = nn.Linear(self.cfg.hidden, self.cfg.embedding)
        self.relu = nn.ReLU()

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        _, (hidden, _) = self.lstm(mels)  # hidden: (layers, B, hidden)
        embeds = self.relu(self.linear(hidden[-1]))  # (B, embedding)
        norm = torch.linalg.vector_norm(embeds, dim=1, keepdim=True)
        return embeds / (norm + self.cfg.l2_eps)


class _GraphForm(nn.Module):
    """Export wrapper: same computation, returns a tuple as GraphSpec requires."""

    def __init__(self, encoder: SpeakerEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, mels: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.encoder(mels),)


def load_speaker_encoder(path: str | Path, cfg: SpeakerEncoderConfig | None = None) -> SpeakerEncoder:
    """Strictly load an RTVC / MockingBird / Resemblyzer encoder checkpoint; returns it in eval mode."""
    model = SpeakerEncoder(cfg)
    load_into(model, load_state_dict(path), source=Path(path).name, ignore=TRAINING_ONLY_KEYS)
    log.info("loaded speaker encoder from %s", path)
    return model.eval()


def seeded_speaker_encoder(cfg: SpeakerEncoderConfig | None = None, seed: int = 0) -> SpeakerEncoder:
    """An encoder with PyTorch's default init from `seed` (global RNG state left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SpeakerEncoder(cfg)
    return model.eval()


def example_inputs(cfg: SpeakerEncoderConfig, batch: int = 2) -> tuple[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    # Power mels are non-negative; the scale loosely follows speech at -30 dBFS.
    return (torch.rand(batch, cfg.partial_frames, cfg.n_mels, generator=gen) * 0.1,)


def graph_spec(model: SpeakerEncoder) -> GraphSpec:
    return GraphSpec(
        component="speaker_encoder",
        name="speaker_encoder",
        module=_GraphForm(model).eval(),
        input_names=("mels",),
        output_names=("embeddings",),
        dynamic_axes={"mels": {0: "batch"}, "embeddings": {0: "batch"}},
        example_inputs=example_inputs(model.cfg),
    )


def embed_utterance(
    model: SpeakerEncoder, wav: np.ndarray, cfg: SpeakerEncoderConfig | None = None
) -> np.ndarray:
    """Preprocessed 16 kHz wav -> (embedding,) float32 unit vector (L2-normed mean of partials)."""
    cfg = cfg or model.cfg
    mels = torch.from_numpy(partial_mels(wav, cfg))
    with torch.inference_mode():
        partials = model(mels).numpy()
    return mean_embedding(partials)


def embed_reference(
    model: SpeakerEncoder, wav: np.ndarray, source_sr: int, cfg: SpeakerEncoderConfig | None = None
) -> np.ndarray:
    """Raw mono reference at `source_sr` -> (embedding,) unit vector; see `preprocess_wav`."""
    cfg = cfg or model.cfg
    return embed_utterance(model, preprocess_wav(wav, source_sr, cfg), cfg)
