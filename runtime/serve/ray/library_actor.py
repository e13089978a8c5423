"""The voice library's one owner on a cluster: a named Ray actor holding the existing VoiceLibrary
(SQLite index + files) on the node whose disk keeps it, and the proxy ingress replicas use.

An actor runs one method at a time, so every write (add, delete, touch, quarantine) is serialized
by the actor itself: several ingress replicas adding at once lose and duplicate nothing, and
VoiceLibrary's own file lock keeps a second owner (another server on the same directory) out.
Errors (VoiceNotFound, VoiceQuarantined, LibraryFull, InvalidVoiceId) reach the caller as raised.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import ray

from voxport.errors import VoxportError
from voxport.runtime.serve.library import Voice, VoiceLibrary
from voxport.runtime.serve.ray.proxy import unwrap

log = logging.getLogger(__name__)


class LibraryActor:
    """Ray actor class (created by the launcher with a name, on the launcher's node)."""

    def __init__(self, root: str, max_voices: int, max_bytes: int) -> None:
        self.library = VoiceLibrary(root, max_voices, max_bytes)

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        if method.startswith("_") or method not in LIBRARY_METHODS:
            raise VoxportError(f"the voice library has no method {method!r}")
        return getattr(self.library, method)(*args, **kwargs)

    def reference_bytes(self, voice_id: str) -> bytes:
        return self.library.reference_path(voice_id).read_bytes()

    def where(self) -> dict[str, Any]:
        return {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address(),
                "root": str(self.library.root)}

    def close(self) -> None:
        self.library.close()


LIBRARY_METHODS = ("stats", "list", "get", "embedding", "quarantined", "add", "touch", "delete")


class StoredReference:
    """What `VoiceLibrary.reference_path` gives the routes (they call `read_bytes()`), for a file on the
    library actor's node: its bytes, fetched through the actor."""

    def __init__(self, data: bytes, voice_id: str) -> None:
        self._data, self.name = data, f"{voice_id}/reference.wav"

    def read_bytes(self) -> bytes:
        return self._data

    def is_file(self) -> bool:
        return True


class RemoteLibrary:
    """VoiceLibrary's interface (as runtime/serve/ uses it) over the named library actor."""

    def __init__(self, name: str, namespace: str, timeout_s: float = 30.0) -> None:
        self.name, self.namespace, self.timeout_s = name, namespace, timeout_s
        self._actor: Any = None

    @property
    def actor(self) -> Any:
        if self._actor is None:
            self._actor = ray.get_actor(self.name, namespace=self.namespace)
        return self._actor

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return unwrap(lambda: ray.get(self.actor.call.remote(method, *args, **kwargs), timeout=self.timeout_s),
                      "voice library")

    def stats(self) -> tuple[int, int]:
        return self._call("stats")

    def list(self) -> list[Voice]:
        return self._call("list")

    def get(self, voice_id: str) -> Voice:
        return self._call("get", voice_id)

    def embedding(self, voice_id: str) -> np.ndarray:
        return self._call("embedding", voice_id)

    def quarantined(self) -> list[dict[str, Any]]:
        return self._call("quarantined")

    def add(self, wav_bytes: bytes, embedding: np.ndarray, **meta: Any) -> tuple[Voice, list[str]]:
        return self._call("add", wav_bytes, embedding, **meta)

    def touch(self, voice_id: str) -> None:
        self.actor.call.remote("touch", voice_id)  # bookkeeping after a request: not waited for

    def delete(self, voice_id: str) -> Voice:
        return self._call("delete", voice_id)

    def reference_path(self, voice_id: str) -> StoredReference | Path:
        data = unwrap(lambda: ray.get(self.actor.reference_bytes.remote(voice_id), timeout=self.timeout_s),
                      "voice library")
        return StoredReference(data, voice_id)

    def close(self) -> None:
        """Nothing to release here: the launcher owns (and stops) the actor."""
