"""Count the multiply-accumulates a module really performs, per layer, by running it once.

Forward hooks on Conv1d, ConvTranspose1d, Linear and LSTM read the actual input/output shapes,
so dilation, stride, padding and the time axis are all accounted for without re-deriving them.
FLOPs = 2 x MACs (one multiply and one add); biases and activations are left out, as is usual
(they are < 0.1 % of HiFi-GAN's work). Zeros in a dense weight still cost: unstructured sparsity
does not lower these figures, which is the point of counting them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FlopReport:
    """MACs of one forward pass, in total and per named layer."""

    macs: int
    per_layer: dict[str, int] = field(default_factory=dict)

    @property
    def flops(self) -> int:
        return 2 * self.macs


def conv1d_macs(layer: nn.Conv1d, out_len: int, batch: int = 1) -> int:
    """Every output sample of every output channel reads in/groups x kernel weights."""
    per_out = layer.in_channels // layer.groups * layer.kernel_size[0]
    return batch * layer.out_channels * out_len * per_out


def conv_transpose1d_macs(layer: nn.ConvTranspose1d, in_len: int, batch: int = 1) -> int:
    """Every input sample scatters into out/groups x kernel outputs (padding only crops them)."""
    per_in = layer.out_channels // layer.groups * layer.kernel_size[0]
    return batch * layer.in_channels * in_len * per_in


def linear_macs(layer: nn.Linear, rows: int) -> int:
    return rows * layer.in_features * layer.out_features


def lstm_macs(layer: nn.LSTM, steps: int, batch: int = 1) -> int:
    """Four gates per step: W_ih x + W_hh h (+ the projection when proj_size > 0)."""
    directions = 2 if layer.bidirectional else 1
    hidden = layer.hidden_size
    out = layer.proj_size or hidden
    total = 0
    for index in range(layer.num_layers):
        inp = layer.input_size if index == 0 else out * directions
        per_step = 4 * hidden * (inp + out) + (hidden * out if layer.proj_size else 0)
        total += directions * per_step
    return batch * steps * total


def _first_tensor(x: object) -> torch.Tensor:
    while isinstance(x, tuple | list):
        x = x[0]
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a tensor, got {type(x).__name__}")
    return x


def count_macs(module: nn.Module, inputs: Sequence[torch.Tensor]) -> FlopReport:
    """Run `module(*inputs)` once without gradients and add up the MACs of every counted layer."""
    per_layer: dict[str, int] = {}
    handles = []

    def hook(name: str):
        def record(layer: nn.Module, args: tuple, output: object) -> None:
            x, y = _first_tensor(args), _first_tensor(output)
            if isinstance(layer, nn.ConvTranspose1d):
                batch = x.shape[0] if x.dim() == 3 else 1
                macs = conv_transpose1d_macs(layer, x.shape[-1], batch)
            elif isinstance(layer, nn.Conv1d):
                batch = y.shape[0] if y.dim() == 3 else 1
                macs = conv1d_macs(layer, y.shape[-1], batch)
            elif isinstance(layer, nn.Linear):
                macs = linear_macs(layer, x.numel() // layer.in_features)
            else:  # nn.LSTM: input (B, T, F) when batch_first, else (T, B, F); 2-D = unbatched
                if x.dim() == 2:
                    steps, batch = x.shape[0], 1
                elif layer.batch_first:
                    batch, steps = x.shape[0], x.shape[1]
                else:
                    steps, batch = x.shape[0], x.shape[1]
                macs = lstm_macs(layer, steps, batch)
            per_layer[name] = per_layer.get(name, 0) + int(macs)

        return record

    for name, layer in module.named_modules():
        if isinstance(layer, nn.Conv1d | nn.ConvTranspose1d | nn.Linear | nn.LSTM):
            handles.append(layer.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            module(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return FlopReport(sum(per_layer.values()), per_layer)


def vocoder_flops_per_second(generator: nn.Module, frames: int = 86) -> dict[str, float]:
    """FLOPs and MACs per second of audio for a HiFi-GAN generator (one batch-1 pass).

    Every layer's work is linear in the number of frames, so `frames` only has to be long enough
    for nothing to be an edge case; the default is one second at 22.05 kHz / hop 256.
    """
    cfg = generator.cfg
    mel = torch.zeros(1, cfg.num_mels, frames)
    report = count_macs(generator, (mel,))
    seconds = frames * cfg.hop_length / cfg.mel.sample_rate
    return {"flops_per_audio_second": report.flops / seconds, "macs_per_audio_second": report.macs / seconds,
            "params": int(sum(p.numel() for p in generator.parameters()))}
