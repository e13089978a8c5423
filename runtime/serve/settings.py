"""Service settings: the `serve:` node of conf/config.yaml as a validated dataclass, plus the `target:`
node that picks the artifacts (the same preference and strictness every selecting command uses)."""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from voxport.errors import ConfigError
from voxport.pipeline.schema import build
from voxport.runtime.backends.onnxruntime import CPU_ARENA_POLICIES
from voxport.runtime.select import TargetConfig
from voxport.runtime.streaming import StreamConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    max_upload_bytes: int = 10 * 1024 * 1024  # a larger request body or file gets 413
    max_clip_seconds: float = 30.0  # longest reference clip accepted (before VAD trimming)
    max_text_chars: int = 500
    max_batch_texts: int = 16
    max_decoder_steps: int = 1000  # cap on the per-request max_decoder_steps (it bounds one text fragment)
    # The work one request may do, summed over its fragments and batch items (runtime/budget.py): 413 beyond.
    max_request_decoder_steps: int = 3000  # about 70 s of audio at r=2, hop 256, 22.05 kHz
    max_request_audio_seconds: float = 60.0
    max_voices: int = 100  # voice library: count and bytes, least-recently-used evicted beyond
    max_library_bytes: int = 256 * 1024 * 1024
    # An upload's header (read before decoding) declaring more than these gets 413/422: a few kB of
    # compressed silence can declare gigabytes of decoded samples.
    max_sample_rate: int = 192_000
    max_channels: int = 8
    max_decoded_samples: int = 2_880_000  # frames x channels: 30 s of 48 kHz stereo


ENGINES = ("local", "ray")
DEPLOYMENTS = ("ingress", "speaker_encoder", "synthesizer", "vocoder")


@dataclass(frozen=True)
class Autoscaling:
    """Serve's autoscaling for one deployment (replaces `num_replicas` when given)."""

    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 2.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ConfigError(f"autoscaling needs 0 <= min_replicas <= max_replicas and max_replicas >= 1, "
                              f"got {self.min_replicas}..{self.max_replicas}")
        if self.target_ongoing_requests <= 0:
            raise ConfigError(f"autoscaling.target_ongoing_requests must be > 0, got {self.target_ongoing_requests}")


@dataclass(frozen=True)
class DeploymentSettings:
    """One Ray Serve deployment: replicas (or autoscaling) and what each replica reserves."""

    num_replicas: int = 1
    autoscaling: Autoscaling | None = None  # given: Serve scales between its bounds (num_replicas unused)
    num_cpus: float = 0.5  # per replica, reserved in Ray's scheduler (threads it really uses: serve.threads)
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources a node must offer
    max_replicas_per_node: int | None = None  # 1: spread the replicas over the nodes
    max_ongoing_requests: int = 16  # per replica, before Serve queues at the caller

    def __post_init__(self) -> None:
        if isinstance(self.autoscaling, Mapping):
            object.__setattr__(self, "autoscaling", build(Autoscaling, self.autoscaling, "autoscaling"))
        object.__setattr__(self, "resources", {str(k): float(v) for k, v in dict(self.resources or {}).items()})
        if self.num_replicas < 1:
            raise ConfigError(f"num_replicas must be >= 1, got {self.num_replicas}")
        if self.num_cpus < 0 or self.num_gpus < 0 or any(v < 0 for v in self.resources.values()):
            raise ConfigError("num_cpus, num_gpus and resources must be >= 0")
        if self.max_replicas_per_node is not None and self.max_replicas_per_node < 1:
            raise ConfigError(f"max_replicas_per_node must be >= 1 or null, got {self.max_replicas_per_node}")
        if self.max_ongoing_requests < 1:
            raise ConfigError(f"max_ongoing_requests must be >= 1, got {self.max_ongoing_requests}")

    def replicas(self) -> dict[str, Any]:
        """Serve's `num_replicas` or `autoscaling_config` option."""
        if self.autoscaling is None:
            return {"num_replicas": self.num_replicas}
        return {"autoscaling_config": dataclasses.asdict(self.autoscaling)}


@dataclass(frozen=True)
class BatchedDeploymentSettings(DeploymentSettings):
    """A deployment batching its requests with Serve's `@serve.batch` (speaker encoder, vocoder)."""

    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.01  # how long a batch waits for more requests once one is there

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_batch_size < 1 or self.batch_wait_timeout_s < 0:
            raise ConfigError(f"max_batch_size must be >= 1 and batch_wait_timeout_s >= 0, got "
                              f"{self.max_batch_size}, {self.batch_wait_timeout_s}")


@dataclass(frozen=True)
class RaySettings:
    """`serve.ray`: where the cluster is and how each deployment runs on it (runtime/serve/ray/)."""

    address: str | None = None  # None: start a local cluster; "auto", "ray://host:10001", ...: join that one
    num_cpus: int | None = None  # CPUs of a local cluster (None: Ray counts this host's)
    namespace: str = "voxport"  # where the library and registry actors' names live
    app_name: str = "voxport"
    synthesizer_progress_steps: int = 8  # decoder steps per progress report: stop flag and budget latency
    ingress: DeploymentSettings = field(default_factory=DeploymentSettings)
    speaker_encoder: BatchedDeploymentSettings = field(default_factory=BatchedDeploymentSettings)
    synthesizer: DeploymentSettings = field(default_factory=DeploymentSettings)
    vocoder: BatchedDeploymentSettings = field(default_factory=BatchedDeploymentSettings)

    def __post_init__(self) -> None:
        if self.address is not None and not str(self.address).strip():
            raise ConfigError("serve.ray.address must be null (start a local cluster) or an address such as auto")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ConfigError(f"serve.ray.num_cpus must be >= 1 or null, got {self.num_cpus}")
        if self.address is not None and self.num_cpus is not None:
            raise ConfigError("serve.ray.num_cpus sizes a local cluster; it cannot be set with serve.ray.address")
        if self.synthesizer_progress_steps < 1:
            raise ConfigError(f"serve.ray.synthesizer_progress_steps must be >= 1, got "
                              f"{self.synthesizer_progress_steps}")

    @classmethod
    def from_cfg(cls, node: Any) -> RaySettings:
        if node is not None and not isinstance(node, Mapping):
            raise ConfigError("serve.ray must be a mapping of settings")
        data = dict(node or {})
        kinds = {f.name: f.default_factory for f in dataclasses.fields(cls) if f.name in DEPLOYMENTS}
        for name, kind in kinds.items():
            value = data.get(name) or {}
            if not isinstance(value, Mapping):
                raise ConfigError(f"serve.ray.{name} must be a mapping of settings")
            value = dict(value)
            if isinstance(value.get("autoscaling"), Mapping):  # typos named with their full key
                value["autoscaling"] = build(Autoscaling, value["autoscaling"], f"serve.ray.{name}.autoscaling")
            try:
                data[name] = build(kind, value, f"serve.ray.{name}")  # type: ignore[arg-type]
            except ConfigError as exc:
                text = str(exc)
                raise ConfigError(text if text.startswith("serve.ray.") else f"serve.ray.{name}: {text}") from None
        return build(cls, data, "serve.ray")


@dataclass(frozen=True)
class ServeSettings:
    bundle_dir: Path
    voices_dir: Path
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 2  # inference threads
    threads: int = 1  # intra-op threads per ONNX Runtime session (per request on OpenVINO)
    cpu_arena: str = "keep"  # ONNX Runtime CPU memory arena: keep | shrink (after every run) | disabled
    queue_size: int = 4  # admitted requests beyond the busy workers; more get 503 + Retry-After
    request_timeout_s: float = 120.0
    vocoder_max_batch: int = 8
    vocoder_window_ms: float = 10.0  # how long the vocoder waits for more work to batch
    # Whole-utterance mels are vocoded in chunks of this many frames (+ stream.vocoder_context on each
    # side): bounded memory per call, cancellable between chunks, and a short request waits one chunk.
    vocoder_chunk_frames: int = 128
    # Before the first request, run once each vocoder input length a request starts with (a short stream,
    # a whole-utterance chunk): engines prepare per-shape work on a shape's first call (OpenVINO ~70 ms).
    warm_up: bool = True
    default_max_decoder_steps: int | None = None  # None: the bundle's synthesizer setting
    limits: Limits = field(default_factory=Limits)
    stream: StreamConfig = field(default_factory=StreamConfig)
    # Access control (runtime/serve/access.py). Keys come from VOXPORT_API_KEYS and/or this file.
    api_keys_file: str | None = None  # one key per line; blank lines and `#` comments ignored
    allow_unauthenticated_public: bool = False  # serve a non-loopback host with no API key anyway
    trusted_hosts: tuple[str, ...] = ()  # Host header names accepted; empty: loopback names + `host`
    allowed_origins: tuple[str, ...] = ()  # browser origins allowed (CORS on for them); others get 403
    engine: str = "local"  # local: this process; ray: a Ray Serve application (runtime/serve/ray/)
    ray: RaySettings = field(default_factory=RaySettings)
    # Not a `serve` key: the composed `target` node (preference, strict), passed to from_cfg.
    target: TargetConfig = field(default_factory=TargetConfig, metadata={"node": "target"})

    def __post_init__(self) -> None:
        if self.workers < 1 or self.queue_size < 0 or self.threads < 0:
            raise ConfigError("serve needs workers >= 1, queue_size >= 0 and threads >= 0")
        if self.request_timeout_s <= 0 or self.vocoder_max_batch < 1 or self.vocoder_window_ms < 0:
            raise ConfigError("serve needs request_timeout_s > 0, vocoder_max_batch >= 1, vocoder_window_ms >= 0")
        if self.cpu_arena not in CPU_ARENA_POLICIES:
            raise ConfigError(f"serve.cpu_arena must be one of {', '.join(CPU_ARENA_POLICIES)}, got {self.cpu_arena!r}")
        if self.vocoder_chunk_frames < 1:
            raise ConfigError(f"serve.vocoder_chunk_frames must be >= 1, got {self.vocoder_chunk_frames}")
        if self.limits.max_request_decoder_steps < 1 or self.limits.max_request_audio_seconds <= 0:
            raise ConfigError("serve.limits needs max_request_decoder_steps >= 1 and max_request_audio_seconds > 0")
        if self.engine not in ENGINES:
            raise ConfigError(f"serve.engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"serve.port must be in 0..65535, got {self.port}")
        # From YAML these are lists; tuples keep the settings hashable and immutable.
        object.__setattr__(self, "trusted_hosts", tuple(str(h) for h in self.trusted_hosts or ()))
        object.__setattr__(self, "allowed_origins", tuple(str(o) for o in self.allowed_origins or ()))
        if "*" in self.allowed_origins:
            raise ConfigError("serve.allowed_origins: list the origins; `*` would let any web page use the service")

    @property
    def capacity(self) -> int:
        """Requests admitted at once (running + waiting); one more gets 503."""
        return self.workers + self.queue_size

    @property
    def loopback(self) -> bool:
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return self.host == "localhost"

    @property
    def hosts(self) -> tuple[str, ...]:
        """Host header names accepted: `trusted_hosts`, or the loopback names and the bound host."""
        return self.trusted_hosts or ("127.0.0.1", "localhost", "::1", self.host)

    @classmethod
    def from_cfg(cls, node: Any, target: Any = None) -> ServeSettings:
        """From the composed Hydra `serve` node (or any mapping with the same keys) and `target` node."""
        from omegaconf import DictConfig, OmegaConf

        data: dict[str, Any] = dict(OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig)
                                    else node)
        for key in ("bundle_dir", "voices_dir"):
            if data.get(key) in (None, "", "???"):
                raise ConfigError(f"serve.{key} is required")
            data[key] = Path(data[key])
        if "target" in data:
            raise ConfigError("serve: unknown setting(s) target (artifact selection is the top-level `target`)")
        data["target"] = TargetConfig.from_cfg(target if target is not None else {})
        data["ray"] = RaySettings.from_cfg(data.get("ray"))
        nested = {"limits": Limits, "stream": StreamConfig}
        for key, kind in nested.items():
            data[key] = _build(kind, data.get(key) or {}, f"serve.{key}")
        return _build(cls, data, "serve")


def _build(kind: type, data: dict[str, Any], where: str) -> Any:
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return kind(**data)
