"""PyTorch backend: runs a torch artifact's graph module on numpy feeds (CPU)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from voxport.errors import BackendUnavailable
from voxport.models import registry
from voxport.pipeline.records import Record
from voxport.runtime.backends.base import Backend, verified_artifact


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, graph: str | None = None) -> None:
        self._graph = graph
        self._spec = None

    def load(self, record: Record, bundle_dir: Path) -> None:
        path = verified_artifact(record, bundle_dir)
        module = registry.load_torch_artifact(path, record.model)
        specs = registry.graph_specs(module, record.model)
        name = self._graph or record.graph
        if name not in specs:
            raise BackendUnavailable(f"{record.file}: no graph '{name}' (has {sorted(specs)})")
        self._spec = specs[name]

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._spec is None:
            raise BackendUnavailable("torch backend used before load() or after close()")
        spec = self._spec
        args = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in spec.input_names]
        with torch.inference_mode():
            outs = spec.module(*args)
        return {n: o.detach().float().numpy() if o.is_floating_point() else o.numpy()
                for n, o in zip(spec.output_names, outs, strict=True)}

    @property
    def providers(self) -> list[str]:
        return [f"torch-cpu ({torch.get_num_threads()} threads)"] if self._spec is not None else []

    def close(self) -> None:
        self._spec = None
