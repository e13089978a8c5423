"""The synthesizer host loop: encoder once, decoder step until the stop rule, postnet, trim.

Written over three callables that take and return dicts of numpy arrays keyed by tensor name, so
the very same loop drives the PyTorch graphs (`generate`) and ONNX Runtime / TensorRT sessions.
Stop rule and trimming follow MockingBird (models.md §2.5): stop once every batch item's stop
probability exceeds `min_stop_token` and the step starts after frame 10 (t = step·r > 10); then
drop trailing frames of each item whose max over the mel bins is below `stop_threshold`.

Prenet dropout masks come from a seeded torch.Generator in a fixed order (encoder masks, then one
draw per decoder step), so a seed reproduces a run exactly on every backend.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from voxport.errors import ConfigError
from voxport.models.graph import GraphSpec
from voxport.models.synthesizer import SynthesizerConfig, Tacotron
from voxport.models.synthesizer_graphs import (
    DECODER_INPUTS,
    DECODER_OUTPUTS,
    ENCODER_INPUTS,
    ENCODER_OUTPUTS,
    POSTNET_INPUTS,
    POSTNET_OUTPUTS,
    STATE_NAMES,
    DecoderStepGraph,
    EncoderGraph,
    PostnetGraph,
    initial_decoder_state,
)

log = logging.getLogger(__name__)

Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def _dropout_masks(generator: torch.Generator, shape: tuple[int, ...], p: float) -> torch.Tensor:
    # rand >= p keeps with probability 1 − p and kept units are scaled by 1/(1 − p), as F.dropout.
    keep = torch.rand(shape, generator=generator) >= p
    return keep.to(torch.float32) / (1.0 - p)


def draw_encoder_masks(generator: torch.Generator, batch: int, n_text: int,
                       cfg: SynthesizerConfig) -> torch.Tensor:
    """Masks for the text-encoder prenet, (2, batch, n_text, encoder prenet width)."""
    return _dropout_masks(generator, (2, batch, n_text, cfg.prenet_dims[0]), cfg.prenet_dropout)


def draw_decoder_masks(generator: torch.Generator, batch: int, cfg: SynthesizerConfig) -> torch.Tensor:
    """Masks for one decoder step's prenet, (2, batch, decoder prenet width)."""
    return _dropout_masks(generator, (2, batch, cfg.prenet_dims[1]), cfg.prenet_dropout)


def draw_prenet_masks(generator: torch.Generator, batch: int, n_text: int, n_steps: int,
                      cfg: SynthesizerConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(encoder_masks (2, B, T_text, 256), decoder_masks (n_steps, 2, B, 256)), drawn in the same
    order as the host loop draws them, so both see identical masks from identically seeded generators."""
    cfg = cfg or SynthesizerConfig()
    encoder = draw_encoder_masks(generator, batch, n_text, cfg)
    decoder = torch.stack([draw_decoder_masks(generator, batch, cfg) for _ in range(n_steps)])
    return encoder, decoder


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
                  speaker_embedding: np.ndarray, style_idx: int | np.ndarray, masks_rng: torch.Generator,
                  cfg: SynthesizerConfig, max_decoder_steps: int | None = None,
                  stop_on_token: bool = True) -> SynthesisResult:
    """Synthesize a batch. chars (B, T_text) int64 padded with 0, each row ending in EOS;
    speaker_embedding (B, 256) float32; style_idx an int or (B,) ints (−1: style from speaker)."""
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
                           "encoder_masks": draw_encoder_masks(masks_rng, batch, n_text, cfg).numpy()})
    state = {k: v.numpy() for k, v in initial_decoder_state(batch, n_text, cfg).items()}
    prev_frame = np.zeros((batch, cfg.n_mels), dtype=np.float32)
    frames, stops, alignments = [], [], []
    stop_level = np.float32(cfg.min_stop_token * 10.0)
    stopped = False
    for step in range(steps_cap):
        out = run_decoder_step({
            "prev_frame": prev_frame, "decoder_masks": draw_decoder_masks(masks_rng, batch, cfg).numpy(),
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
        log.info("synthesizer reached max_decoder_steps=%d without the stop token", steps_cap)
    return SynthesisResult(mel=mel, decoder_mel=decoder_mel, stops=np.stack(stops),
                           alignments=np.stack(alignments), lengths=lengths, n_steps=len(frames),
                           stopped=stopped)


def module_runner(module: torch.nn.Module, input_names: tuple[str, ...],
                  output_names: tuple[str, ...]) -> Runner:
    """Wrap a graph module as a numpy-dict → numpy-dict callable (the PyTorch 'backend')."""

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            outputs = module(*(torch.from_numpy(np.asarray(feeds[n])) for n in input_names))
        return {name: out.numpy() for name, out in zip(output_names, outputs, strict=True)}

    return run


def torch_runner(spec: GraphSpec) -> Runner:
    return module_runner(spec.module, spec.input_names, spec.output_names)


def generate(model: Tacotron, chars: torch.Tensor | np.ndarray, speaker_embedding: torch.Tensor | np.ndarray,
             style_idx: int | np.ndarray, generator: torch.Generator, cfg: SynthesizerConfig,
             max_decoder_steps: int | None = None, stop_on_token: bool = True) -> SynthesisResult:
    """Reference synthesis in PyTorch: `run_host_loop` over this model's three graph modules."""
    model.eval()
    encoder = module_runner(EncoderGraph(model), ENCODER_INPUTS, ENCODER_OUTPUTS)
    decoder = module_runner(DecoderStepGraph(model), DECODER_INPUTS, DECODER_OUTPUTS)
    postnet = module_runner(PostnetGraph(model), POSTNET_INPUTS, POSTNET_OUTPUTS)
    chars_np, speaker_np = (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x
                            for x in (chars, speaker_embedding))
    return run_host_loop(encoder, decoder, postnet, chars_np, speaker_np, style_idx, generator, cfg,
                         max_decoder_steps=max_decoder_steps, stop_on_token=stop_on_token)
