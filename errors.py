"""The few named errors voxport raises. Each message is meant to be read by a user as one line."""


class VoxportError(Exception):
    """Base class: every error voxport raises on purpose."""


class ConfigError(VoxportError):
    """A configuration value is missing, out of range or inconsistent with the stack contract."""


class CheckpointError(VoxportError):
    """A checkpoint cannot be read, is not a weights-only file, or does not fit the model."""


class ParityError(VoxportError):
    """An artifact does not match its PyTorch original (or fails its quality gate)."""

    def __init__(self, artifact: str, failures: list[str], metrics: dict | None = None):
        self.artifact = artifact
        self.failures = list(failures)
        self.metrics = dict(metrics or {})
        super().__init__(f"{artifact}: " + "; ".join(self.failures))


class BackendUnavailable(VoxportError):
    """The backend (or the device it needs) is not available on this host; the reason says why."""


class AudioError(VoxportError):
    """Input audio is unusable: empty, silent, too short, too long, or undecodable."""


# The build (passes, gates, engines)


class CorpusError(VoxportError):
    """The corpus cannot be built (missing tool, stale apt lists) or is missing / corrupt."""


class EngineBuildError(VoxportError):
    """TensorRT could not parse or build the network; the message lists every error it gave."""


class GateError(ParityError):
    """An optimized artifact failed its quality (or speed) gate; `metrics` holds every figure."""


class StageSkipped(VoxportError):
    """A stage that cannot pay off on this host (e.g. bf16 without native bfloat16): no artifact,
    not a failure. The build logs the reason and lists it in the manifest (`skipped_stages`)."""


# Benchmarks


class RegressionError(VoxportError):
    """At least one bench row is slower than its baseline beyond the allowed ratio."""

    def __init__(self, regressions: list, max_ratio: float, baseline: str) -> None:
        self.regressions = regressions
        rows = "; ".join(r.describe() for r in regressions)
        super().__init__(f"{len(regressions)} row(s) slower than {baseline} by more than {max_ratio:.2f}x: {rows}")


class BenchError(VoxportError):
    """Some planned rows could not be measured (each named)."""


# The service


class Overloaded(VoxportError):
    """The service is at capacity; `retry_after` is the suggested wait in seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RequestTimeout(VoxportError):
    """A request ran past its time limit."""


class InvalidVoiceId(VoxportError):
    """A voice id that is not a server-made id (e.g. looks like a path)."""


class VoiceNotFound(VoxportError):
    """No voice with that id in the library."""


class VoiceQuarantined(VoiceNotFound):
    """A stored voice whose files failed verification (missing, wrong size or sha256, undecodable):
    moved aside with the evidence, answered 410 instead of being served or failing with a 500."""


class ShuttingDown(Overloaded):
    """The service is draining for shutdown: it admits no new work (503 + Retry-After)."""


class LibraryFull(VoxportError):
    """The voice alone exceeds the library's byte limit (eviction cannot make room)."""


class RequestError(ConfigError):
    """A request that cannot be served as given (422 unless `status` says otherwise)."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


class UnsupportedFormat(RequestError):
    """An output audio format this host cannot encode (the message names what is missing); never
    answered with another format instead."""


class UploadError(VoxportError):
    """An upload that cannot be accepted; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Cancelled(VoxportError):
    """Synthesis stopped on request (client gone, request timeout)."""


class ClientGone(Cancelled):
    """The client disconnected before its (non-streaming) answer was ready; the work was stopped."""


class BudgetExceeded(RequestError):
    """A request needs (or has used) more work than a `serve.limits` budget allows (413); `limit`
    names the setting. Refused whole, never truncated: a short WAV would pass for a complete one."""

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(f"{message} (serve.limits.{limit})", status=413)
        self.limit = limit


class UnsafeBind(ConfigError):
    """`voxport serve` would listen on a non-loopback address with no API key (and was not told to)."""


class ReplicaUnavailable(Overloaded):
    """A Ray Serve replica serving a component could not be reached or died while working (its node
    was lost, it is restarting): 503 + Retry-After, never a 500 with a traceback; a retry reaches a live one."""


# Packaging


class PackageError(VoxportError):
    """A deployable package (e.g. a Triton model repository) cannot be written as asked: a config that
    does not match its graph, a missing state pair, an existing non-empty output directory."""
