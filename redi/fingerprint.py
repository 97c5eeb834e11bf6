"""Content fingerprints of local inputs (data files and folders, local model folders, benchmark files) for cache keys.

``fingerprint(path)`` is ``sha256:<hex>`` of a file's bytes, or of a folder's files (each one's path
relative to the folder and its sha256, sorted; hidden files and folders left out). A stage keyed on it
rebuilds when the content changes, and only then: a moved or copied file with the same bytes keeps
its digest.

Cheap on a rerun: each file's sha256 is cached in a small JSON file, keyed by its resolved path, with
the size and ``mtime_ns`` it had when it was hashed. While both are unchanged the file is not read
again (a cache hit costs one ``stat`` per file). A file whose size or mtime changed is hashed again;
when its digest differs from the cached one a log line (INFO) names it, since every stage keyed on it
will rebuild.

Cache file: ``$REDI_FINGERPRINT_CACHE``, else ``$XDG_CACHE_HOME/redi/sha256.json`` (``~/.cache``).
Writes are atomic (temp file + rename) and best effort: an unwritable cache costs re-hashing, never an
error. Like make and ninja, an edit that keeps both the size and the mtime (``touch -r``) is not
noticed; ``--refresh <stage>`` or deleting the cache file rebuilds then.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

ENV_CACHE = "REDI_FINGERPRINT_CACHE"
MAX_ENTRIES = 50_000
"""Entries kept in the cache file (the oldest go first)."""

_lock = threading.Lock()


def cache_path() -> Path:
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "redi" / "sha256.json"


def _load(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) and isinstance(data.get("files"), dict) else {"files": {}, "dirs": {}}
    except (OSError, ValueError):
        return {"files": {}, "dirs": {}}


def _save(path: Path, new_files: dict, new_dirs: dict) -> None:
    """Merge our entries into the file on disk (another process may have added its own) and replace it atomically."""
    try:
        data = _load(path)
        for key, entries in (("files", new_files), ("dirs", new_dirs)):
            merged = data.get(key) or {}
            for k, v in entries.items():
                merged.pop(k, None)  # re-insert: newest last
                merged[k] = v
            data[key] = dict(list(merged.items())[-MAX_ENTRIES:])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
    except OSError as e:  # read-only home, full disk: the next run hashes again
        log.debug("fingerprint cache %s not written (%s)", path, e)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class _Session:
    """One fingerprint call: the cache read once, new entries written once at the end."""

    def __init__(self) -> None:
        self.path = cache_path()
        self.data = _load(self.path)
        self.files: dict = {}
        self.dirs: dict = {}

    def file(self, f: Path, key: str | None = None) -> str:
        key = key or str(f.resolve())
        st = os.stat(f)
        old = self.data["files"].get(key)
        if old and old[0] == st.st_size and old[1] == st.st_mtime_ns:
            return old[2]
        digest = _sha256_file(f)
        if old and old[2] != digest:
            log.info("%s changed since it was last fingerprinted (sha256 %s... -> %s...): stages keyed on it rebuild",
                     f, old[2][:12], digest[:12])
        self.files[key] = [st.st_size, st.st_mtime_ns, digest]
        return digest

    def folder(self, d: Path, include: Callable[[Path], bool] | None) -> str:
        h = hashlib.sha256()
        n = 0
        key = str(d.resolve())
        for f, rel in _files(d):
            if include is not None and not include(f):
                continue
            h.update(f"{rel}\0{self.file(f, f'{key}/{rel}')}\n".encode())
            n += 1
        digest = h.hexdigest()
        old = self.data.get("dirs", {}).get(key)
        if old and old != digest:
            log.info("folder %s changed since it was last fingerprinted (%d files): stages keyed on it rebuild", d, n)
        if old != digest:
            self.dirs[key] = digest
        return digest

    def close(self) -> None:
        if self.files or self.dirs:
            _save(self.path, self.files, self.dirs)


def _files(d: Path) -> list[tuple[Path, str]]:
    """(file, path relative to d) under d (symlinks followed), hidden files and folders left out, sorted."""
    out = []
    for root, dirs, files in os.walk(d, followlinks=True):
        dirs[:] = [x for x in dirs if not x.startswith(".")]
        rel_root = os.path.relpath(root, d)
        for f in files:
            if not f.startswith("."):
                out.append((Path(root) / f, f if rel_root == "." else f"{rel_root}/{f}"))
    return sorted(out, key=lambda t: t[1])


def file_sha256(path: str | Path) -> str:
    """sha256 (hex) of a file's bytes, from the cache while its size and mtime are unchanged."""
    with _lock:
        s = _Session()
        try:
            return s.file(Path(path).expanduser())
        finally:
            s.close()


def fingerprint(path: str | Path, include: Callable[[Path], bool] | None = None) -> str:
    """``sha256:<hex>`` of a file's content or of a folder's files (``include`` filters them); FileNotFoundError
    when the path does not exist."""
    p = Path(path).expanduser()
    with _lock:
        s = _Session()
        try:
            if p.is_dir():
                return "sha256:" + s.folder(p, include)
            return "sha256:" + s.file(p)
        finally:
            s.close()
