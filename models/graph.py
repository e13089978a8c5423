"""The unit every exporter, quantizer and backend works on: one named graph of one component."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GraphSpec:
    """A module in inference form with named tensors, as exported to ONNX and served by backends.

    `module(*inputs)` takes tensors in `input_names` order and returns a tuple in `output_names`
    order. `example_inputs` are small tensors of realistic shape and dtype, used for tracing only
    (validation always uses real speech or real text).
    """

    component: str  # "speaker_encoder" | "synthesizer" | "vocoder"
    name: str  # graph name: "speaker_encoder" | "encoder" | "decoder_step" | "postnet" | "vocoder"
    module: torch.nn.Module
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]
    example_inputs: tuple[torch.Tensor, ...]

    @property
    def artifact_stem(self) -> str:
        """File stem for this graph: `vocoder`, `speaker_encoder`, `synthesizer_decoder_step`, ..."""
        return self.name if self.name == self.component else f"{self.component}_{self.name}"
