"""What `voxport package` takes: `key=value` settings, checked into a frozen `PackageConfig`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from voxport.errors import ConfigError

# Selection tiers per target (runtime/select.py). Triton serves no PyTorch artifact.
TARGETS = {"cpu": ("onnx",), "tensorrt": ("trt", "onnx-cuda", "onnx")}
FORMATS = ("triton",)
SETTINGS_HELP = """settings (key=value):
  format=triton          the package format (only Triton so far)
  out=DIR                the model repository to write (required); replaced only with --force / force=true
  bundle_dir=DIR         the bundle to package (default: the config's out_dir, artifacts/default)
  target=cpu|tensorrt    cpu: each graph's fastest gate-passing CPU ONNX artifact, KIND_CPU instances;
                         tensorrt: a TensorRT engine matching this host's GPU (model.plan), else ONNX on
                         CUDA, else the CPU choice; KIND_GPU instances (the reason is in MODEL_CARD.md)
  max_batch_size=8       dynamic batching limit of the batchable graphs (speaker encoder, postnet, vocoder)
  instances=1            instances per model (the decoder step serves one sequence per instance)
  queue_delay_us=500     dynamic batcher's max queue delay
  sequence_idle_us=5000000  a decoder sequence idle this long is freed
  max_text_chars=500     longest TEXT voxport_tts accepts

The repository is validated before it is moved into place: every config.pbtxt parsed with the schema
tritonclient ships (when installed) and checked against its ONNX graph (names, types, ranks, state pairs).
Example: voxport package format=triton out=triton_repo && docker run ... (README, Triton)."""


def parse_settings(items: list[str]) -> dict[str, str]:
    """`key=value` arguments as a dict; anything else is a ConfigError naming it."""
    settings = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"expected key=value, got '{item}' (voxport package --help)")
        settings[key] = value
    return settings


@dataclass(frozen=True)
class PackageConfig:
    """What `voxport package` writes. `max_batch_size` applies to the graphs Triton can batch
    (speaker encoder, postnet, vocoder); `instances` is each model's instance count (the decoder
    step serves one sequence per instance at a time)."""

    out: Path
    bundle_dir: Path
    format: str = "triton"
    target: str = "cpu"
    force: bool = False
    max_batch_size: int = 8
    instances: int = 1
    queue_delay_us: int = 500
    sequence_idle_us: int = 5_000_000
    max_text_chars: int = 500  # as serve.limits.max_text_chars

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "bundle_dir", Path(self.bundle_dir))
        if self.format not in FORMATS:
            raise ConfigError(f"package format must be one of {', '.join(FORMATS)}, got '{self.format}'")
        if self.target not in TARGETS:
            raise ConfigError(f"package target must be one of {', '.join(TARGETS)}, got '{self.target}'")
        for name in ("max_batch_size", "instances", "queue_delay_us", "sequence_idle_us", "max_text_chars"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"package {name} must be an integer >= 1, got {value!r}")

    @classmethod
    def from_settings(cls, settings: Mapping[str, str], default_bundle: Path) -> PackageConfig:
        """From `key=value` command-line settings (strings); unknown keys are a ConfigError naming them."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in settings.items():
            key = key.replace("-", "_")
            if key not in known:
                raise ConfigError(f"unknown package setting '{key}' (known: {', '.join(known)})")
            if key == "force":
                if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ConfigError(f"force must be true or false, got '{raw}'")
                values[key] = raw.lower() in ("true", "1", "yes")
            elif known[key].type == "int":
                try:
                    values[key] = int(raw)
                except ValueError:
                    raise ConfigError(f"package {key} must be an integer, got '{raw}'") from None
            else:
                values[key] = raw
        if "out" not in values:
            raise ConfigError("package needs out=DIR (the model repository to write)")
        values.setdefault("bundle_dir", default_bundle)
        return cls(**values)

    @property
    def kind(self) -> str:
        return "KIND_GPU" if self.target == "tensorrt" else "KIND_CPU"

