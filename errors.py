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
