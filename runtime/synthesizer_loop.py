"""The synthesizer host loop: encoder once, decoder step until the stop rule, postnet, trim.

Written over three callables that take and return dicts of numpy arrays keyed by tensor name, so
the very same loop drives the PyTorch graphs (`models.synthesizer_reference.generate`) and ONNX
Runtime / TensorRT sessions. Imports no torch: serving exported artifacts never loads it.
Stop rule and trimming follow MockingBird (models.md §2.5): stop once every batch item's stop
probability exceeds `min_stop_token` and the step starts after frame 10 (t = step·r > 10); then
drop trailing frames of each item whose max over the mel bins is below `stop_threshold`.

Prenet dropout masks come from a `MaskSource` (models/prenet_masks.py) in a fixed order (encoder
masks, then one draw per decoder step), so a seeded source reproduces a run exactly on every
backend. The runtime draws `NumpyMasks`; goldens against MockingBird's PyTorch code draw
`TorchMasks`. Both sides of a comparison must get sources of the same kind and seed.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from voxport.errors import ConfigError
from voxport.models.prenet_masks import MaskSource, as_mask_source
from voxport.models.synthesizer_config import SynthesizerConfig
from voxport.models.synthesizer_io import STATE_NAMES, zero_decoder_state
from voxport.runtime.backends.base import Runner

log = logging.getLogger(__name__)


# PyTorch helpers that used to live here, still importable from here but loaded (with torch) only
# when asked for: the torch mask draws and the reference synthesis.
_TORCH_NAMES = {
    "draw_encoder_masks": "voxport.models.prenet_masks_torch",
    "draw_decoder_masks": "voxport.models.prenet_masks_torch",
    "draw_prenet_masks": "voxport.models.prenet_masks_torch",
    "TorchMasks": "voxport.models.prenet_masks_torch",
    "module_runner": "voxport.models.synthesizer_reference",
    "torch_runner": "voxport.models.synthesizer_reference",
    "generate": "voxport.models.synthesizer_reference",
}


def __getattr__(name: str) -> Any:
    if name in _TORCH_NAMES:
        return getattr(importlib.import_module(_TORCH_NAMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class SynthesisResult:
    """Output of one batched synthesis. Mels are (B, n_mels, T) float32, T = n_steps · r."""

    mel: np.ndarray  # postnet output (what the vocoder gets), untrimmed
    decoder_mel: np.ndarray  # raw decoder frames before the postnet
    stops: np.ndarray  # (n_steps, B) stop probabilities
    alignments: np.ndarray  # (n_steps, B, T_text) attention weights
    lengths: tuple[int, ...]  # frames per item after trimming trailing silence
    n_steps: int
    stopped: bool  # True: the stop rule ended the loop; False: max_decoder_steps was reached

    def trimmed(self) -> list[np.ndarray]:
        """One (n_mels, length_i) postnet mel per batch item, trailing silence trimmed."""
        return [self.mel[i, :, :length] for i, length in enumerate(self.lengths)]


def trim_lengths(mel: np.ndarray, threshold: float) -> tuple[int, ...]:
    """Per item: frames kept after dropping trailing frames whose max over bins < threshold."""
    loud = mel.max(axis=1) >= threshold  # (B, T)
    last = loud.shape[1] - 1 - np.argmax(loud[:, ::-1], axis=1)
    return tuple(int(n) if any_loud else 0 for n, any_loud in zip(last + 1, loud.any(axis=1), strict=True))


def run_host_loop(run_encoder: Runner, run_decoder_step: Runner, run_postnet: Runner, chars: np.ndarray,
                  speaker_embedding: np.ndarray, style_idx: int | np.ndarray, masks: MaskSource,
                  cfg: SynthesizerConfig, max_decoder_steps: int | None = None,
                  stop_on_token: bool = True) -> SynthesisResult:
    """Synthesize a batch. chars (B, T_text) int64 padded with 0, each row ending in EOS;
    speaker_embedding (B, 256) float32; style_idx an int or (B,) ints (−1: style from speaker);
    masks: where the prenet dropout masks come from (a torch.Generator is taken as TorchMasks)."""
    masks = as_mask_source(masks)
    chars = np.ascontiguousarray(chars, dtype=np.int64)
    speaker_embedding = np.ascontiguousarray(speaker_embedding, dtype=np.float32)
    if chars.ndim != 2 or chars.shape[1] == 0:
        raise ConfigError(f"chars must be (batch, n_text) with n_text > 0, got shape {chars.shape}")
    batch, n_text = chars.shape
    if speaker_embedding.shape != (batch, cfg.speaker_embedding_dim):
        raise ConfigError(f"speaker_embedding must be ({batch}, {cfg.speaker_embedding_dim}), "
                          f"got {speaker_embedding.shape}")
    style = np.broadcast_to(np.asarray(style_idx, dtype=np.int64), (batch,)).copy()
    steps_cap = max_decoder_steps or cfg.max_decoder_steps

    encoded = run_encoder({"chars": chars, "speaker_embedding": speaker_embedding, "style_idx": style,
                           "encoder_masks": masks.encoder(batch, n_text, cfg)})
    state = zero_decoder_state(batch, n_text, cfg)
    prev_frame = np.zeros((batch, cfg.n_mels), dtype=np.float32)
    frames, stops, alignments = [], [], []
    stop_level = np.float32(cfg.min_stop_token * 10.0)
    stopped = False
    for step in range(steps_cap):
        out = run_decoder_step({
            "prev_frame": prev_frame, "decoder_masks": masks.decoder(batch, cfg),
            **state, "encoder_seq": encoded["encoder_seq"],
            "encoder_seq_proj": encoded["encoder_seq_proj"], "chars": chars})
        mel_frames = out["mel_frames"]  # (B, n_mels, r)
        frames.append(mel_frames)
        stops.append(out["stop"])
        alignments.append(out["attention"])
        state = {name: out[f"{name}_out"] for name in STATE_NAMES}
        prev_frame = np.ascontiguousarray(mel_frames[:, :, -1])
        # MockingBird compares stop·10 > min_stop_token (an int, 5 by default) in float32.
        t = step * mel_frames.shape[2]
        if stop_on_token and t > 10 and bool(np.all(out["stop"].astype(np.float32) * 10 > stop_level)):
            stopped = True
            break
    decoder_mel = np.concatenate(frames, axis=2)
    mel = run_postnet({"mel": decoder_mel})["mel_post"]
    lengths = trim_lengths(mel, cfg.stop_threshold)
    if not stopped and stop_on_token:
        # DEBUG: once per text fragment (hundreds for one long request); the request's own line is INFO.
        log.debug("synthesizer reached max_decoder_steps=%d without the stop token", steps_cap)
    return SynthesisResult(mel=mel, decoder_mel=decoder_mel, stops=np.stack(stops),
                           alignments=np.stack(alignments), lengths=lengths, n_steps=len(frames),
                           stopped=stopped)
