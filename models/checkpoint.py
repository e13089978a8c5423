"""One loader for every checkpoint format users already have.

Formats: RTVC / MockingBird / Resemblyzer `{'model_state': ...}`, MockingBird synthesizer
`{'model': ...}`, jik876 / MockingBird HiFi-GAN `{'generator': ...}`, and a bare state_dict.
Every file is read with `weights_only=True`: a checkpoint is untrusted input, and a pickle that
would run code is refused with a clear error instead of being executed.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from voxport.errors import CheckpointError

if TYPE_CHECKING:  # torch is imported where a checkpoint is read: `sha256_file` serves torch-free code too
    import torch

log = logging.getLogger(__name__)

# Keys under which known training scripts nest the model weights, in the order we look for them.
_NESTING_KEYS = ("model_state", "model", "generator", "state_dict")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file and return its flat state_dict (tensors only, on CPU)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        # Weights in the wild were often saved on CUDA; map_location keeps CPU-only hosts working.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path.name}: refused by weights_only loading (the file contains code or objects, "
            f"not only tensors): {first}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path.name}: not a readable PyTorch checkpoint: {first}") from None
    return _unnest(obj, path.name)


def _unnest(obj: object, name: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in _NESTING_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and _is_state_dict(inner):
                return dict(inner)
        if obj and _is_state_dict(obj):
            return dict(obj)
    found = sorted(obj.keys())[:8] if isinstance(obj, Mapping) else type(obj).__name__
    raise CheckpointError(
        f"{name}: no state_dict found (looked for a bare state_dict or one under "
        f"{', '.join(repr(k) for k in _NESTING_KEYS)}; top level holds {found})"
    )


def _is_state_dict(mapping: Mapping) -> bool:
    import torch

    return all(isinstance(k, str) for k in mapping) and all(
        isinstance(v, torch.Tensor) for v in mapping.values()
    )


def load_into(
    module: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    source: str = "checkpoint",
    ignore: Iterable[str] = (),
) -> None:
    """Copy `state_dict` into `module` strictly, naming the first missing or mismatched key.

    `ignore` lists keys the file may carry that the inference model does not use (e.g. the GE2E
    training scalars `similarity_weight`, `similarity_bias`).
    """
    ignored = set(ignore)
    expected = module.state_dict()
    given = {k: v for k, v in state_dict.items() if k not in ignored}
    for key, ref in expected.items():
        if key not in given:
            raise CheckpointError(f"{source}: missing key '{key}' (expected shape {tuple(ref.shape)})")
        if tuple(given[key].shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{source}: shape mismatch for '{key}': file has {tuple(given[key].shape)}, "
                f"model expects {tuple(ref.shape)}"
            )
    unexpected = [k for k in given if k not in expected]
    if unexpected:
        raise CheckpointError(
            f"{source}: unexpected key '{unexpected[0]}' ({len(unexpected)} unexpected in all); "
            "is this checkpoint for a different model or variant?"
        )
    module.load_state_dict(dict(given), strict=True)
