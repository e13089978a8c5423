"""Prenet dropout masks drawn with a seeded torch.Generator: the PyTorch reference's draws.

The golden checks against MockingBird's PyTorch code (tests/data/tacotron_mockingbird_golden.json)
and comparisons that must reproduce earlier PyTorch runs use these; the serving runtime draws
`models.prenet_masks.NumpyMasks` instead and never imports this module.
"""

from __future__ import annotations

import numpy as np
import torch

from voxport.models.prenet_masks import decoder_mask_shape, encoder_mask_shape
from voxport.models.synthesizer_config import SynthesizerConfig


def _dropout_masks(generator: torch.Generator, shape: tuple[int, ...], p: float) -> torch.Tensor:
    # rand >= p keeps with probability 1 − p and kept units are scaled by 1/(1 − p), as F.dropout.
    keep = torch.rand(shape, generator=generator) >= p
    return keep.to(torch.float32) / (1.0 - p)


def draw_encoder_masks(generator: torch.Generator, batch: int, n_text: int,
                       cfg: SynthesizerConfig) -> torch.Tensor:
    """Masks for the text-encoder prenet, (2, batch, n_text, encoder prenet width)."""
    return _dropout_masks(generator, encoder_mask_shape(batch, n_text, cfg), cfg.prenet_dropout)


def draw_decoder_masks(generator: torch.Generator, batch: int, cfg: SynthesizerConfig) -> torch.Tensor:
    """Masks for one decoder step's prenet, (2, batch, decoder prenet width)."""
    return _dropout_masks(generator, decoder_mask_shape(batch, cfg), cfg.prenet_dropout)


def draw_prenet_masks(generator: torch.Generator, batch: int, n_text: int, n_steps: int,
                      cfg: SynthesizerConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(encoder_masks (2, B, T_text, 256), decoder_masks (n_steps, 2, B, 256)), drawn in the same
    order as the host loop draws them, so both see identical masks from identically seeded generators."""
    cfg = cfg or SynthesizerConfig()
    encoder = draw_encoder_masks(generator, batch, n_text, cfg)
    decoder = torch.stack([draw_decoder_masks(generator, batch, cfg) for _ in range(n_steps)])
    return encoder, decoder


class TorchMasks:
    """A MaskSource over a torch.Generator (or a seed for a fresh one): the reference's draws."""

    def __init__(self, seed: int | torch.Generator = 0) -> None:
        self.generator = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)

    def encoder(self, batch: int, n_text: int, cfg: SynthesizerConfig) -> np.ndarray:
        return draw_encoder_masks(self.generator, batch, n_text, cfg).numpy()

    def decoder(self, batch: int, cfg: SynthesizerConfig) -> np.ndarray:
        return draw_decoder_masks(self.generator, batch, cfg).numpy()
