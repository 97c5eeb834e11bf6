"""Content-addressed, validated, atomically written stage artifacts.

Each stage writes into ``<root>/<stage>/<key>/`` where ``key`` hashes exactly what determines the
output: the stage's own config fields, the keys of its upstream artifacts and the code version of the
stage (a hash of the source files it runs). A folder is complete only when it holds ``manifest.json``
listing the size and sha256 of every file; a lookup recomputes the checksums, so a truncated or edited
artifact is rebuilt, never trusted.

Writes are atomic: a stage builds into ``<stage>/.tmp-<key>-<pid>-<n>/`` and is renamed into place
only after its manifest is written. A killed process leaves only a ``.tmp-`` folder, which the next
build of that key removes. A per-key file lock (``<stage>/.locks/<key>.lock``) makes two runs of the
same recipe wait for each other instead of writing the same folder twice; the second one finds the
first one's artifact and takes it from cache. Long stages get a stable ``work_dir``
(``<stage>/.work-<key>/``) for checkpoints that survive a kill; it is deleted after success.

Under a multi-process launch (``accelerate launch`` / ``torchrun``, see ``redi.distributed``) only rank 0
takes locks, creates folders and publishes; the other ranks wait at a barrier and read the published
artifact (training stages run on every rank into the folders rank 0 made). ``run.artifact_root`` must then
be visible to every node.

A read-only root (a shared cache mounted read-only, a folder the user cannot write) serves cache hits
without taking a lock; a stage that must be built fails with one line naming the folder. A build that
runs out of space (``ENOSPC``) fails with one line naming the folder, the space needed and the space free
(:class:`StorageError`), and its temporary folder is removed.

The root is a local path, or any fsspec URL (``s3://bucket/prefix``, ``gs://...``): then the layout above
lives in a local cache folder (``run.cache_dir``) and :mod:`redi.storage` is the source of truth: a lookup
reads the remote manifest and pulls and verifies what the cache lacks; a build runs locally and is
published with its manifest written last by a conditional write (docs/caching.md).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock

from . import distributed
from .keys import canonical_json, code_version, hash_obj, library_versions, module_closure, stage_key  # noqa: F401  (re-exported)
from .manifest import (  # noqa: F401  (re-exported: the store's callers import them from here)
    MANIFEST,
    READ_ONLY_ERRNOS,
    CorruptArtifact,
    StorageError,
    file_table,
    folder_bytes,
    free_bytes,
    mark_validated,
    move_validated,
    sha256_file,
    storage_error,
    validate,
)
from .storage import Remote, RemoteError, attach_work, cache_root, is_url, normalize_root

log = logging.getLogger(__name__)

@dataclass
class Artifact:
    """A validated stage output. JSON-serialisable (``to_dict``) so it can pass between Prefect tasks."""

    stage: str
    key: str
    path: str
    manifest: dict[str, Any] = field(default_factory=dict)
    cached: bool = False

    @property
    def dir(self) -> Path:
        return Path(self.path)

    @property
    def summary(self) -> dict[str, Any]:
        return self.manifest.get("summary", {})

    def file(self, rel: str) -> Path:
        p = Path(self.path) / rel
        if not p.exists():
            raise FileNotFoundError(f"{self.stage} artifact {self.key} has no {rel!r} ({self.path})")
        return p

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Artifact:
        return cls(**d)


BuildFn = Callable[[Path, Path], dict[str, Any] | None]


class ArtifactStore:
    """Content-addressed stage artifacts under one local root, or under an fsspec URL through a local cache.

    ``root`` a URL (``s3://bucket/prefix``): ``self.root`` is the local cache folder (``cache_dir``, see
    :func:`redi.storage.cache_root`) and ``self.remote`` the store; the root is checked at once (one-line
    :class:`redi.storage.RemoteError` for a missing backend, endpoint, credentials or bucket)."""

    def __init__(self, root: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None):
        self.remote: Remote | None = None
        self._etags: dict[tuple[str, str], str | None] = {}
        if is_url(root):
            self.remote = Remote(str(root))
            self.remote.check()
            self.root = cache_root(self.remote.url, cache_dir)
        else:
            self.root = Path(normalize_root(root))

    @property
    def location(self) -> str:
        """Where the artifacts live, for messages: the URL (and its cache folder) or the local folder."""
        return f"{self.remote.url} (cache {self.root})" if self.remote else str(self.root)

    def dir(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def has(self, stage: str, key: str) -> bool:
        """Whether a committed artifact exists, without downloading it (a remote root: its manifest reads and
        parses; the files are verified when a stage uses it). A local root: :meth:`lookup`."""
        if self.remote is None:
            return self.lookup(stage, key) is not None
        rm = self.remote.read_manifest(stage, key)
        return rm is not None and rm.data is not None

    def pull_tree(self, folder: Path, only_missing: bool = False, names: tuple[str, ...] = ()) -> None:
        """A remote root: download the store's copy of ``folder`` (a path under ``self.root``, e.g. ``runs/<name>``
        or ``results``) into it (only files called one of ``names``, when given). No-op for a local root or a
        folder outside the root."""
        rel = self._rel(folder)
        if rel is not None:
            self.remote.pull_tree(rel, Path(folder), only_missing, names)

    def push_tree(self, folder: Path, last: tuple[str, ...] = (), only_missing: bool = False) -> None:
        """A remote root: upload ``folder`` (under ``self.root``) to the store, the names in ``last`` last."""
        rel = self._rel(folder)
        if rel is not None:
            self.remote.push_tree(Path(folder), rel, last, only_missing)

    def _rel(self, folder: Path) -> str | None:
        if self.remote is None:
            return None
        try:
            return Path(folder).resolve().relative_to(self.root).as_posix()
        except ValueError:
            return None

    def lookup(self, stage: str, key: str) -> Artifact | None:
        """The validated artifact, or None (absent or corrupt: corrupt ones are logged)."""
        if self.remote is not None:
            return self._remote_lookup(stage, key)
        folder = self.dir(stage, key)
        if not folder.exists():
            return None
        try:
            manifest = validate(folder)
        except CorruptArtifact as e:
            log.warning("cache: %s artifact %s is corrupt and will be rebuilt: %s", stage, key, e)
            return None
        return Artifact(stage, key, str(folder), manifest, cached=True)

    def build(
        self,
        stage: str,
        key: str,
        fn: BuildFn,
        *,
        config: Any = None,
        inputs: dict[str, Any] | None = None,
        refresh: bool = False,
        collective: bool = False,
    ) -> Artifact:
        """Return the cached artifact for (stage, key), or build it with ``fn(out_dir, work_dir)``.

        ``fn`` writes its files into ``out_dir`` and returns a JSON-able summary (counts, metrics) that
        goes into the manifest. ``work_dir`` persists across a killed attempt (for checkpoints).

        Under a multi-process launch (``redi.distributed``) only rank 0 takes the lock, checks the cache,
        creates the folders and publishes; the other ranks wait for it and get the artifact from it. With
        ``collective=False`` (download, verify, evaluate, ...) ``fn`` runs on rank 0 only. With
        ``collective=True`` (training) ``fn`` runs on every rank into the same folders (the trainer writes
        shared files from rank 0 only); rank 0 publishes after a barrier. Rank 0 holds the key's lock
        from its check to the publish, so a second run of the recipe waits for this one as in a single
        process; no other rank ever touches a lock, so no rank can block on a lock while a peer waits
        for it in a collective (the deadlock of every rank taking the lock).
        """
        args = (stage, key, config, inputs, refresh)
        if not distributed.launched():
            return self._build_local(fn, *args)
        if not collective:
            return self._build_on_main(fn, *args)
        return self._build_collective(fn, *args)

    def _lock(self, stage: str, key: str) -> FileLock:
        locks = self.root / stage / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        return FileLock(str(locks / f"{key}.lock"))

    def _acquire(self, stage: str, key: str) -> FileLock | None:
        """The key's lock, held; None when the root is read-only (EROFS, EACCES, EPERM): then only a cache hit
        can be served, read without a lock (nobody can be writing a read-only folder)."""
        try:
            lock = self._lock(stage, key)
            lock.acquire()
        except OSError as e:
            if e.errno not in READ_ONLY_ERRNOS:
                raise
            log.info("cache: %s is not writable (%s): %s %s is served from cache only", self.root, e.strerror, stage, key)
            return None
        return lock

    def _read_only_hit(self, stage: str, key: str, refresh: bool) -> Artifact:
        hit = None if refresh else self.lookup(stage, key)
        if hit is None:
            why = "--refresh asks to rebuild it" if refresh else "it is not cached"
            raise StorageError(f"{self.root / stage} is not writable and {stage} {key} must be built ({why}): set "
                               "run.artifact_root to a writable folder")
        log.info("cache hit: %s %s (read-only root, no lock)", stage, key)
        return hit

    def _failed(self, e: BaseException, stage: str, tmp: Path) -> BaseException:
        """The error to raise for a build that failed writing into ``tmp``: a one-line StorageError for a full
        disk or a read-only folder, else ``e`` itself. Call before ``tmp`` is removed (its size is reported)."""
        if not isinstance(e, Exception):
            return e
        return storage_error(e, self.root / stage, written=folder_bytes(tmp)) or e

    def _begin(self, stage: str, key: str, refresh: bool) -> Artifact | tuple[Path, Path]:
        """Under the key's lock: the cached artifact, or fresh (tmp, work) folders for a build."""
        if not refresh:
            hit = self.lookup(stage, key)
            if hit is not None:
                log.info("cache hit: %s %s", stage, key)
                return hit
        elif self.remote is not None:  # the manifest a refreshed build replaces (its etag)
            rm = self.remote.read_manifest(stage, key)
            self._etags[(stage, key)] = rm.etag if rm else None
        stage_dir = self.root / stage
        for stale in stage_dir.glob(f".tmp-{key}-*"):  # left by a killed attempt; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        for stale in stage_dir.glob(f".pull-{key}-*"):  # a killed download (a live one is younger than an hour)
            if time.time() - stale.stat().st_mtime > 3600:
                shutil.rmtree(stale, ignore_errors=True)
        tmp = stage_dir / f".tmp-{key}-{os.getpid()}-{time.time_ns()}"
        tmp.mkdir()
        work = stage_dir / f".work-{key}"
        work.mkdir(exist_ok=True)
        if self.remote is not None:
            attach_work(self.remote, stage, key, work)
        return tmp, work

    def _publish(self, stage: str, key: str, tmp: Path, work: Path, summary: dict, t0: float, config: Any,
                 inputs: dict[str, Any] | None) -> Artifact:
        """Under the key's lock: write the manifest into ``tmp`` and rename it into place."""
        manifest = {
            "stage": stage,
            "key": key,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(time.time() - t0, 3),
            "config": config,
            "inputs": inputs or {},
            "summary": summary,
            "versions": library_versions(),
            "host": platform.node(),
            "files": file_table(tmp),
        }
        if self.remote is not None:
            manifest["data"] = f"data-{hash_obj([platform.node(), os.getpid(), time.time_ns()], 12)}"
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        if self.remote is not None and not self.remote.publish(stage, key, tmp, manifest, self._etags.get((stage, key))):
            shutil.rmtree(tmp, ignore_errors=True)
            log.warning("store: another builder published %s %s first: its artifact is used, this build is dropped", stage, key)
            hit = self.lookup(stage, key)
            if hit is None:
                raise RemoteError(f"{self.remote.rel_url(stage, key)}: another builder published it first, but its "
                                  "artifact does not verify: rerun (it will be rebuilt)")
            shutil.rmtree(work, ignore_errors=True)
            return hit
        final = self.dir(stage, key)
        _install(tmp, final, self.root / stage, key)
        mark_validated(final, manifest["files"])  # hashed just now by file_table
        mirrored = self.remote is not None and any(work.glob("checkpoint-*"))  # trained here: checkpoints on the store
        shutil.rmtree(work, ignore_errors=True)
        if mirrored:
            self.remote.remove(stage, f".work-{key}")
        log.info("built %s %s in %.1fs", stage, key, manifest["seconds"])
        return Artifact(stage, key, str(final), manifest, cached=False)

    def _remote_lookup(self, stage: str, key: str) -> Artifact | None:
        """The artifact the remote manifest commits, in the local cache (pulled and verified when the cache's
        copy is not the same commit); None when there is no manifest or it does not verify (logged)."""
        assert self.remote is not None
        rm = self.remote.read_manifest(stage, key)
        self._etags[(stage, key)] = rm.etag if rm else None
        if rm is None:
            return None
        where = self.remote.rel_url(stage, key)
        if rm.data is None:
            log.warning("cache: %s artifact %s is corrupt and will be rebuilt: %s: %s", stage, key, where, rm.why)
            return None
        folder = self.dir(stage, key)
        try:
            if (folder / MANIFEST).read_bytes() == rm.raw:
                return Artifact(stage, key, str(folder), validate(folder), cached=True)
        except (OSError, CorruptArtifact):
            pass  # no or another local copy: pull
        stage_dir = self.root / stage
        stage_dir.mkdir(parents=True, exist_ok=True)
        for have in ([folder] if folder.is_dir() else []) + [None]:  # reuse unchanged local files, else all fresh
            tmp = stage_dir / f".pull-{key}-{os.getpid()}-{time.time_ns()}"
            try:
                self.remote.pull(stage, key, rm.data, tmp, have)
                (tmp / MANIFEST).write_bytes(rm.raw)
                manifest = validate(tmp)
            except (CorruptArtifact, FileNotFoundError) as e:
                shutil.rmtree(tmp, ignore_errors=True)
                if have is not None:
                    continue
                log.warning("cache: %s artifact %s is corrupt and will be rebuilt: %s: %s", stage, key, where, e)
                return None
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            _install(tmp, folder, stage_dir, key)
            log.info("cache: %s %s pulled from %s", stage, key, where)
            return Artifact(stage, key, str(folder), manifest, cached=True)
        return None

    def _build_local(self, fn: BuildFn, stage: str, key: str, config: Any, inputs: dict | None,
                     refresh: bool) -> Artifact:
        lock = self._acquire(stage, key)
        if lock is None:
            return self._read_only_hit(stage, key, refresh)
        try:
            begun = self._begin(stage, key, refresh)
            if isinstance(begun, Artifact):
                return begun
            tmp, work = begun
            t0 = time.time()
            try:
                summary = fn(tmp, work) or {}
                return self._publish(stage, key, tmp, work, summary, t0, config, inputs)
            except BaseException as e:  # a failed build or publish leaves no folder a lookup would trust
                err = self._failed(e, stage, tmp)
                shutil.rmtree(tmp, ignore_errors=True)
                if err is e:
                    raise
                raise err from e
        finally:
            lock.release()

    def _build_on_main(self, fn: BuildFn, stage: str, key: str, config: Any, inputs: dict | None,
                       refresh: bool) -> Artifact:
        """Rank 0 builds (or finds) the artifact as a single process would; the others wait and read it."""
        payload: dict[str, Any] | None = None
        if distributed.is_main():
            try:
                payload = {"artifact": self._build_local(fn, stage, key, config, inputs, refresh).to_dict()}
            except Exception as e:  # tell the waiting ranks why, then fail here too
                distributed.broadcast({"error": f"{type(e).__name__}: {e}"})
                raise
        payload = distributed.broadcast(payload)
        if "error" in payload:
            raise StageFailed(f"{stage}: rank 0 failed to build it ({payload['error']})")
        return self._received(payload["artifact"])

    def _build_collective(self, fn: BuildFn, stage: str, key: str, config: Any, inputs: dict | None,
                          refresh: bool) -> Artifact:
        """Every rank runs ``fn`` (training); rank 0 alone locks, creates the folders and publishes."""
        main = distributed.is_main()
        lock = self._acquire(stage, key) if main else None
        try:
            plan: dict[str, Any] | None = None
            if main and lock is None:  # read-only root: a hit, or every rank fails with the same line
                try:
                    plan = {"artifact": self._read_only_hit(stage, key, refresh).to_dict()}
                except StorageError as e:
                    plan = {"error": str(e)}
            elif main:
                begun = self._begin(stage, key, refresh)
                plan = {"artifact": begun.to_dict()} if isinstance(begun, Artifact) else {"dirs": [str(p) for p in begun]}
            plan = distributed.broadcast(plan)
            if "error" in plan:
                raise StorageError(plan["error"])
            if "artifact" in plan:
                return self._received(plan["artifact"])
            tmp, work = (Path(p) for p in plan["dirs"])
            if not tmp.is_dir():
                raise StageFailed(_not_shared(tmp))
            t0 = time.time()
            try:
                summary = fn(tmp, work) or {}
                distributed.barrier()  # every rank's files are written before rank 0 hashes and renames them
            except BaseException as e:
                err = self._failed(e, stage, tmp)
                if main:
                    shutil.rmtree(tmp, ignore_errors=True)
                if err is e:
                    raise
                raise err from e
            art = self._publish(stage, key, tmp, work, summary, t0, config, inputs).to_dict() if main else None
            return self._received(distributed.broadcast(art))
        finally:
            if lock is not None and lock.is_locked:
                lock.release()

    def _received(self, d: dict[str, Any]) -> Artifact:
        art = Artifact.from_dict(d)
        if not art.dir.is_dir() and self.remote is not None:  # another node: its own cache, pulled from the store
            art = self.lookup(art.stage, art.key) or art
        if not art.dir.is_dir():
            raise StageFailed(_not_shared(art.dir))
        return art


def _install(tmp: Path, final: Path, stage_dir: Path, key: str) -> None:
    """Rename the complete folder ``tmp`` to ``final``, moving an older ``final`` aside first (the rename stays
    atomic). Another process that installed the same key meanwhile wins; ``tmp`` is then removed."""
    if final.exists():  # corrupt, refreshed or an older commit: move aside first
        trash = stage_dir / f".trash-{key}-{os.getpid()}-{time.time_ns()}"
        try:
            final.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        except FileNotFoundError:
            pass
    try:
        os.replace(tmp, final)
    except OSError as e:
        move_validated(tmp, None)
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # a concurrent pull or build put it there first
        return
    move_validated(tmp, final)  # a rename keeps inodes and mtimes: the checksums just verified stay valid


class StageFailed(RuntimeError):
    """Another rank of a multi-process launch could not build (or publish) a stage."""


def _not_shared(path: Path) -> str:
    return (f"rank {distributed.rank()} on {platform.node()} cannot see {path}, which rank 0 created: put "
            "run.artifact_root on a file system every node of the launch shares (NFS, Lustre)")

