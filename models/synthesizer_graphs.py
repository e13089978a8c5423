"""The synthesizer in inference form: three graphs with named tensors and explicit state.

Autoregressive Tacotron cannot export as one graph, so it runs as
1. `encoder`: text + speaker (+ style) → encoder sequence and its attention projection, once;
2. `decoder_step`: one step (r frames) with every recurrent state as an input and an output;
3. `postnet`: decoder mels → the mels the vocoder gets.
The stop rule, frame feedback and trimming are host code (`runtime/synthesizer_loop.py`). Each forward is
pure tensor code (no Python branches on data), so tracing and ONNX export see every path.

Prenet dropout masks (MockingBird keeps dropout on at inference) are inputs with values {0, 2}:
`encoder_masks` (2, B, T_text, 256): [0] multiplies prenet fc1's output, [1] fc2's; `decoder_masks`
(2, B, 256) likewise for the decoder prenet of this step.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from voxport.models.graph import GraphSpec
from voxport.models.synthesizer import SynthesizerConfig, Tacotron

# Re-exported: the names live in a torch-free module the serving runtime imports.
from voxport.models.synthesizer_io import (  # noqa: F401
    COMPONENT,
    DECODER_INPUTS,
    DECODER_OUTPUTS,
    ENCODER_INPUTS,
    ENCODER_OUTPUTS,
    POSTNET_INPUTS,
    POSTNET_OUTPUTS,
    STATE_NAMES,
    zero_decoder_state,
)

log = logging.getLogger(__name__)


class EncoderGraph(nn.Module):
    """(chars, speaker_embedding, style_idx, encoder_masks) → (encoder_seq, encoder_seq_proj).

    style_idx (B,) int64: 0..9 picks a GST token; any other value (MockingBird uses −1) takes the
    style from the speaker embedding with a zero reference (C, D) or adds no style (B). Variant A
    ignores it (an exporter may then drop the unused input).
    """

    def __init__(self, model: Tacotron):
        super().__init__()
        self.model = model

    def forward(self, chars: torch.Tensor, speaker_embedding: torch.Tensor, style_idx: torch.Tensor,
                encoder_masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.encode(chars, speaker_embedding, style_idx, encoder_masks)


class DecoderStepGraph(nn.Module):
    """One decoder step; inputs and outputs in DECODER_INPUTS / DECODER_OUTPUTS order."""

    def __init__(self, model: Tacotron):
        super().__init__()
        self.decoder = model.decoder
        # Read once: r fixes the output shape, so it is a constant of the graph, not a tensor.
        self.r = int(model.decoder.r)

    def forward(self, prev_frame: torch.Tensor, decoder_masks: torch.Tensor, attn_hidden: torch.Tensor,
                rnn1_h: torch.Tensor, rnn1_c: torch.Tensor, rnn2_h: torch.Tensor, rnn2_c: torch.Tensor,
                context: torch.Tensor, cumulative: torch.Tensor, encoder_seq: torch.Tensor,
                encoder_seq_proj: torch.Tensor, chars: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.decoder(self.r, prev_frame, decoder_masks, attn_hidden, rnn1_h, rnn1_c, rnn2_h, rnn2_c,
                            context, cumulative, encoder_seq, encoder_seq_proj, chars)


class PostnetGraph(nn.Module):
    """mel (B, n_mels, T_mel) → mel_post (B, n_mels, T_mel)."""

    def __init__(self, model: Tacotron):
        super().__init__()
        self.model = model

    def forward(self, mel: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.model.postprocess(mel),)


def initial_decoder_state(batch: int, n_text: int, cfg: SynthesizerConfig) -> dict[str, torch.Tensor]:
    """Zero state for step 0 as tensors, keyed by the decoder_step input names in STATE_NAMES."""
    return {name: torch.from_numpy(z) for name, z in zero_decoder_state(batch, n_text, cfg).items()}


def graph_specs(model: Tacotron, cfg: SynthesizerConfig, batch: int = 1, n_text: int = 12,
                n_frames: int = 24) -> list[GraphSpec]:
    """The three graphs with names, dynamic axes and small example inputs (for tracing only)."""
    model.eval()
    gen = torch.Generator().manual_seed(0)
    enc_width, dec_width = cfg.prenet_dims
    chars = torch.randint(2, cfg.n_symbols, (batch, n_text), generator=gen)
    chars[:, -1] = 1  # EOS, as real input ends
    speaker = torch.randn(batch, cfg.speaker_embedding_dim, generator=gen)
    speaker = speaker / speaker.norm(dim=1, keepdim=True)
    style_idx = torch.full((batch,), -1, dtype=torch.int64)
    enc_masks = (torch.rand(2, batch, n_text, enc_width, generator=gen) >= 0.5).float() * 2.0
    with torch.no_grad():
        encoder_seq, encoder_seq_proj = model.encode(chars, speaker, style_idx, enc_masks)
    state = initial_decoder_state(batch, n_text, cfg)
    dec_masks = (torch.rand(2, batch, dec_width, generator=gen) >= 0.5).float() * 2.0
    decoder_example = (torch.zeros(batch, cfg.n_mels), dec_masks, *state.values(), encoder_seq,
                       encoder_seq_proj, chars)
    mel = torch.randn(batch, cfg.n_mels, n_frames, generator=gen)

    b, t = {0: "batch"}, {0: "batch", 1: "text"}
    encoder_axes = {"chars": t, "speaker_embedding": b, "style_idx": b,
                    "encoder_masks": {1: "batch", 2: "text"}, "encoder_seq": t, "encoder_seq_proj": t}
    decoder_axes = {name: b for name in DECODER_INPUTS + DECODER_OUTPUTS}
    decoder_axes |= {name: {1: "batch"} for name in ("decoder_masks",)}
    decoder_axes |= {name: t for name in ("cumulative", "cumulative_out", "attention", "encoder_seq",
                                          "encoder_seq_proj", "chars")}
    frames = {0: "batch", 2: "frames"}
    return [
        GraphSpec(COMPONENT, "encoder", EncoderGraph(model).eval(), ENCODER_INPUTS, ENCODER_OUTPUTS,
                  encoder_axes, (chars, speaker, style_idx, enc_masks)),
        GraphSpec(COMPONENT, "decoder_step", DecoderStepGraph(model).eval(), DECODER_INPUTS,
                  DECODER_OUTPUTS, decoder_axes, decoder_example),
        GraphSpec(COMPONENT, "postnet", PostnetGraph(model).eval(), POSTNET_INPUTS, POSTNET_OUTPUTS,
                  {"mel": frames, "mel_post": frames}, (mel,)),
    ]
