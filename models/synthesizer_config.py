"""The synthesizer's architecture and inference settings, without torch.

`SynthesizerConfig` is read by the serving runtime (host loop, streaming, cloner) as well as by the
PyTorch Tacotron in `models/synthesizer.py`, which re-exports it; kept apart so that serving ONNX or
TensorRT artifacts never imports torch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from voxport.errors import ConfigError
from voxport.models.text import SYMBOL_TABLE_SIZES

# GST hyperparameters fixed by every MockingBird checkpoint (gst_hyperparameters.py). Here because
# the config's `project_dims` needs GST_E; `models/tacotron_layers.py` builds the layers from them.
GST_E = 512  # style embedding size
GST_TOKENS = 10
GST_HEADS = 8
GST_REF_FILTERS = (32, 32, 64, 64, 128, 128)
GST_REF_WIDTH = 256  # reference "mel" width: MockingBird feeds the 256-d speaker embedding here

VARIANTS = ("A", "B", "C", "D")
MEL_DOMAINS = ("mockingbird_db", "natural_log")
# MockingBird's trim threshold −3.4 (dB mel scaled to [−4, 4]) is a magnitude of 10^(−72.5/20) ≈ 2.4e-4:
# (−3.4 + 4)/8·100 − 100 = −92.5 dB, + 20 dB ref level. The same magnitude in natural-log mels (HiFi-GAN
# V1 domain, floor ln(1e-5) = −11.5) is ln(2.4e-4) ≈ −8.35.
NATURAL_LOG_STOP_THRESHOLD = round(math.log(10 ** (-72.5 / 20)), 2)


@dataclass(frozen=True)
class SynthesizerConfig:
    """Architecture and inference settings. Dims are MockingBird's `tts_*` hparams (models.md §2.3)."""

    variant: str = "D"
    n_symbols: int = 75  # 75 (MockingBird), 70 (early MockingBird), 66 (RTVC English)
    embed_dims: int = 512
    encoder_dims: int = 256  # also the encoder prenet width
    decoder_dims: int = 128  # attention RNN size; decoder prenet width is 2× this
    lstm_dims: int = 1024
    postnet_dims: int = 512
    encoder_K: int = 5
    postnet_K: int = 5
    num_highways: int = 4
    speaker_embedding_dim: int = 256
    n_mels: int = 80
    r: int = 2  # frames per decoder step (checkpoint buffer `decoder.r`)
    max_r: int = 20  # mel_proj emits n_mels × max_r values; the first r frames are used
    prenet_dropout: float = 0.5  # always on at inference in MockingBird
    stop_threshold: float = -3.4  # post-trim: drop trailing frames whose max is below this (mel units)
    min_stop_token: float = 0.5  # stop when every item's stop probability exceeds this (and t > 10)
    max_decoder_steps: int = 1000  # bound on decoder steps (× r frames); 1000 = MockingBird's 2000 frames
    mel_domain: str = "mockingbird_db"  # "mockingbird_db" ([-4, 4]) | "natural_log" (HiFi-GAN V1)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ConfigError(f"synthesizer variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.n_symbols not in SYMBOL_TABLE_SIZES:
            raise ConfigError(f"n_symbols must be one of {SYMBOL_TABLE_SIZES}, got {self.n_symbols}")
        if not 1 <= self.r <= self.max_r:
            raise ConfigError(f"reduction factor r must be in 1..{self.max_r}, got {self.r}")
        if not 0.0 <= self.prenet_dropout < 1.0:
            raise ConfigError(f"prenet_dropout must be in [0, 1), got {self.prenet_dropout}")
        if self.max_decoder_steps < 1:
            raise ConfigError(f"max_decoder_steps must be >= 1, got {self.max_decoder_steps}")
        if self.mel_domain not in MEL_DOMAINS:
            raise ConfigError(f"mel_domain must be one of {MEL_DOMAINS}, got {self.mel_domain!r}")

    @property
    def has_gst(self) -> bool:
        return self.variant != "A"

    @property
    def project_dims(self) -> int:
        """Width of the encoder sequence the decoder attends to: 512 (A, B) or 1024 (C, D)."""
        base = self.encoder_dims + self.speaker_embedding_dim
        return base + GST_E if self.variant in ("C", "D") else base

    @property
    def prenet_dims(self) -> tuple[int, int]:
        """(encoder prenet width, decoder prenet width): the last dim of the two mask tensors."""
        return self.encoder_dims, 2 * self.decoder_dims

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SynthesizerConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown synthesizer config key(s): {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def default_stack(cls, **overrides: Any) -> SynthesizerConfig:
        """Variant D producing natural-log mels for the HiFi-GAN V1 vocoder (seeded weights)."""
        values: dict[str, Any] = {"mel_domain": "natural_log", "stop_threshold": NATURAL_LOG_STOP_THRESHOLD}
        return cls(**(values | overrides))
