"""Reference synthesis in PyTorch: the runtime's host loop over the Tacotron graph modules.

`generate` is what golden checks and parity comparisons hold artifacts to. It runs the very same
`runtime.synthesizer_loop.run_host_loop` as the served artifacts, with the three graph modules
wrapped as numpy-dict callables (`module_runner`), so only the backend differs.
"""

from __future__ import annotations

import numpy as np
import torch

from voxport.models.graph import GraphSpec
from voxport.models.prenet_masks import MaskSource
from voxport.models.synthesizer import SynthesizerConfig, Tacotron
from voxport.models.synthesizer_graphs import (
    DECODER_INPUTS,
    DECODER_OUTPUTS,
    ENCODER_INPUTS,
    ENCODER_OUTPUTS,
    POSTNET_INPUTS,
    POSTNET_OUTPUTS,
    DecoderStepGraph,
    EncoderGraph,
    PostnetGraph,
)
from voxport.runtime.synthesizer_loop import Runner, SynthesisResult, run_host_loop


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
             style_idx: int | np.ndarray, masks: torch.Generator | MaskSource, cfg: SynthesizerConfig,
             max_decoder_steps: int | None = None, stop_on_token: bool = True) -> SynthesisResult:
    """Reference synthesis in PyTorch: `run_host_loop` over this model's three graph modules.

    `masks`: a MaskSource, or a torch.Generator (drawn as `TorchMasks`, MockingBird's draws)."""
    model.eval()
    encoder = module_runner(EncoderGraph(model), ENCODER_INPUTS, ENCODER_OUTPUTS)
    decoder = module_runner(DecoderStepGraph(model), DECODER_INPUTS, DECODER_OUTPUTS)
    postnet = module_runner(PostnetGraph(model), POSTNET_INPUTS, POSTNET_OUTPUTS)
    chars_np, speaker_np = (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x
                            for x in (chars, speaker_embedding))
    return run_host_loop(encoder, decoder, postnet, chars_np, speaker_np, style_idx, masks, cfg,
                         max_decoder_steps=max_decoder_steps, stop_on_token=stop_on_token)
