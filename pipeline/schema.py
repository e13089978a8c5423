"""Typed config sections: a composed Hydra node (or a plain mapping) -> a frozen dataclass.

Each section of conf/ is read through one dataclass in the code that uses it, so a key no field
takes (a typo, or a setting nothing reads any more) is a one-line ConfigError instead of being
silently ignored; tests/test_config.py holds every composed config group against these schemas.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from voxport.errors import ConfigError

T = TypeVar("T")


def to_data(node: Any, where: str) -> dict[str, Any]:
    """A resolved plain dict of a config node; a `???` value is an error naming its key."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    if isinstance(node, DictConfig):
        try:
            return dict(OmegaConf.to_container(node, resolve=True, throw_on_missing=True))
        except MissingMandatoryValue as exc:
            raise ConfigError(f"required config value missing: {exc.full_key} (give it as an override)") from None
    if not isinstance(node, Mapping):
        raise ConfigError(f"{where}: expected a mapping of settings, got {type(node).__name__}")
    return dict(node)


def _frozen(value: Any) -> Any:
    # Lists become tuples (frozen dataclasses, hashable preference orders); mappings stay mappings.
    if isinstance(value, list | tuple):
        return tuple(_frozen(v) for v in value)
    return value


def build(kind: type[T], node: Any, where: str) -> T:
    """`kind(**node)`, recursing into dataclass-typed fields; unknown keys are a ConfigError."""
    if isinstance(node, kind):
        return node
    data = to_data(node, where)
    known = {f.name: f for f in dataclasses.fields(kind)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    hints = typing.get_type_hints(kind)
    for name, value in data.items():
        sub = hints.get(name)
        if dataclasses.is_dataclass(sub) and isinstance(value, Mapping):
            data[name] = build(sub, value, f"{where}.{name}")
        else:
            data[name] = _frozen(value)
    return kind(**data)


@dataclass(frozen=True)
class RunConfig:
    """The top-level scalars of conf/config.yaml (the sections have their own schemas)."""

    out_dir: str  # the bundle `voxport build` writes and every other command reads by default
    corpus_dir: str | None = None  # None: $VOXPORT_CORPUS or <repo>/.voxport/corpus
    seed: int = 1234
    compare: str | None = None  # `voxport bench`: baseline JSON to fail regressions against
    cache_dir: str | None = None  # the stage cache (pipeline/cache.py); None: no cache

    @classmethod
    def from_cfg(cls, cfg: Any) -> RunConfig:
        """From the whole composed config: its top-level scalars that are fields here."""
        # Key by key: resolving the whole config would trip over `???` values of other sections.
        names = [f.name for f in dataclasses.fields(cls)]
        return build(cls, {k: cfg[k] for k in names if k in cfg}, "config")
