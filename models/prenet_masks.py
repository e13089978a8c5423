"""Where the synthesizer's prenet dropout masks come from, without torch.

MockingBird keeps prenet dropout on at inference, so every synthesis consumes random masks: the
text encoder's once, then one pair per decoder step, always in that order. The host loop takes a
`MaskSource` and draws through it, so a seeded source reproduces a run exactly on every backend.

- `NumpyMasks` (numpy PCG64): what the serving runtime uses; no torch in the process.
- `models.prenet_masks_torch.TorchMasks` (seeded torch.Generator): the draws MockingBird's PyTorch
  code makes, for the golden checks and comparisons with it.
The two give different masks for the same seed. A comparison (reference vs artifact) must give
both sides sources of the same kind and seed; which kind does not matter to it.
"""

from __future__ import annotations

import sys
from typing import Protocol, runtime_checkable

import numpy as np

from voxport.errors import ConfigError
from voxport.models.synthesizer_config import SynthesizerConfig


def encoder_mask_shape(batch: int, n_text: int, cfg: SynthesizerConfig) -> tuple[int, int, int, int]:
    """(2, batch, n_text, encoder prenet width): [0] multiplies prenet fc1's output, [1] fc2's."""
    return 2, batch, n_text, cfg.prenet_dims[0]


def decoder_mask_shape(batch: int, cfg: SynthesizerConfig) -> tuple[int, int, int]:
    """(2, batch, decoder prenet width) for one decoder step."""
    return 2, batch, cfg.prenet_dims[1]


@runtime_checkable
class MaskSource(Protocol):
    """Draws float32 masks with values {0, 1/(1 − p)}; the loop calls `encoder` once, then
    `decoder` once per step, and a seeded source gives the same sequence every time."""

    def encoder(self, batch: int, n_text: int, cfg: SynthesizerConfig) -> np.ndarray: ...

    def decoder(self, batch: int, cfg: SynthesizerConfig) -> np.ndarray: ...


class NumpyMasks:
    """Masks from numpy's PCG64, seeded: the serving runtime's source (torch-free)."""

    def __init__(self, seed: int | np.random.Generator = 0) -> None:
        self.rng = seed if isinstance(seed, np.random.Generator) else np.random.Generator(np.random.PCG64(seed))

    def _draw(self, shape: tuple[int, ...], p: float) -> np.ndarray:
        # uniform >= p keeps with probability 1 − p and kept units are scaled by 1/(1 − p), as F.dropout.
        keep = self.rng.random(shape, dtype=np.float32) >= np.float32(p)
        return keep.astype(np.float32) / np.float32(1.0 - p)

    def encoder(self, batch: int, n_text: int, cfg: SynthesizerConfig) -> np.ndarray:
        return self._draw(encoder_mask_shape(batch, n_text, cfg), cfg.prenet_dropout)

    def decoder(self, batch: int, cfg: SynthesizerConfig) -> np.ndarray:
        return self._draw(decoder_mask_shape(batch, cfg), cfg.prenet_dropout)


def as_mask_source(masks: object) -> MaskSource:
    """`masks` as a MaskSource. A torch.Generator (what the loop took before mask sources) is
    wrapped in `TorchMasks`, which draws exactly what it drew then; torch is only looked at when
    the caller already imported it, so the torch-free path stays torch-free."""
    if isinstance(masks, MaskSource):
        return masks
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(masks, torch.Generator):
        from voxport.models.prenet_masks_torch import TorchMasks

        return TorchMasks(masks)
    raise ConfigError(f"prenet masks need a MaskSource (NumpyMasks, TorchMasks), got {type(masks).__name__}")
