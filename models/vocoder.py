"""HiFi-GAN generator: jik876 V1/V2/V3 and MockingBird's 16 kHz variant, in inference form.

The modules are plain Conv1d / ConvTranspose1d whose attribute names equal the checkpoint keys
(`conv_pre`, `ups.{i}`, `resblocks.{j}.convs1/convs2.{k}` or `.convs.{k}`, `conv_post`).
Checkpoints store weight-normed layers (`weight_g`/`weight_v`, or
`parametrizations.weight.original0/1` from the newer torch API); `load_vocoder` folds
g * v / ||v|| into `weight` before a strict load, which is exactly what `remove_weight_norm` does,
so the loaded model is already what gets exported.

Out of scope: MockingBird's 24 kHz variant (nearest-interpolate + Conv1d upsampling, keys
`ups.{i}.1.*`); it is refused with a clear error.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from voxport.errors import CheckpointError, ConfigError
from voxport.models import audio
from voxport.models.audio import MelConfig
from voxport.models.checkpoint import load_into, load_state_dict
from voxport.models.graph import GraphSpec

log = logging.getLogger(__name__)

_LRELU_SLOPE = 0.1  # inside the network; the last activation before conv_post uses torch's 0.01


@dataclass(frozen=True)
class VocoderConfig:
    """Generator hyperparameters (jik876 config.json names) plus the mel it expects.

    padding: "jik876" -> ConvTranspose padding (k - u) // 2 (exact hop * T when k - u is even);
             "mockingbird" -> padding u // 2 + u % 2, output_padding u % 2 (exact for odd u too).
    resblock_inner_channels: None = full width; else per resblock (in module order), per dilation,
             the output width of convs1 (= input width of convs2). Structured pruning shrinks
             these: they sit inside the residual branch, so the block's own width is untouched.
    """

    resblock: str
    upsample_rates: tuple[int, ...]
    upsample_kernel_sizes: tuple[int, ...]
    upsample_initial_channel: int
    resblock_kernel_sizes: tuple[int, ...]
    resblock_dilation_sizes: tuple[tuple[int, ...], ...]
    mel: MelConfig
    num_mels: int = 80
    padding: str = "jik876"
    resblock_inner_channels: tuple[tuple[int, ...], ...] | None = None
    hop_length: int = field(init=False)

    def __post_init__(self) -> None:
        # Lists from JSON become tuples so the config stays hashable and compares by value.
        object.__setattr__(self, "upsample_rates", tuple(self.upsample_rates))
        object.__setattr__(self, "upsample_kernel_sizes", tuple(self.upsample_kernel_sizes))
        object.__setattr__(self, "resblock_kernel_sizes", tuple(self.resblock_kernel_sizes))
        object.__setattr__(
            self, "resblock_dilation_sizes", tuple(tuple(d) for d in self.resblock_dilation_sizes)
        )
        object.__setattr__(self, "hop_length", math.prod(self.upsample_rates))
        if self.resblock_inner_channels is not None:
            inner = tuple(tuple(int(c) for c in widths) for widths in self.resblock_inner_channels)
            object.__setattr__(self, "resblock_inner_channels", inner)
            if self.resblock != "1":
                raise ConfigError("resblock_inner_channels needs resblock '1' (convs1 -> convs2 pairs)")
            n_blocks = len(self.upsample_rates) * len(self.resblock_kernel_sizes)
            expected = [len(d) for d in self.resblock_dilation_sizes] * len(self.upsample_rates)
            if [len(w) for w in inner] != expected or n_blocks != len(inner):
                raise ConfigError(f"resblock_inner_channels must give {n_blocks} blocks with widths per "
                                  f"dilation {expected}, got {[len(w) for w in inner]}")
            if any(c < 1 for widths in inner for c in widths):
                raise ConfigError("resblock_inner_channels must all be >= 1")
        if self.resblock not in ("1", "2"):
            raise ConfigError(f"resblock must be '1' or '2', got {self.resblock!r}")
        if self.padding not in ("jik876", "mockingbird"):
            raise ConfigError(f"padding must be 'jik876' or 'mockingbird', got {self.padding!r}")
        if len(self.upsample_rates) != len(self.upsample_kernel_sizes):
            raise ConfigError("upsample_rates and upsample_kernel_sizes differ in length")
        if len(self.resblock_kernel_sizes) != len(self.resblock_dilation_sizes):
            raise ConfigError("resblock_kernel_sizes and resblock_dilation_sizes differ in length")
        if self.upsample_initial_channel % 2 ** len(self.upsample_rates):
            raise ConfigError("upsample_initial_channel must halve cleanly at every stage")
        if self.hop_length != self.mel.hop_length:
            raise ConfigError(
                f"product of upsample_rates is {self.hop_length} but the mel hop is "
                f"{self.mel.hop_length}: the vocoder would not produce one hop per frame"
            )
        if self.num_mels != self.mel.n_mels:
            raise ConfigError(f"num_mels {self.num_mels} != mel n_mels {self.mel.n_mels}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (lists, nested mel dict); `from_dict` inverts it."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if not f.init:
                continue
            value = getattr(self, f.name)
            if f.name == "mel":
                value = value.to_dict()
            elif f.name == "resblock_dilation_sizes" or (f.name == "resblock_inner_channels" and value):
                value = [list(d) for d in value]
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VocoderConfig:
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown VocoderConfig field(s): {', '.join(unknown)}")
        values = dict(data)
        if "mel" not in values:
            raise ConfigError("VocoderConfig needs a 'mel' section")
        if not isinstance(values["mel"], MelConfig):
            values["mel"] = MelConfig.from_dict(dict(values["mel"]))
        return cls(**values)


_V1_RES = dict(resblock_kernel_sizes=(3, 7, 11), resblock_dilation_sizes=((1, 3, 5),) * 3)
V1_22K_UNIVERSAL = VocoderConfig("1", (8, 8, 2, 2), (16, 16, 4, 4), 512, mel=audio.HIFIGAN_V1_22K, **_V1_RES)
V2_22K = VocoderConfig("1", (8, 8, 2, 2), (16, 16, 4, 4), 128, mel=audio.HIFIGAN_V1_22K, **_V1_RES)
V3_22K = VocoderConfig(
    "2", (8, 8, 4), (16, 16, 8), 256, (3, 5, 7), ((1, 2), (2, 6), (3, 12)), mel=audio.HIFIGAN_V1_22K
)
MOCKINGBIRD_16K = VocoderConfig(
    "1", (5, 5, 4, 2), (10, 10, 8, 4), 512, mel=audio.MOCKINGBIRD_16K, padding="mockingbird", **_V1_RES
)


def _same_padding(kernel: int, dilation: int) -> int:
    return (kernel * dilation - dilation) // 2


class ResBlock1(nn.Module):
    """Per dilation d: x + conv_1(lrelu(conv_d(lrelu(x))))."""

    def __init__(self, channels: int, kernel: int, dilations: tuple[int, ...],
                 inner: tuple[int, ...] | None = None):
        super().__init__()
        inner = inner or (channels,) * len(dilations)
        self.convs1 = nn.ModuleList(
            nn.Conv1d(channels, w, kernel, dilation=d, padding=_same_padding(kernel, d))
            for d, w in zip(dilations, inner, strict=True)
        )
        self.convs2 = nn.ModuleList(
            nn.Conv1d(w, channels, kernel, padding=_same_padding(kernel, 1)) for w in inner
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, c2 in zip(self.convs1, self.convs2, strict=True):
            x = x + c2(F.leaky_relu(c1(F.leaky_relu(x, _LRELU_SLOPE)), _LRELU_SLOPE))
        return x


class ResBlock2(nn.Module):
    """Per dilation d: x + conv_d(lrelu(x))."""

    def __init__(self, channels: int, kernel: int, dilations: tuple[int, ...]):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel, dilation=d, padding=_same_padding(kernel, d))
            for d in dilations
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = x + conv(F.leaky_relu(x, _LRELU_SLOPE))
        return x


class PolyphaseUpsample(nn.Module):
    """A ConvTranspose1d(k = 2u, stride u, padding p <= u) as one stride-1 Conv1d + an interleave.

    Output sample n*u - p + r (0 <= r < u) of the transposed conv is W[:, :, r]^T x[n] +
    W[:, :, u + r]^T x[n - 1]: every phase r reads exactly two input frames, so a kernel-2 conv
    with u * C_out output channels computes all phases of T + 1 blocks, and interleaving them
    (channel c * u + r -> sample n * u + r) then cutting p samples at the start and p (less any
    output padding) at the end gives the transposed conv's (T - 1) u - 2p + 2u + output_padding. The same
    multiply-accumulates, but as a plain Conv: ONNX Runtime runs ConvTranspose as a float GEMM +
    col2im only, while a Conv fuses with Q/DQ into an INT8 QLinearConv, so the mixed-precision
    search can consider the upsamplers.
    Exact up to float summation order (checked in tests against the ConvTranspose1d it replaces).
    """

    def __init__(self, up: nn.ConvTranspose1d):
        super().__init__()
        c_in, c_out, k = up.weight.shape
        u, p, extra = up.stride[0], up.padding[0], up.output_padding[0]
        if k != 2 * u or not extra <= p <= u or up.dilation[0] != 1 or up.groups != 1:
            raise ConfigError(f"polyphase upsampling needs kernel 2u, padding <= u and output padding <= "
                              f"padding (got kernel {k}, stride {u}, padding {p}, output padding {extra})")
        w = up.weight.detach()  # (c_in, c_out, 2u)
        # conv tap 1 reads x[n] (transposed-conv tap r), tap 0 reads x[n - 1] (tap u + r);
        # output channel c * u + r holds phase r of channel c.
        taps = torch.stack([w[:, :, u:], w[:, :, :u]], dim=-1)  # (c_in, c_out, u, 2)
        self.conv = nn.Conv1d(c_in, c_out * u, 2, padding=1, dtype=w.dtype)
        with torch.no_grad():
            self.conv.weight.copy_(taps.permute(1, 2, 0, 3).reshape(c_out * u, c_in, 2))
            self.conv.bias.copy_(up.bias.detach().repeat_interleave(u))
        self.stride, self.trim, self.extra, self.out_channels = u, p, extra, c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = self.conv(x)  # (B, c_out * u, T + 1)
        b, _, n = blocks.shape
        y = blocks.view(b, self.out_channels, self.stride, n).transpose(2, 3).reshape(b, self.out_channels, -1)
        # ConvTranspose1d's length (T - 1) u - 2p + 2u + output_padding, starting p samples in; a
        # constant end (counted from the back) keeps the graph's lengths inferable by ONNX.
        cut = self.trim - self.extra
        return y[:, :, self.trim : (-cut if cut else None)]


class HiFiGANGenerator(nn.Module):
    """mel (B, num_mels, T) float32 -> waveform (B, 1, hop * T) in [-1, 1]."""

    def __init__(self, cfg: VocoderConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.upsample_initial_channel
        self.conv_pre = nn.Conv1d(cfg.num_mels, ch, 7, padding=3)
        self.ups = nn.ModuleList()
        for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes, strict=True)):
            if cfg.padding == "jik876":
                pad, out_pad = (k - u) // 2, 0
            else:
                pad, out_pad = u // 2 + u % 2, u % 2
            self.ups.append(
                nn.ConvTranspose1d(ch >> i, ch >> (i + 1), k, u, padding=pad, output_padding=out_pad)
            )
        levels = [(ch >> (i + 1), k, d) for i in range(len(self.ups))
                  for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes, strict=True)]
        if cfg.resblock == "1":
            inner = cfg.resblock_inner_channels or (None,) * len(levels)
            self.resblocks = nn.ModuleList(ResBlock1(c, k, d, w) for (c, k, d), w in zip(levels, inner, strict=True))
        else:
            self.resblocks = nn.ModuleList(ResBlock2(c, k, d) for c, k, d in levels)
        self.conv_post = nn.Conv1d(ch >> len(self.ups), 1, 7, padding=3)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        n_kernels = len(self.cfg.resblock_kernel_sizes)
        x = self.conv_pre(mel)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, _LRELU_SLOPE))
            blocks = self.resblocks[i * n_kernels : (i + 1) * n_kernels]
            acc = blocks[0](x)
            for blk in blocks[1:]:
                acc = acc + blk(x)
            x = acc / n_kernels
        x = self.conv_post(F.leaky_relu(x))  # torch default slope 0.01, as in jik876
        return torch.tanh(x)


# ---------------------------------------------------------------------------------------------
# Weight-norm folding and loading

_OLD_G, _OLD_V = ".weight_g", ".weight_v"
_NEW_G, _NEW_V = ".parametrizations.weight.original0", ".parametrizations.weight.original1"


def _fold(g: torch.Tensor, v: torch.Tensor, key: str) -> torch.Tensor:
    # g keeps the size of v on the kept dim(s) and 1 elsewhere (dim=0: (out, 1, 1); for
    # ConvTranspose1d weights (in, out, k) that is the input channel, as jik876 trained it).
    fits = g.dim() == 0 or (
        g.dim() == v.dim() and all(gs in (1, vs) for gs, vs in zip(g.shape, v.shape, strict=True))
    )
    if not fits:
        raise CheckpointError(f"weight-norm pair '{key}': g {tuple(g.shape)} does not fit v {tuple(v.shape)}")
    axes = [i for i in range(v.dim()) if g.dim() == 0 or g.shape[i] == 1]
    norm = v.pow(2).sum(dim=axes, keepdim=True).sqrt()
    return v * (g / norm)


def fold_weight_norm(
    state_dict: Mapping[str, torch.Tensor], *, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Replace every weight-norm pair (old or parametrization API) by the plain `weight` it defines.

    Keys that are not weight-norm pairs pass through unchanged, so an already folded state_dict
    is returned as is.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        for g_sfx, v_sfx in ((_OLD_G, _OLD_V), (_NEW_G, _NEW_V)):
            if key.endswith(g_sfx) or key.endswith(v_sfx):
                stem = key[: -len(g_sfx) if key.endswith(g_sfx) else -len(v_sfx)]
                g, v = state_dict.get(stem + g_sfx), state_dict.get(stem + v_sfx)
                if g is None or v is None:
                    missing = stem + (g_sfx if g is None else v_sfx)
                    raise CheckpointError(f"{source}: '{key}' has no partner '{missing}'")
                if key.endswith(g_sfx):
                    out[stem + ".weight"] = _fold(g, v, f"{source}: {stem}")
                break
        else:
            out[key] = value
    return out


def load_vocoder(path: str | Path, cfg: VocoderConfig) -> HiFiGANGenerator:
    """Load a jik876 / MockingBird generator checkpoint into `cfg`, folded and in eval mode."""
    path = Path(path)
    raw = load_state_dict(path)
    if any(k.startswith("ups.0.1.") for k in raw):
        raise CheckpointError(
            f"{path.name}: MockingBird 24 kHz generator (interpolate + conv upsampling) is not supported"
        )
    folded = fold_weight_norm(raw, source=path.name)
    model = HiFiGANGenerator(cfg)
    # Name the key as the file spells it: a folded 'x.weight' came from 'x.weight_v' (or original1).
    for key, ref in model.state_dict().items():
        got = folded.get(key)
        if got is not None and got.shape != ref.shape:
            stem = key[: -len(".weight")]
            file_key = next((stem + s for s in (_OLD_V, _NEW_V) if stem + s in raw), key)
            raise CheckpointError(
                f"{path.name}: shape mismatch for '{file_key}': file has {tuple(got.shape)}, "
                f"model expects {tuple(ref.shape)} (is the vocoder config right for this file?)"
            )
    load_into(model, folded, source=path.name)
    model.eval()
    log.info("loaded vocoder %s (%d tensors in file, hop %d)", path.name, len(raw), cfg.hop_length)
    return model


def seeded_vocoder(cfg: VocoderConfig, seed: int) -> HiFiGANGenerator:
    """A generator with deterministic random weights (jik876 init N(0, 0.01) for ups/resblocks).

    Uses a forked RNG, so the caller's global torch random state is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = HiFiGANGenerator(cfg)
        for module in [*model.ups, *model.resblocks.modules()]:
            if isinstance(module, nn.Conv1d | nn.ConvTranspose1d):
                nn.init.normal_(module.weight, 0.0, 0.01)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Export view and copy synthesis


class _VocoderGraph(nn.Module):
    """GraphSpec contract: takes `mel`, returns the tuple `(wav,)`."""

    def __init__(self, generator: HiFiGANGenerator):
        super().__init__()
        self.generator = generator

    def forward(self, mel: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.generator(mel),)


def example_inputs(cfg: VocoderConfig, frames: int = 50, batch: int = 1) -> tuple[torch.Tensor]:
    """A (batch, num_mels, frames) float32 mel in the value range of cfg.mel (tracing only)."""
    gen = torch.Generator().manual_seed(0)
    if cfg.mel.scale == "ln":
        mel = torch.rand(batch, cfg.num_mels, frames, generator=gen) * 9.0 - 11.0  # ln 1e-5 ~ -11.5
    else:
        limit = cfg.mel.max_abs_value
        mel = torch.rand(batch, cfg.num_mels, frames, generator=gen) * 2 * limit - limit
    return (mel,)


UPSAMPLING = ("transposed", "polyphase")


def with_polyphase_upsampling(model: HiFiGANGenerator) -> HiFiGANGenerator:
    """A copy of `model` whose upsamplers are `PolyphaseUpsample` convs (the same function)."""
    poly = copy.deepcopy(model)
    for i, up in enumerate(poly.ups):
        poly.ups[i] = PolyphaseUpsample(up)
    return poly.eval()


def graph_spec(model: HiFiGANGenerator, upsampling: str = "transposed") -> GraphSpec:
    """The single exportable graph: mel (B, num_mels, T) -> wav (B, 1, hop * T). `upsampling`
    chooses the form the upsamplers take in the graph (see PolyphaseUpsample); the function and
    the checkpoint are the same either way."""
    if upsampling not in UPSAMPLING:
        raise ConfigError(f"vocoder upsampling must be one of {UPSAMPLING}, got '{upsampling}'")
    if upsampling == "polyphase":
        model = with_polyphase_upsampling(model)
    return GraphSpec(
        component="vocoder",
        name="vocoder",
        module=_VocoderGraph(model).eval(),
        input_names=("mel",),
        output_names=("wav",),
        dynamic_axes={"mel": {0: "batch", 2: "frames"}, "wav": {0: "batch", 2: "samples"}},
        example_inputs=example_inputs(model.cfg),
    )


def copy_synthesis(model: HiFiGANGenerator, wav: np.ndarray, cfg: VocoderConfig) -> np.ndarray:
    """wav (at cfg.mel.sample_rate) -> mel -> generator -> float32 wav of hop * T samples."""
    if cfg != model.cfg:
        raise ConfigError("copy_synthesis: cfg differs from the config the model was built with")
    mel = audio.mel_spectrogram(wav, cfg.mel)
    with torch.inference_mode():
        out = model(torch.from_numpy(mel).unsqueeze(0))
    return out[0, 0].numpy().astype(np.float32, copy=True)
