"""The stage cache: a pass whose inputs are unchanged is not run again, as a build system would.

Content-addressed under `cache_dir` (conf):
- `passes/<key>/`: a candidate's files and draft records. The key hashes the pass kind, its
  parent's sha256, the part of its config that decides the result, the real speech it may
  calibrate on, the gate a searching pass aims at, and the code and tool versions that made it.
- `judgements/<key>.json`: what judging or timing an artifact found. Judging is keyed by the
  artifacts' sha256 and every setting of the gate, so a changed threshold re-judges without
  re-transforming; timings by the artifacts, the timing settings and this host's fingerprint.

Every write goes to a temporary name in the same directory and is renamed into place, so two
builds sharing a cache never see half an entry: the second to finish a candidate keeps the
first's entry and drops its own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from voxport.models.checkpoint import sha256_file
from voxport.pipeline.records import Record, atomic_path, atomic_write_text

log = logging.getLogger(__name__)


def key(*parts: Any) -> str:
    """A stable hash of JSON-able parts (sorted keys; anything else by its str())."""
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def code_fingerprint(paths: Iterable[Path]) -> str:
    """The sha256 of source files: a cache entry made by other code is not reused."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


class StageCache:
    """See the module docstring. `root=None` disables caching (every lookup misses)."""

    def __init__(self, root: Path | str | None) -> None:
        self.root = Path(root) if root else None
        self.hits: list[str] = []
        self.misses: list[str] = []

    @property
    def enabled(self) -> bool:
        return self.root is not None

    # -- candidates ------------------------------------------------------------------------------

    def load_candidate(self, name: str, digest: str, bundle_dir: Path) -> list[Record] | None:
        """The cached candidate's draft records, its files copied into `bundle_dir`; None on a miss
        (or when a cached file no longer matches its sha256: the entry is ignored, not trusted)."""
        if self.root is None:
            return None
        entry = self.root / "passes" / digest
        index = entry / "records.json"
        if not index.is_file():
            self.misses.append(name)
            return None
        records = [Record.from_dict(r) for r in json.loads(index.read_text())]
        copied: list[Path] = []
        try:
            for record in records:
                copied.append(_copy_atomic(entry / record.file, bundle_dir / record.file))
                if sha256_file(bundle_dir / record.file) != record.sha256:
                    raise OSError(f"{record.file}: cached copy does not match its sha256")
                copied += [_copy_atomic(entry / name, bundle_dir / name) for name in sidecars(record)]
        except OSError as exc:
            log.warning("stage cache entry %s unusable (%s): running the pass", digest[:12], exc)
            for path in copied:
                path.unlink(missing_ok=True)
            self.misses.append(name)
            return None
        self.hits.append(name)
        return records

    def store_candidate(self, digest: str, records: list[Record], bundle_dir: Path) -> None:
        if self.root is None:
            return
        parent = self.root / "passes"
        parent.mkdir(parents=True, exist_ok=True)
        entry = parent / digest
        if entry.exists():
            return
        tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:12]}.", dir=parent))
        try:
            for record in records:
                for name in (record.file, *sidecars(record)):
                    shutil.copyfile(bundle_dir / name, tmp / name)
            (tmp / "records.json").write_text(json.dumps([r.to_dict() for r in records], default=_json) + "\n")
            os.rename(tmp, entry)  # atomic; fails if another build stored the same entry first
        except OSError:
            pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # -- judgements and timings ------------------------------------------------------------------

    def load(self, name: str, digest: str) -> dict[str, Any] | None:
        if self.root is None:
            return None
        path = self.root / "judgements" / f"{digest}.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            self.misses.append(name)
            return None
        self.hits.append(name)
        return data

    def store(self, digest: str, data: dict[str, Any]) -> None:
        if self.root is not None:
            atomic_write_text(self.root / "judgements" / f"{digest}.json", json.dumps(data, default=_json) + "\n")


def sidecars(record: Record) -> list[str]:
    """Files a pass wrote beside its artifact for people (a loss curve PNG), named in the record's
    `config.sidecars`: cached and restored with it. Plain names inside the bundle only."""
    names = [str(n) for n in (record.config or {}).get("sidecars", [])]
    for name in names:
        if not name or Path(name).name != name or name.startswith("."):
            raise OSError(f"{record.file}: sidecar '{name}' is not a plain file name in the bundle")
    return names


def _copy_atomic(src: Path, dst: Path) -> Path:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return dst


def _json(obj: Any) -> Any:
    import dataclasses

    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    try:
        return obj.tolist()
    except AttributeError:
        raise TypeError(f"not JSON serialisable: {type(obj).__name__}") from None
