"""MockingBird / RTVC Tacotron synthesizer (variants A-D), its loader and seeded construction.

Variants (models.md §2.6), told apart by tensor shapes:
- A: no GST (RTVC, early MockingBird); encoder sequence = text (256) + speaker (256) = 512.
- B: GST *added* to that 512-d sequence (MockingBird v0.0.1); style only for 0 <= style_idx < 10.
- C: GST concatenated (512 + 512 = 1024), STL query = reference encoder output only (256).
- D: like C, STL query = reference output + speaker embedding (512). MockingBird HEAD, default.

Attribute names equal MockingBird checkpoint keys, so real files load strictly with `load_into`.
The export graphs (encoder / decoder_step / postnet) are in `models/synthesizer_graphs.py`, the
host loop with the stop rule in `runtime/synthesizer_loop.py`, the config in `models/synthesizer_config.py`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from voxport.errors import CheckpointError
from voxport.models.checkpoint import load_into, load_state_dict

# Re-exported: the config lives in a torch-free module the serving runtime imports.
from voxport.models.synthesizer_config import (  # noqa: F401
    GST_E,
    GST_HEADS,
    GST_TOKENS,
    MEL_DOMAINS,
    NATURAL_LOG_STOP_THRESHOLD,
    VARIANTS,
    SynthesizerConfig,
)
from voxport.models.tacotron_layers import CBHG, LSA, GlobalStyleToken, PreNet
from voxport.models.text import SYMBOL_TABLE_SIZES

log = logging.getLogger(__name__)

SEEDED_STOP_BIAS = -8.0  # sigmoid(-8) ≈ 3e-4: an untrained model never fires the stop token


class Encoder(nn.Module):
    """Embedding → prenet (explicit masks) → CBHG: ids (B, T) → (B, T, encoder_dims)."""

    def __init__(self, cfg: SynthesizerConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.n_symbols, cfg.embed_dims)
        self.pre_net = PreNet(cfg.embed_dims, cfg.encoder_dims, cfg.encoder_dims)
        self.cbhg = CBHG(cfg.encoder_K, cfg.encoder_dims, cfg.encoder_dims,
                         (cfg.encoder_dims, cfg.encoder_dims), cfg.num_highways)

    def forward(self, chars: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        x = self.pre_net(self.embedding(chars), masks)  # (B, T, 256)
        return self.cbhg(x.transpose(1, 2))


class Decoder(nn.Module):
    """One attention + residual-LSTM decoder step with all recurrent state passed explicitly."""

    def __init__(self, cfg: SynthesizerConfig):
        super().__init__()
        self.register_buffer("r", torch.tensor(cfg.r, dtype=torch.int32))
        self.n_mels = cfg.n_mels
        self.max_r = cfg.max_r
        project, dec, lstm = cfg.project_dims, cfg.decoder_dims, cfg.lstm_dims
        self.prenet = PreNet(cfg.n_mels, 2 * dec, 2 * dec)
        self.attn_net = LSA(dec)
        self.attn_rnn = nn.GRUCell(project + 2 * dec, dec)
        self.rnn_input = nn.Linear(project + dec, lstm)
        self.res_rnn1 = nn.LSTMCell(lstm, lstm)
        self.res_rnn2 = nn.LSTMCell(lstm, lstm)
        self.mel_proj = nn.Linear(lstm, cfg.n_mels * cfg.max_r, bias=False)
        self.stop_proj = nn.Linear(project + lstm, 1)

    def forward(self, r: int, prev_frame: torch.Tensor, masks: torch.Tensor, attn_hidden: torch.Tensor,
                rnn1_h: torch.Tensor, rnn1_c: torch.Tensor, rnn2_h: torch.Tensor, rnn2_c: torch.Tensor,
                context: torch.Tensor, cumulative: torch.Tensor, encoder_seq: torch.Tensor,
                encoder_seq_proj: torch.Tensor, chars: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Returns (mel_frames (B, n_mels, r), stop (B,), attention (B, T), attn_hidden, rnn1_h,
        rnn1_c, rnn2_h, rnn2_c, context, cumulative). `r` is a Python int so graphs stay static."""
        prenet_out = self.prenet(prev_frame, masks)
        attn_hidden = self.attn_rnn(torch.cat([context, prenet_out], dim=-1), attn_hidden)
        weights = self.attn_net(encoder_seq_proj, attn_hidden, cumulative, chars)
        cumulative = cumulative + weights
        context = (weights.unsqueeze(1) @ encoder_seq).squeeze(1)
        x = self.rnn_input(torch.cat([context, attn_hidden], dim=1))
        rnn1_h, rnn1_c = self.res_rnn1(x, (rnn1_h, rnn1_c))
        x = x + rnn1_h
        rnn2_h, rnn2_c = self.res_rnn2(x, (rnn2_h, rnn2_c))
        x = x + rnn2_h
        # Channel-major layout (n_mels, max_r), as trained: frame j of bin m is element m·max_r + j.
        mels = self.mel_proj(x).reshape(x.shape[0], self.n_mels, self.max_r)[:, :, :r]
        stop = torch.sigmoid(self.stop_proj(torch.cat([x, context], dim=1))).squeeze(1)
        return mels, stop, weights, attn_hidden, rnn1_h, rnn1_c, rnn2_h, rnn2_c, context, cumulative


class Tacotron(nn.Module):
    """The whole synthesizer. Inference runs as three graphs (see `synthesizer_graphs`)."""

    def __init__(self, cfg: SynthesizerConfig):
        super().__init__()
        self.variant = cfg.variant
        self.register_buffer("step", torch.zeros(1, dtype=torch.long))
        self.register_buffer("stop_threshold", torch.tensor(cfg.stop_threshold, dtype=torch.float32))
        self.encoder = Encoder(cfg)
        self.encoder_proj = nn.Linear(cfg.project_dims, cfg.decoder_dims, bias=False)
        if cfg.has_gst:
            self.gst = GlobalStyleToken(cfg.speaker_embedding_dim if cfg.variant == "D" else None)
        self.decoder = Decoder(cfg)
        self.postnet = CBHG(cfg.postnet_K, cfg.n_mels, cfg.postnet_dims, (cfg.postnet_dims, cfg.n_mels),
                            cfg.num_highways)
        self.post_proj = nn.Linear(cfg.postnet_dims, cfg.n_mels, bias=False)

    def encode(self, chars: torch.Tensor, speaker_embedding: torch.Tensor, style_idx: torch.Tensor,
               masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) ids, (B, 256), (B,) int, (2, B, T, 256) → encoder_seq (B, T, D), proj (B, T, 128)."""
        x = self.encoder(chars, masks)
        tiled = speaker_embedding.unsqueeze(1).expand(-1, x.shape[1], -1)
        x = torch.cat([x, tiled], dim=-1)
        if self.variant in ("C", "D"):
            style = self._concat_style(speaker_embedding, style_idx)
            x = torch.cat([x, style.unsqueeze(1).expand(-1, x.shape[1], -1)], dim=-1)
        elif self.variant == "B":
            x = x + self._added_style(style_idx).unsqueeze(1)
        return x, self.encoder_proj(x)

    def _concat_style(self, speaker_embedding: torch.Tensor, style_idx: torch.Tensor) -> torch.Tensor:
        """Variants C/D: token i's style for 0 <= idx < 10, else GST of a zero reference (B, 512)."""
        valid = ((style_idx >= 0) & (style_idx < GST_TOKENS)).unsqueeze(1)
        token = self.gst.stl.token_styles()[style_idx.clamp(0, GST_TOKENS - 1)]
        # MockingBird feeds one all-zero 256-wide frame as the reference "mel" here.
        from_speaker = self.gst(torch.zeros_like(speaker_embedding), speaker_embedding).squeeze(1)
        return torch.where(valid, token, from_speaker)

    def _added_style(self, style_idx: torch.Tensor) -> torch.Tensor:
        """Variant B (v0.0.1): GST of 0.3 × the raw token row tiled to 512, else no style (B, 512)."""
        valid = ((style_idx >= 0) & (style_idx < GST_TOKENS)).unsqueeze(1)
        reference = self.gst.stl.embed.repeat(1, GST_HEADS)[style_idx.clamp(0, GST_TOKENS - 1)] * 0.3
        style = self.gst(reference).squeeze(1)
        return torch.where(valid, style, torch.zeros_like(style))

    def postprocess(self, mel: torch.Tensor) -> torch.Tensor:
        """Decoder mels (B, n_mels, T) → postnet output (B, n_mels, T), what inference returns."""
        return self.post_proj(self.postnet(mel)).transpose(1, 2)


def detect_variant(state_dict: dict[str, torch.Tensor]) -> tuple[str, int]:
    """(variant, n_symbols) from tensor shapes (models.md §2.6); CheckpointError names the bad key."""

    def shape_of(key: str) -> tuple[int, ...] | None:
        return tuple(state_dict[key].shape) if key in state_dict else None

    emb_key, proj_key, query_key = (
        "encoder.embedding.weight", "encoder_proj.weight", "gst.stl.attention.W_query.weight")
    emb = shape_of(emb_key)
    if emb is None or len(emb) != 2 or emb[0] not in SYMBOL_TABLE_SIZES:
        raise CheckpointError(
            f"'{emb_key}' has shape {emb}; expected (n_symbols, 512) with n_symbols in {SYMBOL_TABLE_SIZES}"
            " — is this a MockingBird/RTVC synthesizer checkpoint?")
    proj, query = shape_of(proj_key), shape_of(query_key)
    if proj == (128, 512) and query is None:
        variant = "A"
    elif proj == (128, 512) and query == (GST_E, GST_E // 2):
        variant = "B"
    elif proj == (128, 1024) and query == (GST_E, GST_E // 2):
        variant = "C"
    elif proj == (128, 1024) and query == (GST_E, GST_E):
        variant = "D"
    elif proj not in ((128, 512), (128, 1024)):
        raise CheckpointError(f"'{proj_key}' has shape {proj}; expected (128, 512) or (128, 1024)")
    else:
        raise CheckpointError(
            f"'{query_key}' has shape {query} with '{proj_key}' {proj}: fits no known variant "
            "(A: no GST + (128,512); B: (512,256) + (128,512); C: (512,256) + (128,1024); "
            "D: (512,512) + (128,1024))")
    return variant, emb[0]


def _uninitialized(cfg: SynthesizerConfig) -> Tacotron:
    """A Tacotron with allocated but unset tensors, for callers that set every value themselves.

    Built on the meta device because PyTorch's default init would draw from (and advance) the
    global RNG, a side effect on the caller, and costs as much as the construction itself.
    """
    with torch.device("meta"):
        model = Tacotron(cfg)
    return model.to_empty(device="cpu")


def synthesizer_from_state_dict(state_dict: dict[str, torch.Tensor], *, source: str = "checkpoint",
                                **overrides: Any) -> tuple[Tacotron, SynthesizerConfig]:
    """Build the detected variant, load strictly, eval. `overrides` replace config fields (e.g.
    `stop_threshold`, `max_decoder_steps`, or a forced `variant` / `n_symbols`, which then must fit)."""
    values: dict[str, Any] = {}
    if not {"variant", "n_symbols"} <= set(overrides):
        values["variant"], values["n_symbols"] = detect_variant(state_dict)
    if "decoder.r" in state_dict:
        values["r"] = int(state_dict["decoder.r"])
    if "stop_threshold" in state_dict:
        values["stop_threshold"] = round(float(state_dict["stop_threshold"]), 6)
    cfg = SynthesizerConfig(**(values | overrides))
    model = _uninitialized(cfg)
    load_into(model, state_dict, source=source)
    # The buffers follow the config, so an explicit override (e.g. a trim threshold) is what runs.
    model.decoder.r.fill_(cfg.r)
    model.stop_threshold.fill_(cfg.stop_threshold)
    model.eval()
    log.info("%s: synthesizer variant %s, %d symbols, r=%d, trained %d steps", source, cfg.variant,
             cfg.n_symbols, cfg.r, int(model.step[0]))
    return model, cfg


def load_synthesizer(path: str | Path, **overrides: Any) -> tuple[Tacotron, SynthesizerConfig]:
    """Read a MockingBird/RTVC synthesizer checkpoint (variant detected from shapes), strict, eval."""
    path = Path(path)
    return synthesizer_from_state_dict(load_state_dict(path), source=path.name, **overrides)


def seeded_synthesizer(cfg: SynthesizerConfig, seed: int) -> Tacotron:
    """An untrained Tacotron whose weights depend only on (cfg, seed), in eval mode.

    Draws from a private torch.Generator in parameter-name order (global RNG untouched): Xavier-
    uniform for matrices, U(±1/sqrt(fan_in)) for biases, BatchNorm at identity, as PyTorch/MB init;
    the stop-token bias is SEEDED_STOP_BIAS, so generation always runs to max_decoder_steps.
    """
    model = _uninitialized(cfg)
    model.step.zero_()
    model.stop_threshold.fill_(cfg.stop_threshold)
    model.decoder.r.fill_(cfg.r)
    generator = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    batchnorm = {f"{m}.{p}" for m, mod in model.named_modules()
                 if isinstance(mod, nn.modules.batchnorm._BatchNorm) for p in ("weight", "bias")}
    with torch.no_grad():
        for name, param in params.items():
            if name in batchnorm:
                param.fill_(1.0 if name.endswith("weight") else 0.0)
            elif param.dim() > 1:
                nn.init.xavier_uniform_(param, generator=generator)
            else:
                # Bias `x.bias_ih_l0` belongs to weight `x.weight_ih_l0`; its fan-in is that weight's width.
                owner, leaf = name.rsplit(".", 1)
                weight = params.get(f"{owner}.{leaf.replace('bias', 'weight', 1)}")
                bound = 1.0 / math.sqrt(weight[0].numel() if weight is not None else param.shape[0])
                nn.init.uniform_(param, -bound, bound, generator=generator)
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
        # Random weights put the stop probability at a coin flip around 0.5, so the loop would end at
        # the first allowed step (14 frames) or not, by chance. A clearly negative bias makes the
        # untrained model run to max_decoder_steps every time: predictable length and cost.
        model.decoder.stop_proj.bias.fill_(SEEDED_STOP_BIAS)
    return model.eval()
