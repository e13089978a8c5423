"""The backend interface: load(record), infer(feeds) -> outputs, providers, close().

Feeds and outputs are dicts of numpy arrays keyed by tensor name, the same names in every
engine, so a caller never knows (or cares) which engine runs a graph, and a comparison between
engines is a dict comparison.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from voxport.errors import BackendUnavailable
from voxport.models.checkpoint import sha256_file
from voxport.pipeline.records import Record

# What every engine's `infer` is, and what the build hands around to judge and time artifacts:
# numpy feeds keyed by input name in, numpy outputs keyed by output name out.
Runner = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]


class Backend(abc.ABC):
    name: str = "base"

    @abc.abstractmethod
    def load(self, record: Record, bundle_dir: Path) -> None:
        """Load the artifact; raise BackendUnavailable (with the reason) if this host cannot."""

    @abc.abstractmethod
    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once. Feeds keyed by input name; returns outputs keyed by output name."""

    @property
    @abc.abstractmethod
    def providers(self) -> list[str]:
        """What is really executing (e.g. ['CPUExecutionProvider']), read back from the engine."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release engine resources; the backend cannot be used afterwards."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def verified_artifact(record: Record, bundle_dir: Path) -> Path:
    """The artifact's path, after checking it exists and its sha256 matches the record."""
    path = Path(bundle_dir) / record.file
    if not path.is_file():
        raise BackendUnavailable(f"{record.file}: artifact file is missing from {bundle_dir}")
    actual = sha256_file(path)
    if actual != record.sha256:
        raise BackendUnavailable(
            f"{record.file}: sha256 {actual[:12]}… does not match its record ({record.sha256[:12]}…);"
            " the file was changed or replaced after it was validated"
        )
    return path
