"""Sublayers of the MockingBird Tacotron: prenet, CBHG, location-sensitive attention, GST.

Attribute names equal MockingBird checkpoint keys (e.g. `conv1d_bank.0.conv.weight`,
`attn_net.L.weight`, `stl.attention.W_query.weight`). Two departures from MockingBird, both for
export and reproducibility, neither changes the arithmetic:
- the prenet takes its dropout masks as an input (MockingBird draws them inside, always on);
- the attention is stateless: the cumulative weights come in and go out as tensors.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

# GST sizes fixed by every MockingBird checkpoint, defined beside the (torch-free) config that needs GST_E.
from voxport.models.synthesizer_config import GST_E, GST_HEADS, GST_REF_FILTERS, GST_REF_WIDTH, GST_TOKENS  # noqa: F401

log = logging.getLogger(__name__)


class PreNet(nn.Module):
    """Linear → ReLU → dropout → Linear → ReLU → dropout, the dropout given as masks.

    `masks` has shape (2, *x.shape[:-1], fc2_dims) with values in {0, 1/(1-p)} (i.e. {0, 2} for
    p = 0.5): masks[0] multiplies the fc1 output, masks[1] the fc2 output. MockingBird keeps
    dropout on at inference, so the masks are part of the model's input, not a training detail.
    """

    def __init__(self, in_dims: int, fc1_dims: int, fc2_dims: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dims, fc1_dims)
        self.fc2 = nn.Linear(fc1_dims, fc2_dims)

    def forward(self, x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(x)) * masks[0]
        return F.relu(self.fc2(x)) * masks[1]


class BatchNormConv(nn.Module):
    """Conv1d (no bias, 'same' padding k//2) → optional ReLU → BatchNorm (ReLU before BN, as MB)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, relu: bool = True):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False)
        self.bnorm = nn.BatchNorm1d(out_channels)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return self.bnorm(F.relu(x) if self.relu else x)


class HighwayNetwork(nn.Module):
    """y = g·ReLU(W1 x) + (1 − g)·x with gate g = σ(W2 x)."""

    def __init__(self, size: int):
        super().__init__()
        self.W1 = nn.Linear(size, size)
        self.W2 = nn.Linear(size, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.W2(x))
        return gate * F.relu(self.W1(x)) + (1.0 - gate) * x


class CBHG(nn.Module):
    """Conv bank (kernels 1..K) → max-pool → two conv projections + residual → highways → BiGRU.

    Input (B, in_channels, T); output (B, T, channels). The BiGRU runs over padding too (no
    packing), as in MockingBird, so batched results depend on the padded length.
    """

    def __init__(self, K: int, in_channels: int, channels: int, proj_channels: tuple[int, int],
                 num_highways: int):
        super().__init__()
        self.conv1d_bank = nn.ModuleList(BatchNormConv(in_channels, channels, k) for k in range(1, K + 1))
        self.maxpool = nn.MaxPool1d(kernel_size=2, stride=1, padding=1)
        self.conv_project1 = BatchNormConv(K * channels, proj_channels[0], 3)
        self.conv_project2 = BatchNormConv(proj_channels[0], proj_channels[1], 3, relu=False)
        # Only the postnet needs it (80 → 512); its absence in the encoder matches the checkpoint keys.
        if proj_channels[1] != channels:
            self.pre_highway = nn.Linear(proj_channels[1], channels, bias=False)
        self.highways = nn.ModuleList(HighwayNetwork(channels) for _ in range(num_highways))
        self.rnn = nn.GRU(channels, channels // 2, batch_first=True, bidirectional=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        seq_len = x.shape[-1]
        # Even kernels give T+1 frames with padding k//2; cut every branch back to T.
        bank = torch.cat([conv(x)[:, :, :seq_len] for conv in self.conv1d_bank], dim=1)
        x = self.maxpool(bank)[:, :, :seq_len]
        x = self.conv_project2(self.conv_project1(x)) + residual
        x = x.transpose(1, 2)  # (B, T, C)
        if hasattr(self, "pre_highway"):
            x = self.pre_highway(x)
        for highway in self.highways:
            x = highway(x)
        return self.rnn(x)[0]


class LSA(nn.Module):
    """Location-sensitive attention over the cumulative attention weights (stateless form).

    Energies of padded characters (id 0) are multiplied by 0, not set to −inf: padded positions
    keep a share of the softmax. That is MockingBird's behaviour and is kept for parity.
    """

    def __init__(self, attn_dim: int, kernel_size: int = 31, filters: int = 32):
        super().__init__()
        self.conv = nn.Conv1d(1, filters, kernel_size, padding=(kernel_size - 1) // 2, bias=True)
        self.L = nn.Linear(filters, attn_dim, bias=False)
        self.W = nn.Linear(attn_dim, attn_dim, bias=True)
        self.v = nn.Linear(attn_dim, 1, bias=False)

    def forward(self, encoder_seq_proj: torch.Tensor, query: torch.Tensor, cumulative: torch.Tensor,
                chars: torch.Tensor) -> torch.Tensor:
        """(B,T,A), (B,A), (B,T), (B,T) int → attention weights (B,T)."""
        processed_query = self.W(query).unsqueeze(1)  # (B, 1, A)
        processed_loc = self.L(self.conv(cumulative.unsqueeze(1)).transpose(1, 2))  # (B, T, A)
        energies = self.v(torch.tanh(processed_query + encoder_seq_proj + processed_loc)).squeeze(-1)
        energies = energies * (chars != 0).to(energies.dtype)
        return torch.softmax(energies, dim=1)


class MultiHeadAttention(nn.Module):
    """GST attention: per-head scaled dot product (scale 1/sqrt(key_dim)), heads concatenated."""

    def __init__(self, query_dim: int, key_dim: int, num_units: int, num_heads: int):
        super().__init__()
        self.num_units = num_units
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.W_query = nn.Linear(query_dim, num_units, bias=False)
        self.W_key = nn.Linear(key_dim, num_units, bias=False)
        self.W_value = nn.Linear(key_dim, num_units, bias=False)

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """(N, Tq, query_dim), (N, Tk, key_dim) → (N, Tq, num_units)."""
        split = self.num_units // self.num_heads
        q = torch.stack(torch.split(self.W_query(query), split, dim=2))  # (h, N, Tq, u/h)
        k = torch.stack(torch.split(self.W_key(key), split, dim=2))
        v = torch.stack(torch.split(self.W_value(key), split, dim=2))
        scores = torch.softmax(q @ k.transpose(2, 3) / (self.key_dim**0.5), dim=3)
        out = scores @ v  # (h, N, Tq, u/h)
        return torch.cat(torch.unbind(out, dim=0), dim=2)


class ReferenceEncoder(nn.Module):
    """6 × (Conv2d 3×3 stride 2 → BN → ReLU) over a (N, frames·256) input → GRU → final hidden (N, 256)."""

    def __init__(self):
        super().__init__()
        filters = (1, *GST_REF_FILTERS)
        self.convs = nn.ModuleList(
            nn.Conv2d(filters[i], filters[i + 1], kernel_size=3, stride=2, padding=1)
            for i in range(len(GST_REF_FILTERS))
        )
        self.bns = nn.ModuleList(nn.BatchNorm2d(f) for f in GST_REF_FILTERS)
        width = GST_REF_WIDTH
        for _ in GST_REF_FILTERS:
            width = (width - 3 + 2) // 2 + 1
        self.gru = nn.GRU(GST_REF_FILTERS[-1] * width, GST_E // 2, batch_first=True)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        n = inputs.shape[0]
        out = inputs.reshape(n, 1, -1, GST_REF_WIDTH)  # (N, 1, frames, 256)
        for conv, bn in zip(self.convs, self.bns, strict=True):
            out = F.relu(bn(conv(out)))
        out = out.transpose(1, 2)  # (N, frames', 128, 4)
        out = out.reshape(n, out.shape[1], -1)
        return self.gru(out)[1].squeeze(0)


class STL(nn.Module):
    """Style token layer: 10 learned tokens (keys = tanh(embed)) attended by the reference query."""

    def __init__(self, query_dim: int):
        super().__init__()
        self.embed = nn.Parameter(torch.zeros(GST_TOKENS, GST_E // GST_HEADS))
        self.attention = MultiHeadAttention(query_dim, GST_E // GST_HEADS, GST_E, GST_HEADS)

    def forward(self, query: torch.Tensor) -> torch.Tensor:
        """(N, query_dim) → style (N, 1, 512)."""
        keys = torch.tanh(self.embed).unsqueeze(0).expand(query.shape[0], -1, -1)
        return self.attention(query.unsqueeze(1), keys)

    def token_styles(self) -> torch.Tensor:
        """Style of each token alone, (10, 512): MockingBird's `style_idx` inference path.

        MockingBird attends a zero query to the single key tanh(embed[i]): the softmax over one key
        is exactly 1, so the output is W_value·tanh(embed[i]) (equal up to matmul rounding).
        """
        return self.attention.W_value(torch.tanh(self.embed))


class GlobalStyleToken(nn.Module):
    """ReferenceEncoder → (optional concat of the speaker embedding) → STL."""

    def __init__(self, speaker_embedding_dim: int | None):
        super().__init__()
        self.use_speaker = speaker_embedding_dim is not None
        self.encoder = ReferenceEncoder()
        self.stl = STL(GST_E // 2 + (speaker_embedding_dim or 0))

    def forward(self, inputs: torch.Tensor, speaker_embedding: torch.Tensor | None = None) -> torch.Tensor:
        """(N, frames·256) reference, (N, 256) speaker → (N, 1, 512)."""
        ref = self.encoder(inputs)
        if self.use_speaker:
            ref = torch.cat([ref, speaker_embedding], dim=-1)
        return self.stl(ref)
