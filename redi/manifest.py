"""The manifest layer of an artifact folder: file tables, checksums, validation, and one-line storage errors.

A folder is complete only when it holds ``manifest.json`` listing the size and sha256 of every file;
:func:`validate` recomputes the checksums (once per process per unchanged folder). :func:`storage_error`
turns a full disk or a read-only folder into one line naming the folder, the space and the fix.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class CorruptArtifact(RuntimeError):
    pass


class StorageError(RuntimeError):
    """A write under the artifact root failed for want of space, or the root is read-only and the artifact is
    not cached. The message is one line naming the folder, the space needed and free, and the fix."""


_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
READ_ONLY_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM}
_MB = 1 << 20


def free_bytes(path: Path) -> int:
    """Free bytes on the file system of ``path`` (of its nearest existing parent when it does not exist)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


def folder_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (0 when absent)."""
    total = 0
    for p in Path(path).rglob("*"):
        try:
            total += p.stat().st_size if p.is_file() else 0
        except OSError:
            pass
    return total


def _is_disk_full(e: BaseException, folder: Path) -> bool:
    """An ENOSPC/EDQUOT OSError, or an error of a C++ writer (torch.save: ``basic_ios::clear: iostream error``,
    ``file write failed``; safetensors: ``os error 28``) raised while the folder's disk is (nearly) full."""
    if isinstance(e, OSError):
        return e.errno in _NO_SPACE
    if type(e) is not RuntimeError and type(e).__name__ != "SafetensorError":
        return False
    text = str(e)
    return any(t in text for t in ("No space left", "os error 28", "StorageFull")) or free_bytes(folder) < _MB


def storage_error(e: BaseException, folder: Path, needed: int | None = None, written: int = 0) -> StorageError | None:
    """A one-line :class:`StorageError` for a full disk or a read-only folder, else None (another error).

    ``needed``: bytes the write needs (an estimate); None = unknown, then ``written`` (the bytes the failed
    write had put down) is reported as a lower bound."""
    if isinstance(e, StorageError):
        return e
    folder = Path(folder)
    if isinstance(e, OSError) and e.errno in READ_ONLY_ERRNOS:
        return StorageError(f"{folder} is not writable ({e.strerror}): set run.artifact_root to a writable folder")
    if not _is_disk_full(e, folder):
        return None
    free = f"{free_bytes(folder) // _MB} MB free"
    if needed is not None:
        free = f"needs ~{max(needed, _MB) // _MB} MB, {free}"
    elif written:
        free = f"needs more than the {written // _MB} MB written when it failed, {free}"
    return StorageError(f"no space left in {folder} ({free}): free space or set run.artifact_root elsewhere")


def file_table(folder: Path, skip: str = MANIFEST) -> dict[str, dict[str, Any]]:
    """{relative path: {size, sha256}} of every file under ``folder`` but ``skip`` (the table's own file).

    Hashed by a few threads: hashlib releases the GIL on large reads (checkpoints, model weights)."""
    from concurrent.futures import ThreadPoolExecutor

    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != skip)
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as ex:
        digests = list(ex.map(sha256_file, files))
    return {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": d}
            for p, d in zip(files, digests, strict=True)}


_VALIDATED: dict[str, tuple] = {}
"""folder -> stat stamp of its files when their checksums were last verified in this process."""


def _stamp(folder: Path, files: dict[str, Any]) -> tuple:
    out = [(folder / MANIFEST).stat().st_mtime_ns]
    for rel in sorted(files):
        st = (folder / rel).stat()
        out.append((rel, st.st_size, st.st_mtime_ns, st.st_ino))
    return tuple(out)


def validate(folder: Path) -> dict[str, Any]:
    """Return the manifest of a complete artifact folder, or raise CorruptArtifact saying why.

    Every checksum is recomputed the first time a process sees a folder; later lookups in the same process
    re-hash only if a file's size, mtime or inode changed since (a multi-GB model is hashed once per run,
    not once per task)."""
    mpath = folder / MANIFEST
    if not mpath.is_file():
        raise CorruptArtifact(f"{folder}: no {MANIFEST}")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CorruptArtifact(f"{mpath}: unreadable manifest ({e})") from e
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise CorruptArtifact(f"{mpath}: manifest lists no files")
    for rel, meta in files.items():
        p = folder / rel
        if not p.is_file():
            raise CorruptArtifact(f"{folder}: missing file {rel}")
        if p.stat().st_size != meta["size"]:
            raise CorruptArtifact(f"{folder}: {rel} has size {p.stat().st_size}, manifest says {meta['size']}")
    try:
        stamp = _stamp(folder, files)
    except OSError as e:
        raise CorruptArtifact(f"{folder}: {e}") from e
    if _VALIDATED.get(str(folder)) == stamp:
        return manifest
    for rel, meta in files.items():
        if sha256_file(folder / rel) != meta["sha256"]:
            _VALIDATED.pop(str(folder), None)
            raise CorruptArtifact(f"{folder}: {rel} checksum mismatch")
    _VALIDATED[str(folder)] = stamp
    return manifest


def mark_validated(folder: Path, files: dict[str, Any]) -> None:
    """Record that ``folder``'s files (its manifest's table) were hashed just now, so the next
    :func:`validate` in this process re-hashes only if a file changed."""
    _VALIDATED[str(folder)] = _stamp(folder, files)


def move_validated(src: Path, dst: Path | None) -> None:
    """A verified folder renamed from ``src`` to ``dst`` stays verified (same files, same inodes); ``dst=None``:
    ``src`` is gone."""
    stamp = _VALIDATED.pop(str(src), None)
    if stamp is not None and dst is not None:
        _VALIDATED[str(dst)] = stamp
