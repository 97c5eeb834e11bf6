"""An artifact root on object storage (any fsspec URL: ``s3://``, ``gs://``, ``az://``, ``memory://``, ...).

:class:`redi.artifacts.ArtifactStore` keeps its local layout in a *cache folder* (``run.cache_dir``, default
``$REDI_CACHE_DIR`` or ``~/.cache/redi``, one sub-folder per root URL) and uses :class:`Remote` as the source
of truth. Layout under the root URL::

    <stage>/<key>/manifest.json           the commit marker: written last, with a conditional write
    <stage>/<key>/data-<attempt>/<file>   the files of the build attempt that manifest names ("data")
    <stage>/.work-<key>/checkpoint-<N>/   training checkpoints, so a preempted job resumes elsewhere
    runs/<name>/...  results/part-*.parquet   registrations and the results store (mirrored folders)

- **Lookup**: read the remote manifest; files whose local copy is missing or differs are downloaded into a
  fresh local folder, every checksum is verified, then the folder is renamed into the cache. No manifest,
  an unreadable one, or a checksum mismatch = absent (rebuilt). A file is never read from a ``data-``
  prefix the manifest does not name, so a killed upload (files without a manifest) is ignored.
- **Publish**: the build runs locally; its files go to a new ``data-<attempt>/`` prefix, then the manifest
  is written with S3's ``If-None-Match: *`` (first publish) or ``If-Match: <etag>`` (replacing a corrupt or
  refreshed artifact). Two builders of one key upload to different prefixes, and exactly one manifest
  write succeeds; the other builder drops its own output and takes the winner's. Conditional writes, not
  a lease object: S3 (Aug/Nov 2024), MinIO and moto implement them and s3fs passes them through; they cost
  no extra round trip, need no clock agreement, and a killed builder blocks nobody (a lease would until it
  expires). Backends without them (fsspec's generic ``mode="create"`` checks then writes) keep a small race
  window: documented in docs/caching.md.
- **Stale attempts**: ``data-`` prefixes the manifest does not name and older than :data:`STALE_S` are
  deleted after a successful publish (younger ones may be a concurrent builder's upload in flight).
- **Errors**: a missing backend package, an unreachable endpoint, missing credentials or bucket fail with
  one line naming the URL and the fix (:class:`RemoteError`, checked when the store opens, before any
  work); a failure mid-run raises the same and trusts nothing it had not verified.

Credentials and the endpoint come only from the environment / fsspec configuration (``AWS_ENDPOINT_URL``,
``FSSPEC_S3_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``~/.aws``, ``fsspec.config``); nothing here logs them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STALE_S = 3600.0
"""Age after which a ``data-`` prefix no manifest names counts as a dead upload and is deleted."""
WORK_MARKER = ".remote-work.json"
"""In a training work folder: the URL its checkpoints are mirrored to (read by :func:`sync_checkpoint`)."""
CHECKSUMS = "checksums.json"  # a checkpoint's commit marker (redi.train.CHECKSUMS)

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
BACKENDS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs"}
"""URL scheme -> the fsspec backend package it needs (for the error that names the fix)."""


_CHATTY = ("aiobotocore.credentials", "botocore.credentials", "botocore.configprovider")


class RemoteError(RuntimeError):
    """The object store behind ``run.artifact_root`` cannot be used (backend, endpoint, credentials, bucket)
    or failed mid-run. One line: the URL, what failed, the fix."""


def is_url(root: str | os.PathLike[str]) -> bool:
    """Whether ``root`` is an object-store URL (``file://`` is a local path)."""
    s = str(root)
    return bool(_URL.match(s)) and not s.startswith("file://")


def normalize_root(root: str | os.PathLike[str]) -> str:
    """A URL without its trailing slash, or an absolute local path (``file://`` stripped)."""
    s = str(root)
    if is_url(s):
        return s.rstrip("/")
    return str(Path(s.removeprefix("file://")).expanduser().resolve())


def default_cache_dir() -> Path:
    env = os.environ.get("REDI_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "redi"


def cache_root(url: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The local cache folder of one root URL: ``<cache_dir>/store-<sha of the URL>`` (two roots never share
    their ``runs/`` and ``results/`` mirrors)."""
    base = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return (base / f"store-{hashlib.sha256(url.encode()).hexdigest()[:12]}").resolve()


def local_root(root: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The local folder that holds ``root``'s files: the root itself, or its cache for a URL."""
    return cache_root(normalize_root(root), cache_dir) if is_url(root) else Path(normalize_root(root))


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _age(info: dict[str, Any]) -> float:
    """Seconds since an object was written (0 when the backend gives no time)."""
    t = info.get("LastModified") or info.get("mtime") or info.get("updated") or info.get("created")
    if t is None:
        return 0.0
    if hasattr(t, "timestamp"):
        t = t.timestamp()
    try:
        return time.time() - float(t)
    except (TypeError, ValueError):
        return 0.0


@dataclass
class RemoteManifest:
    """A manifest as read from the store: ``data`` None when unreadable (then ``why`` says why). ``etag``: the
    version a replacing write must still find (``sha256:<digest>`` of the bytes read)."""

    data: dict[str, Any] | None
    etag: str | None
    raw: bytes
    why: str = ""


class Remote:
    """One root URL: thin, error-translating wrappers around an fsspec file system."""

    def __init__(self, url: str):
        self.url = normalize_root(url)
        self.scheme = self.url.split("://", 1)[0]
        try:
            import fsspec

            # Listings are not cached: another machine may publish between two lookups of this process.
            self.fs, self.base = fsspec.core.url_to_fs(self.url, use_listings_cache=False)
        except ImportError as e:
            pkg = BACKENDS.get(self.scheme, f"the fsspec backend for {self.scheme}://")
            raise RemoteError(f"run.artifact_root {self.url}: {pkg} is not installed ({e}): pip install {pkg} "
                              "(for s3: pip install -e '.[s3]')") from None
        except ValueError as e:  # fsspec: unknown protocol
            raise RemoteError(f"run.artifact_root {self.url}: {e}: use a local folder or an fsspec URL "
                              "(s3://bucket/prefix, gs://..., az://...)") from None
        self.base = self.base.rstrip("/")
        for name in _CHATTY:  # "Found credentials in environment variables" on every client: not for the console
            logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger(name).level))
        self.conditional_replace = "s3" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def __repr__(self) -> str:
        return f"Remote({self.url})"

    # ------------------------------------------------------------------ errors
    def fail(self, what: str, e: BaseException) -> RemoteError:
        return RemoteError(f"object store {self.url} failed while {what} ({_one_line(e)}): check that the endpoint is up "
                           "and reachable (AWS_ENDPOINT_URL / FSSPEC_S3_ENDPOINT_URL) and the credentials "
                           "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY), then rerun: nothing unverified was trusted")

    def check(self) -> None:
        """Fail with one line unless the root can be listed (endpoint up, credentials valid, bucket present)."""
        try:
            self.fs.ls(self.base, detail=False)
            return
        except FileNotFoundError:
            if self.scheme not in BACKENDS:
                return  # no buckets (memory://, ...): an empty root is fine
        except Exception as e:
            raise self._unreachable(e) from None
        bucket = self.base.split("/", 1)[0]
        try:
            self.fs.info(bucket)
        except FileNotFoundError:
            raise RemoteError(f"run.artifact_root {self.url}: bucket {bucket!r} does not exist: create it "
                              f"(e.g. `aws s3 mb {self.scheme}://{bucket}`) or fix the URL") from None
        except Exception as e:
            raise self._unreachable(e) from None

    def _unreachable(self, e: BaseException) -> RemoteError:
        name = type(e).__name__
        if "Credential" in name or isinstance(e, PermissionError):
            fix = "set credentials in the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE) or ~/.aws"
        else:
            fix = ("check the endpoint (AWS_ENDPOINT_URL or FSSPEC_S3_ENDPOINT_URL for an S3-compatible server) and "
                   "that it is up")
        return RemoteError(f"run.artifact_root {self.url} is not reachable ({_one_line(e)}): {fix}")

    # ------------------------------------------------------------------ paths
    def path(self, *parts: str) -> str:
        return "/".join([self.base, *(p.strip("/") for p in parts if p)])

    def rel_url(self, *parts: str) -> str:
        return "/".join([self.url, *(p.strip("/") for p in parts if p)])

    # ------------------------------------------------------------------ objects
    def read_manifest(self, stage: str, key: str) -> RemoteManifest | None:
        """The committed manifest of (stage, key), or None when there is none."""
        p = self.path(stage, key, MANIFEST)
        try:
            raw = self.fs.cat_file(p)
        except FileNotFoundError:
            return None
        except Exception as e:
            raise self.fail(f"reading {stage}/{key}/{MANIFEST}", e) from None
        etag = f"sha256:{hashlib.sha256(raw).hexdigest()}"  # the version read; the ETag is asked for on replace
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or not isinstance(data.get("files"), dict) or not isinstance(data.get("data"), str):
                return RemoteManifest(None, etag, raw, "manifest lists no files or no data prefix")
        except (ValueError, UnicodeDecodeError) as e:
            return RemoteManifest(None, etag, raw, f"unreadable manifest ({type(e).__name__})")
        return RemoteManifest(data, etag, raw)

    def download(self, pairs: list[tuple[str, Path]], what: str) -> None:
        """Fetch remote paths to local files (concurrently where the backend can)."""
        if not pairs:
            return
        for _, lp in pairs:
            lp.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.fs.get([r for r, _ in pairs], [str(lp) for _, lp in pairs])
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{what}: {e}") from None
        except Exception as e:
            raise self.fail(what, e) from None

    def upload(self, pairs: list[tuple[Path, str]], what: str) -> None:
        if not pairs:
            return
        try:
            self.fs.put([str(lp) for lp, _ in pairs], [r for _, r in pairs])
        except Exception as e:
            raise self.fail(what, e) from None

    def commit(self, path: str, data: bytes, etag: str | None) -> bool:
        """Write the commit marker ``path`` only if it is still as read: absent (``etag`` None) or unchanged
        (``etag``). False when another writer got there first."""
        try:
            if etag is None:
                self.fs.pipe_file(path, data, mode="create")
                return True
            # Replacing the manifest we read (corrupt or refreshed): still the same bytes? Then overwrite it only
            # if its ETag is still the one just seen (If-Match: a third writer in between wins); a backend
            # without If-Match overwrites after the check (a small race window, see docs/caching.md).
            info = self.fs.info(path)
            if f"sha256:{hashlib.sha256(self.fs.cat_file(path)).hexdigest()}" != etag:
                return False
            if self.conditional_replace and (info.get("ETag") or info.get("etag")):
                self.fs.pipe_file(path, data, IfMatch=info.get("ETag") or info.get("etag"))
            else:
                self.fs.pipe_file(path, data)
            return True
        except FileExistsError:
            return False
        except FileNotFoundError:
            return False  # replaced marker vanished (deleted by another writer): let the caller re-read
        except OSError as e:
            if "pre-condition" in str(e).lower() or "precondition" in str(e).lower():
                return False
            raise self.fail(f"writing {path.rsplit('/', 3)[-3:]}", e) from None
        except Exception as e:
            raise self.fail("writing a manifest", e) from None

    def listdir(self, *parts: str) -> list[dict[str, Any]]:
        """Entries directly under a prefix ([] when absent)."""
        try:
            return self.fs.ls(self.path(*parts), detail=True)
        except FileNotFoundError:
            return []
        except Exception as e:
            raise self.fail(f"listing {'/'.join(parts)}", e) from None

    def find(self, *parts: str) -> dict[str, dict[str, Any]]:
        """{path relative to the prefix: info} of every object under it ({} when absent)."""
        prefix = self.path(*parts)
        try:
            found = self.fs.find(prefix, detail=True)
        except FileNotFoundError:
            return {}
        except Exception as e:
            raise self.fail(f"listing {'/'.join(parts)}", e) from None
        return {k[len(prefix) + 1:]: v for k, v in found.items() if k.startswith(prefix + "/")}

    def remove(self, *parts: str) -> None:
        """Delete a prefix and everything under it (best effort: a failure is logged, never raised)."""
        try:
            self.fs.rm(self.path(*parts), recursive=True)
        except FileNotFoundError:
            pass
        except Exception as e:
            log.warning("store: could not delete %s (%s)", self.rel_url(*parts), _one_line(e))

    # ------------------------------------------------------------------ artifacts
    def publish(self, stage: str, key: str, folder: Path, manifest: dict[str, Any], etag: str | None) -> bool:
        """Upload ``folder``'s files to ``data-<attempt>/`` then commit ``manifest`` (its ``data`` names the
        attempt). False when another builder committed first (our upload is deleted)."""
        attempt = manifest["data"]
        files = sorted(manifest["files"])
        self.upload([(folder / rel, self.path(stage, key, attempt, rel)) for rel in files], f"uploading {stage}/{key}")
        body = json.dumps(manifest, indent=2, default=str).encode()
        if self.commit(self.path(stage, key, MANIFEST), body, etag):
            self.remove_stale(stage, key, keep=attempt)
            return True
        self.remove(stage, key, attempt)
        return False

    def remove_stale(self, stage: str, key: str, keep: str) -> None:
        """Delete ``data-`` prefixes other than ``keep`` whose newest object is older than :data:`STALE_S`."""
        try:
            entries = self.listdir(stage, key)
        except RemoteError as e:
            log.warning("store: stale uploads of %s/%s not cleaned (%s)", stage, key, e)
            return
        for ent in entries:
            name = ent["name"].rstrip("/").rsplit("/", 1)[-1]
            if not name.startswith("data-") or name == keep:
                continue
            objs = self.find(stage, key, name)
            if objs and min(_age(i) for i in objs.values()) < STALE_S:
                continue  # may be a concurrent builder's upload in flight
            log.info("store: removing stale upload %s", self.rel_url(stage, key, name))
            self.remove(stage, key, name)

    def pull(self, stage: str, key: str, manifest: dict[str, Any], dest: Path, have: Path | None) -> None:
        """Fill ``dest`` with the artifact's files: hard links to identical files of ``have`` (an older local
        copy: same size and sha256 in its manifest), downloads for the rest. The caller validates."""
        old: dict[str, Any] = {}
        if have is not None and (have / MANIFEST).is_file():
            try:
                old = json.loads((have / MANIFEST).read_text()).get("files", {})
            except (OSError, ValueError):
                old = {}
        todo = []
        for rel, meta in manifest["files"].items():
            local = dest / rel
            local.parent.mkdir(parents=True, exist_ok=True)
            if old.get(rel) == meta and have is not None and (have / rel).is_file():
                try:
                    os.link(have / rel, local)
                    continue
                except OSError:
                    pass
            todo.append((self.path(stage, key, manifest["data"], rel), local))
        self.download(todo, f"downloading {stage}/{key}")

    # ------------------------------------------------------------------ mirrored folders and work
    def pull_tree(self, rel: str, local: Path, only_missing: bool = False, names: Iterable[str] = ()) -> int:
        """Download the files under prefix ``rel`` (only those called one of ``names``, when given; only those
        missing locally with ``only_missing``, for append-only folders). Returns the count."""
        todo, names = [], set(names)
        for sub, info in self.find(rel).items():
            lp = local / sub
            if info.get("type") == "directory" or lp.name.startswith(".tmp-") or (names and lp.name not in names):
                continue
            if only_missing and lp.is_file():
                continue
            todo.append((self.path(rel, sub), lp))
        self.download(todo, f"downloading {rel}")
        return len(todo)

    def push_tree(self, local: Path, rel: str, last: Iterable[str] = (), only_missing: bool = False) -> int:
        """Upload ``local``'s files to prefix ``rel`` (the names in ``last`` after all others). Returns the count."""
        if not local.is_dir():
            return 0
        have = self.find(rel) if only_missing else {}
        files = sorted(p for p in local.rglob("*") if p.is_file() and not p.name.startswith(".tmp-"))
        if only_missing:
            files = [p for p in files if p.relative_to(local).as_posix() not in have]
        late = [p for p in files if p.name in set(last)]
        early = [p for p in files if p not in late]
        for batch in (early, late):
            self.upload([(p, self.path(rel, p.relative_to(local).as_posix())) for p in batch], f"uploading {rel}")
        return len(files)


def _work_rel(stage: str, key: str) -> str:
    return f"{stage}/.work-{key}"


def attach_work(remote: Remote, stage: str, key: str, work: Path) -> None:
    """Mark ``work`` as mirrored to the store: training then uploads each checkpoint (:func:`sync_checkpoint`)
    and, before resuming, pulls the store's newest one (:func:`pull_checkpoint`). Costs no request."""
    (work / WORK_MARKER).write_text(json.dumps({"root": remote.url, "prefix": _work_rel(stage, key)}))


def _mirror(work: Path) -> tuple[Remote, str] | None:
    marker = Path(work) / WORK_MARKER
    if not marker.is_file():
        return None
    where = json.loads(marker.read_text())
    return Remote(where["root"]), where["prefix"]


def pull_checkpoint(work: Path) -> Path | None:
    """Bring the store's newest committed checkpoint into ``work`` when it is newer than every local one (a
    preempted job resuming on another machine); returns it, or None. A remote checkpoint counts only with its
    ``checksums.json`` (uploaded last); redi.train verifies every file before resuming. No-op for a work folder
    that mirrors nothing (a local artifact root)."""
    mirror = _mirror(work)
    if mirror is None:
        return None
    remote, prefix = mirror
    local = [_step(p.name) for p in work.glob("checkpoint-*") if p.is_dir() and (p / CHECKSUMS).is_file()]
    best_local = max([s for s in local if s is not None], default=-1)
    steps = [_step(e["name"].rstrip("/").rsplit("/", 1)[-1]) for e in remote.listdir(prefix)]
    for step in sorted((s for s in steps if s is not None and s > best_local), reverse=True):
        rel = f"{prefix}/checkpoint-{step}"
        objs = remote.find(rel)
        if CHECKSUMS not in objs:
            continue  # an upload killed before its commit marker
        tmp = work / f"checkpoint-{step}.pull"
        shutil.rmtree(tmp, ignore_errors=True)
        remote.download([(remote.path(rel, sub), tmp / sub) for sub in sorted(objs)], f"downloading {rel}")
        final = work / f"checkpoint-{step}"
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        log.info("resume: %s pulled from %s", final.name, remote.rel_url(prefix))
        return final
    return None


def _step(name: str) -> int | None:
    head, _, num = name.partition("-")
    return int(num) if head == "checkpoint" and num.isdigit() else None


def sync_checkpoint(work: Path, checkpoint: Path) -> None:
    """Upload a just-saved checkpoint (``checksums.json`` last) to the store ``work`` mirrors (see
    :func:`attach_work`) and delete the remote checkpoints no longer kept locally. No-op for a work folder
    that mirrors nothing (a local artifact root)."""
    mirror = _mirror(work)
    if mirror is None:
        return
    remote, prefix = mirror
    url = remote.rel_url(prefix)
    t0 = time.time()
    remote.push_tree(checkpoint, f"{prefix}/{checkpoint.name}", last=(CHECKSUMS,))
    kept = {p.name for p in Path(work).glob("checkpoint-*") if p.is_dir()}
    for ent in remote.listdir(prefix):
        name = ent["name"].rstrip("/").rsplit("/", 1)[-1]
        if _step(name) is not None and name not in kept:
            remote.remove(prefix, name)
    log.info("checkpoint %s mirrored to %s/%s (%.1fs)", checkpoint.name, url, checkpoint.name, time.time() - t0)
