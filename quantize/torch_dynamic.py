"""PyTorch dynamic INT8 (`torch.ao.quantization.quantize_dynamic`) as a reproducible recipe.

A dynamically quantized PyTorch module cannot be saved in a form `torch.load(weights_only=True)`
accepts (its packed weights are script objects), so the torch artifact is the FP32
inference-form state dict and the record's `model.dynamic_int8` recipe names the layers to
quantize; `models/registry.load_torch_artifact` applies it at load. Dynamic quantization of
weights is deterministic (per-tensor min/max of each weight), so the loaded module is exactly
the one the stage validated.

A multi-layer `nn.LSTM` is one PyTorch module, so its layers could only be quantized together;
the GE2E encoder needs its first layer float (its raw power-mel input sits below one INT8 step).
`SplitLSTM` runs the same weights as one single-layer LSTM per layer.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from voxport.errors import ConfigError

log = logging.getLogger(__name__)

QUANTIZABLE = (nn.Linear, nn.LSTM, nn.LSTMCell, nn.GRUCell, nn.GRU)


class SplitLSTM(nn.Module):
    """A unidirectional multi-layer `nn.LSTM` as single-layer LSTMs sharing its weights (copied)."""

    def __init__(self, lstm: nn.LSTM) -> None:
        super().__init__()
        if lstm.bidirectional or lstm.proj_size:
            raise ConfigError("SplitLSTM supports unidirectional LSTMs without projection only")
        self.batch_first = lstm.batch_first
        self.layers = nn.ModuleList()
        for i in range(lstm.num_layers):
            layer = nn.LSTM(lstm.input_size if i == 0 else lstm.hidden_size, lstm.hidden_size, 1,
                            bias=lstm.bias, batch_first=lstm.batch_first)
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                if hasattr(lstm, f"{name}_l{i}"):
                    getattr(layer, f"{name}_l0").data.copy_(getattr(lstm, f"{name}_l{i}").data)
            self.layers.append(layer)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        hs, cs = [], []
        for layer in self.layers:
            x, (h, c) = layer(x)
            hs.append(h)
            cs.append(c)
        return x, (torch.cat(hs), torch.cat(cs))


def split_lstms(module: nn.Module) -> nn.Module:
    """Replace every multi-layer nn.LSTM of `module` (in place) by a SplitLSTM."""
    for name, child in list(module.named_modules()):
        if isinstance(child, nn.LSTM) and child.num_layers > 1:
            parent_name, _, attr = name.rpartition(".")
            setattr(module.get_submodule(parent_name) if parent_name else module, attr, SplitLSTM(child))
    return module


def candidates(module: nn.Module, scope: str = "") -> list[str]:
    """Quantizable layers (after splitting LSTMs) under `scope` ('' = the whole module)."""
    root = module.get_submodule(scope) if scope else module
    prefix = f"{scope}." if scope else ""
    return [prefix + name for name, m in root.named_modules()
            if name and isinstance(m, QUANTIZABLE) and not isinstance(m, SplitLSTM)]


def recipe(layers: Sequence[str], split: bool) -> dict[str, Any]:
    return {"engine": "torch", "dtype": "qint8", "split_lstm": split, "layers": sorted(layers)}


def apply_recipe(module: nn.Module, spec: Mapping[str, Any]) -> nn.Module:
    """The module with `spec['layers']` dynamically quantized (a new module; the input is kept)."""
    import copy

    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    if spec.get("engine") != "torch" or spec.get("dtype") != "qint8":
        raise ConfigError(f"unknown dynamic INT8 recipe {dict(spec)}")
    module = copy.deepcopy(module).eval()
    if spec.get("split_lstm"):
        split_lstms(module)
    names = dict(module.named_modules())
    missing = [name for name in spec["layers"] if name not in names]
    if missing:
        raise ConfigError(f"dynamic INT8 recipe names layers this module lacks: {', '.join(missing)}")
    qconfig = {name: default_dynamic_qconfig for name in spec["layers"]}
    return quantize_dynamic(module, qconfig_spec=qconfig, dtype=torch.qint8, inplace=False)


def count_quantized(module: nn.Module) -> dict[str, int]:
    """Dynamically quantized PyTorch modules by class name (the structure check)."""
    import torch.ao.nn.quantized.dynamic as nnqd

    layers = (nnqd.Linear, nnqd.LSTM, nnqd.GRU, nnqd.LSTMCell, nnqd.GRUCell)
    counts: dict[str, int] = {}
    for m in module.modules():
        if isinstance(m, layers):
            name = f"DynamicQuantized{type(m).__name__}"
            counts[name] = counts.get(name, 0) + 1
    return counts


def module_macs(module: nn.Module, names: Sequence[str], steps: int = 1) -> dict[str, float]:
    """Relative compute of each layer: weight elements, times `steps` for sequence LSTMs / GRUs."""
    out = {}
    for name in names:
        layer = module.get_submodule(name)
        size = float(sum(p.numel() for n, p in layer.named_parameters() if n.startswith("weight")))
        out[name] = size * (steps if isinstance(layer, (nn.LSTM, nn.GRU)) else 1)
    return out



def has_multilayer_lstm(module: nn.Module) -> bool:
    """Whether `module` holds a multi-layer nn.LSTM (whose layers `split_lstms` separates)."""
    return any(isinstance(m, nn.LSTM) and m.num_layers > 1 for m in module.modules())
