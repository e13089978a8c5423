"""The voice library: stored references (normalized WAV), their embeddings and metadata.

Layout under `root`: `index.sqlite3` (the index, and the commit point of every change),
`voices/<id>/{reference.wav, embedding.npy, meta.json}`, `tmp/` (staging). A voice is written in
full under tmp/, fsynced and renamed into voices/ before its index row is committed; a delete
commits the index first and then removes the directory. On start, directories without an index
row (a crash before the commit) are removed, so the index and the disk agree and a restart loses
nothing that was ever acknowledged. Then every indexed voice is verified (its files exist, their
size and the embedding's sha256 are the index's, both decode): a voice that fails is quarantined,
i.e. moved to `quarantine/<id>/` with a `reason.json` (the evidence is kept, for a person to look
at), dropped from the index and recorded, so requests for it get a clear 410 rather than a 500.
Ids are server-made (uuid4 hex) and checked against a strict
pattern before any path is built from them.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import sqlite3
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from voxport.errors import ConfigError, InvalidVoiceId, LibraryFull, VoiceNotFound, VoiceQuarantined

log = logging.getLogger(__name__)

VOICE_ID_RE = re.compile(r"[0-9a-f]{32}")
_SCHEMA = """CREATE TABLE IF NOT EXISTS voices (
    id TEXT PRIMARY KEY, name TEXT, ref_text TEXT, created REAL NOT NULL, last_used REAL NOT NULL,
    duration_s REAL NOT NULL, sample_rate INTEGER NOT NULL, bytes INTEGER NOT NULL,
    embedding_sha256 TEXT NOT NULL, encoder_sha256 TEXT NOT NULL)"""
# Voices that failed verification: kept out of `voices` (never served, not counted) but remembered,
# so that a request for one says what happened to it.
_QUARANTINE_SCHEMA = """CREATE TABLE IF NOT EXISTS quarantined (
    id TEXT PRIMARY KEY, reason TEXT NOT NULL, at REAL NOT NULL, path TEXT NOT NULL)"""
_META_SLACK = 1024  # `bytes` in the index: reference + embedding file sizes + this (for meta.json)
_COLUMNS = ("id", "name", "ref_text", "created", "last_used", "duration_s", "sample_rate", "bytes",
            "embedding_sha256", "encoder_sha256")


def check_voice_id(voice_id: str) -> str:
    """The id itself if it is a server-made id, else InvalidVoiceId (before any path use)."""
    if not isinstance(voice_id, str) or VOICE_ID_RE.fullmatch(voice_id) is None:
        shown = voice_id if isinstance(voice_id, str) and len(voice_id) <= 80 else f"{str(voice_id)[:80]}…"
        raise InvalidVoiceId(f"invalid voice id {shown!r}: ids are 32 lowercase hex digits made by the server")
    return voice_id


def embedding_sha256(embedding: np.ndarray) -> str:
    """Identity of an embedding: sha256 of its float32 little-endian bytes."""
    import hashlib

    return hashlib.sha256(np.asarray(embedding, dtype="<f4").tobytes()).hexdigest()


@dataclass(frozen=True)
class Voice:
    id: str
    name: str | None
    ref_text: str | None
    created: float
    last_used: float
    duration_s: float
    sample_rate: int
    bytes: int
    embedding_sha256: str
    encoder_sha256: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class VoiceLibrary:
    def __init__(self, root: str | Path, max_voices: int, max_bytes: int) -> None:
        self.root = Path(root)
        self.max_voices, self.max_bytes = int(max_voices), int(max_bytes)
        self._voices, self._tmp = self.root / "voices", self.root / "tmp"
        self._quarantine = self.root / "quarantine"
        for path in (self._voices, self._tmp, self._quarantine):
            path.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()  # one sqlite connection, shared by threads
        # One server per library: a second one would delete the first one's uncommitted writes.
        self._lock_file = open(self.root / ".lock", "w")  # held open (and locked) until close()
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            raise ConfigError(f"voice library {self.root} is in use by another process") from None
        self._db = sqlite3.connect(self.root / "index.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(_SCHEMA)
        self._db.execute(_QUARANTINE_SCHEMA)
        self._reconcile()
        self._verify_all()

    def _reconcile(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp.mkdir()
        ids = {row[0] for row in self._db.execute("SELECT id FROM voices")}
        for entry in self._voices.iterdir():
            if entry.name not in ids:
                log.warning("voice library: removing %s (written but never committed to the index)", entry.name)
                shutil.rmtree(entry, ignore_errors=True)

    def _verify_all(self) -> None:
        """Quarantine every indexed voice whose files are not what the index records (see the module doc)."""
        bad = [(voice, reason) for voice in self.list() if (reason := self._check(voice)) is not None]
        for voice, reason in bad:
            self.quarantine(voice.id, reason)
        count, size = self.stats()
        log.info("voice library %s: %d voices, %d bytes, %d quarantined now (%d in all)", self.root, count, size,
                 len(bad), len(self.quarantined()))

    def _check(self, voice: Voice) -> str | None:
        """Why a stored voice cannot be served as the index records it, or None when it can."""
        import soundfile as sf

        folder = self._voices / voice.id
        files = [folder / "reference.wav", folder / "embedding.npy"]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            return f"missing {', '.join(missing)}"
        size = sum(f.stat().st_size for f in files) + _META_SLACK
        if size != voice.bytes:
            return f"size {size} bytes, the index records {voice.bytes}"
        try:
            embedding = np.load(files[1], allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            return f"embedding.npy does not decode: {exc}"
        if embedding_sha256(embedding) != voice.embedding_sha256:
            return "embedding sha256 differs from the index's"
        try:
            sf.read(files[0], dtype="float32")
        except (sf.LibsndfileError, RuntimeError, OSError) as exc:
            return f"reference.wav does not decode: {exc}"
        return None

    def quarantine(self, voice_id: str, reason: str) -> None:
        """Move a voice's files aside (kept as evidence), drop it from the index and record why."""
        check_voice_id(voice_id)
        with self._lock:
            target = self._quarantine / voice_id
            if target.exists():  # quarantined before under the same id: keep both
                target = self._quarantine / f"{voice_id}.{time.time_ns()}"
            source = self._voices / voice_id
            if source.exists():
                os.rename(source, target)
            else:
                target.mkdir()
            (target / "reason.json").write_text(json.dumps({"id": voice_id, "reason": reason, "at": time.time()}))
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM voices WHERE id = ?", (voice_id,))
                self._db.execute("INSERT OR REPLACE INTO quarantined (id, reason, at, path) VALUES (?, ?, ?, ?)",
                                 (voice_id, reason, time.time(), str(target)))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        log.error("voice library: quarantined voice %s (%s); its files are in %s", voice_id, reason, target)

    def quarantined(self) -> list[dict[str, Any]]:
        rows = self._query("SELECT id, reason, at, path FROM quarantined ORDER BY at")
        return [{"id": i, "reason": r, "at": a, "path": p} for i, r, a, p in rows]

    # ------------------------------------------------------------------ reads

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def stats(self) -> tuple[int, int]:
        count, size = self._query("SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM voices")[0]
        return int(count), int(size)

    def list(self) -> list[Voice]:
        rows = self._query(f"SELECT {', '.join(_COLUMNS)} FROM voices ORDER BY created")
        return [Voice(*row) for row in rows]

    def get(self, voice_id: str) -> Voice:
        check_voice_id(voice_id)
        rows = self._query(f"SELECT {', '.join(_COLUMNS)} FROM voices WHERE id = ?", (voice_id,))
        if not rows:
            self._raise_if_quarantined(voice_id)
            raise VoiceNotFound(f"no voice with id {voice_id}")
        return Voice(*rows[0])

    def _raise_if_quarantined(self, voice_id: str) -> None:
        rows = self._query("SELECT reason FROM quarantined WHERE id = ?", (voice_id,))
        if rows:
            raise VoiceQuarantined(f"voice {voice_id} is quarantined: its stored files are damaged ({rows[0][0]}); "
                                   "add the voice again")

    def embedding(self, voice_id: str) -> np.ndarray:
        voice = self.get(voice_id)
        try:
            embedding = np.load(self._voices / voice.id / "embedding.npy", allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            self._damaged(voice.id, f"embedding.npy does not decode: {exc}")
        if embedding_sha256(embedding) != voice.embedding_sha256:
            self._damaged(voice.id, "embedding sha256 differs from the index's")
        return embedding

    def _damaged(self, voice_id: str, reason: str) -> None:
        # Damaged while serving (after the startup check): the same quarantine, and a 410 from now on.
        self.quarantine(voice_id, reason)
        self._raise_if_quarantined(voice_id)

    def reference_path(self, voice_id: str) -> Path:
        path = self._voices / self.get(voice_id).id / "reference.wav"
        if not path.is_file():
            self._damaged(voice_id, "missing reference.wav")
        return path

    # ----------------------------------------------------------------- writes

    def add(self, wav_bytes: bytes, embedding: np.ndarray, *, duration_s: float, sample_rate: int,
            encoder_sha256: str, name: str | None = None, ref_text: str | None = None) -> tuple[Voice, list[str]]:
        """Store a voice; returns it and the ids evicted (least recently used) to make room."""
        embedding = np.asarray(embedding, dtype=np.float32)
        voice_id = uuid.uuid4().hex
        now = time.time()
        meta = {"id": voice_id, "name": name, "ref_text": ref_text, "created": now, "last_used": now,
                "duration_s": float(duration_s), "sample_rate": int(sample_rate),
                "embedding_sha256": embedding_sha256(embedding), "encoder_sha256": encoder_sha256}
        staging = self._tmp / f"{voice_id}.partial"
        staging.mkdir()
        try:
            _fsync_write(staging / "reference.wav", wav_bytes)
            with open(staging / "embedding.npy", "wb") as handle:
                np.save(handle, embedding, allow_pickle=False)
                handle.flush()
                os.fsync(handle.fileno())
            size = sum(p.stat().st_size for p in staging.iterdir()) + _META_SLACK  # + meta.json, roughly
            meta["bytes"] = size
            _fsync_write(staging / "meta.json", json.dumps(meta, ensure_ascii=False, indent=1).encode())
            if size > self.max_bytes:
                raise LibraryFull(f"this voice takes {size} bytes; the library holds at most {self.max_bytes}")
            with self._lock:
                evicted = self._plan_eviction(size)
                final = self._voices / voice_id
                os.rename(staging, final)
                _fsync_dir(self._voices)
                try:
                    self._commit_add(meta, evicted)
                except BaseException:
                    shutil.rmtree(final, ignore_errors=True)
                    raise
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        for old in evicted:
            self._remove_dir(old)
            log.info("voice library: evicted %s (least recently used)", old)
        return Voice(**{k: meta[k] for k in _COLUMNS}), evicted

    def _plan_eviction(self, size: int) -> list[str]:
        count, total = self.stats()
        evicted: list[str] = []
        rows = self._query("SELECT id, bytes FROM voices ORDER BY last_used, created")
        for voice_id, nbytes in rows:
            if count + 1 <= self.max_voices and total + size <= self.max_bytes:
                break
            evicted.append(voice_id)
            count, total = count - 1, total - nbytes
        return evicted

    def _commit_add(self, meta: dict[str, Any], evicted: list[str]) -> None:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.executemany("DELETE FROM voices WHERE id = ?", [(v,) for v in evicted])
            self._db.execute(f"INSERT INTO voices ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
                             tuple(meta[k] for k in _COLUMNS))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def touch(self, voice_id: str) -> None:
        """Mark a voice as used now (called only after a request with it succeeded)."""
        with self._lock:
            self._db.execute("UPDATE voices SET last_used = ? WHERE id = ?", (time.time(), check_voice_id(voice_id)))

    def delete(self, voice_id: str) -> Voice:
        with self._lock:
            voice = self.get(voice_id)
            self._db.execute("DELETE FROM voices WHERE id = ?", (voice.id,))
        self._remove_dir(voice.id)
        return voice

    def _remove_dir(self, voice_id: str) -> None:
        path = self._voices / check_voice_id(voice_id)
        # Rename first so a half-removed directory is never mistaken for a voice.
        trash = self._tmp / f"{voice_id}.deleted"
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    def close(self) -> None:
        self._db.close()
        self._lock_file.close()  # releases the flock
