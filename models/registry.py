"""Rebuild inference-form modules from a record's model description and a torch artifact.

A torch artifact is the inference-form state_dict (weight norm folded, buffers included) saved
with `torch.save`; the record's `model` field says which network and config it belongs to, so
the file alone never has to be trusted to describe itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from voxport.errors import ConfigError
from voxport.models.checkpoint import load_into, load_state_dict
from voxport.models.graph import GraphSpec


def describe(network: str, config: Any) -> dict[str, Any]:
    """The `model` field of a record: network family and its config as plain data."""
    return {"network": network, "config": config.to_dict()}


def build_module(model: dict[str, Any]) -> torch.nn.Module:
    """An untrained module of the described network (weights to be loaded)."""
    network, cfg = model["network"], model["config"]
    if network == "hifigan":
        from voxport.models.vocoder import HiFiGANGenerator, VocoderConfig

        return HiFiGANGenerator(VocoderConfig.from_dict(cfg))
    if network == "ge2e":
        from voxport.models.speaker_encoder import SpeakerEncoder, SpeakerEncoderConfig

        return SpeakerEncoder(SpeakerEncoderConfig.from_dict(cfg))
    if network == "tacotron":
        from voxport.models.synthesizer import SynthesizerConfig, Tacotron

        return Tacotron(SynthesizerConfig.from_dict(cfg))
    raise ConfigError(f"unknown network '{network}' in record")


def graph_specs(module: torch.nn.Module, model: dict[str, Any]) -> dict[str, GraphSpec]:
    """Every exportable graph of a module, by graph name."""
    network = model["network"]
    if network == "hifigan":
        from voxport.models.vocoder import graph_spec

        # An export may have rewritten layers into an equivalent form (record `graph_form`).
        specs = [graph_spec(module, **model.get("graph_form", {}))]
    elif network == "ge2e":
        from voxport.models.speaker_encoder import graph_spec

        specs = [graph_spec(module)]
    elif network == "tacotron":
        from voxport.models.synthesizer import SynthesizerConfig
        from voxport.models.synthesizer_graphs import graph_specs as tacotron_specs

        specs = list(tacotron_specs(module, SynthesizerConfig.from_dict(model["config"])))
    else:
        raise ConfigError(f"unknown network '{network}' in record")
    return {s.name: s for s in specs}


def save_torch_artifact(module: torch.nn.Module, path: Path) -> Path:
    """Save the inference-form state_dict (tensors only, loadable with weights_only=True)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    state = {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}
    torch.save(state, tmp)
    tmp.replace(path)
    return path


def load_torch_artifact(path: Path, model: dict[str, Any]) -> torch.nn.Module:
    module = build_module(model)
    load_into(module, load_state_dict(path), source=Path(path).name)
    if model.get("dynamic_int8"):
        # A PyTorch dynamic INT8 artifact is FP32 weights + the recipe of layers to quantize
        # (quantized modules do not load with weights_only=True; see quantize/torch_dynamic.py).
        from voxport.quantize.torch_dynamic import apply_recipe

        return apply_recipe(module.eval(), model["dynamic_int8"])
    if model.get("dtype") == "bfloat16":
        from voxport.quantize.bf16 import to_bf16

        return to_bf16(module)
    return module.eval()
