"""The three synthesizer graphs' interface: tensor names and the decoder's zero state, without torch.

What the host loop needs to drive any backend (ONNX Runtime, TensorRT, the PyTorch modules). The
modules themselves are in `models/synthesizer_graphs.py`, which re-exports these names; kept apart
so that serving exported artifacts never imports torch.
"""

from __future__ import annotations

import numpy as np

from voxport.models.synthesizer_config import SynthesizerConfig

COMPONENT = "synthesizer"
ENCODER_INPUTS = ("chars", "speaker_embedding", "style_idx", "encoder_masks")
ENCODER_OUTPUTS = ("encoder_seq", "encoder_seq_proj")
# Recurrent state carried between decoder steps; step outputs are these names + "_out".
STATE_NAMES = ("attn_hidden", "rnn1_h", "rnn1_c", "rnn2_h", "rnn2_c", "context", "cumulative")
DECODER_INPUTS = ("prev_frame", "decoder_masks", *STATE_NAMES, "encoder_seq", "encoder_seq_proj", "chars")
DECODER_OUTPUTS = ("mel_frames", "stop", "attention", *(f"{n}_out" for n in STATE_NAMES))
POSTNET_INPUTS = ("mel",)
POSTNET_OUTPUTS = ("mel_post",)


def state_widths(n_text: int, cfg: SynthesizerConfig) -> dict[str, int]:
    """Last dim of each decoder state tensor (all are (batch, width) float32)."""
    return {"attn_hidden": cfg.decoder_dims, "rnn1_h": cfg.lstm_dims, "rnn1_c": cfg.lstm_dims,
            "rnn2_h": cfg.lstm_dims, "rnn2_c": cfg.lstm_dims, "context": cfg.project_dims,
            "cumulative": n_text}


def zero_decoder_state(batch: int, n_text: int, cfg: SynthesizerConfig) -> dict[str, np.ndarray]:
    """Zero state for step 0 as float32 arrays, keyed by the decoder_step input names in STATE_NAMES."""
    widths = state_widths(n_text, cfg)
    return {name: np.zeros((batch, widths[name]), dtype=np.float32) for name in STATE_NAMES}
