"""The content-addressed store: validated hits, corrupt artifacts rebuilt, atomic writes, per-key locking."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest

from redi.artifacts import ArtifactStore, CorruptArtifact, code_version, stage_key, validate


def _writer(payload: str):
    def fn(out: Path, work: Path) -> dict:
        (out / "data.txt").write_text(payload)
        (out / "sub").mkdir()
        (out / "sub" / "x.json").write_text(json.dumps({"p": payload}))
        return {"rows": len(payload)}

    return fn


def test_build_then_hit(tmp_path):
    store = ArtifactStore(tmp_path)
    calls = []

    def fn(out, work):
        calls.append(1)
        return _writer("abc")(out, work)

    a = store.build("download", "k1", fn, config={"x": 1})
    assert not a.cached and calls == [1]
    assert a.summary == {"rows": 3}
    assert set(a.manifest["files"]) == {"data.txt", "sub/x.json"}
    assert "torch" in a.manifest["versions"] or "python" in a.manifest["versions"]
    b = store.build("download", "k1", fn)
    assert b.cached and calls == [1]
    assert b.path == a.path
    # no temp or work folders left behind
    assert sorted(p.name for p in (tmp_path / "download").iterdir()) == [".locks", "k1"]


def test_corrupt_artifact_is_rebuilt(tmp_path):
    store = ArtifactStore(tmp_path)
    a = store.build("verify", "k", _writer("hello"))
    (a.dir / "data.txt").write_text("hellp")  # same size, different content
    with pytest.raises(CorruptArtifact, match="checksum"):
        validate(a.dir)
    assert store.lookup("verify", "k") is None
    b = store.build("verify", "k", _writer("hello"))
    assert not b.cached and (b.dir / "data.txt").read_text() == "hello"


def test_missing_manifest_or_file_is_not_trusted(tmp_path):
    store = ArtifactStore(tmp_path)
    a = store.build("sft", "k", _writer("x"))
    (a.dir / "sub" / "x.json").unlink()
    assert store.lookup("sft", "k") is None
    (a.dir / "manifest.json").unlink()
    assert store.lookup("sft", "k") is None


def test_refresh_forces_rebuild(tmp_path):
    store = ArtifactStore(tmp_path)
    store.build("redi", "k", _writer("1"))
    b = store.build("redi", "k", _writer("22"), refresh=True)
    assert not b.cached and (b.dir / "data.txt").read_text() == "22"


def test_failed_build_leaves_nothing_trusted(tmp_path):
    store = ArtifactStore(tmp_path)

    def boom(out, work):
        (out / "half.txt").write_text("half")
        raise RuntimeError("stage failed")

    with pytest.raises(RuntimeError, match="stage failed"):
        store.build("evaluate", "k", boom)
    assert store.lookup("evaluate", "k") is None
    assert not list((tmp_path / "evaluate").glob(".tmp-*"))


def _slow_build(root: str, marker: str) -> None:
    store = ArtifactStore(root)

    def fn(out, work):
        (work / "checkpoint").write_text("step 1")
        (out / "big.txt").write_text("partial")
        Path(marker).write_text("started")
        time.sleep(60)
        return {}

    store.build("sft", "k", fn)


def test_sigkill_mid_build_then_resume(tmp_path):
    marker = tmp_path / "started"
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_slow_build, args=(str(tmp_path / "store"), str(marker)))
    p.start()
    for _ in range(600):
        if marker.exists():
            break
        time.sleep(0.05)
    assert marker.exists(), "child never started building"
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    store = ArtifactStore(tmp_path / "store")
    assert store.lookup("sft", "k") is None  # the half-written folder is not an artifact
    assert list((tmp_path / "store" / "sft").glob(".tmp-k-*"))
    seen = {}

    def fn(out, work):
        seen["ckpt"] = (work / "checkpoint").read_text()  # work_dir survives the kill (resume point)
        (out / "big.txt").write_text("complete")
        return {}

    a = store.build("sft", "k", fn)
    assert seen["ckpt"] == "step 1"
    assert (a.dir / "big.txt").read_text() == "complete"
    assert not list((tmp_path / "store" / "sft").glob(".tmp-*")), "stale temp folder not cleaned"
    assert not (tmp_path / "store" / "sft" / ".work-k").exists()


def _concurrent(root: str, out_q) -> None:
    store = ArtifactStore(root)

    def fn(out, work):
        time.sleep(1.0)
        (out / "pid.txt").write_text(str(os.getpid()))
        return {}

    a = store.build("download", "same", fn)
    out_q.put((os.getpid(), a.cached, (a.dir / "pid.txt").read_text()))


def test_two_runs_of_same_key_do_not_collide(tmp_path):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_concurrent, args=(str(tmp_path), q)) for _ in range(2)]
    for p in procs:
        p.start()
    res = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join()
    assert sorted(r[1] for r in res) == [False, True]  # one built, the other waited and took it from cache
    assert len({r[2] for r in res}) == 1  # both see the same, complete artifact
    validate(tmp_path / "download" / "same")


def test_keys_depend_on_exactly_their_inputs():
    k = stage_key("sft", {"lr": 1e-3}, {"verify": "a"}, "c1")
    assert k == stage_key("sft", {"lr": 1e-3}, {"verify": "a"}, "c1")
    assert k != stage_key("sft", {"lr": 2e-3}, {"verify": "a"}, "c1")
    assert k != stage_key("sft", {"lr": 1e-3}, {"verify": "b"}, "c1")
    assert k != stage_key("sft", {"lr": 1e-3}, {"verify": "a"}, "c2")
    assert k != stage_key("redi", {"lr": 1e-3}, {"verify": "a"}, "c1")


def test_code_version_tracks_source():
    a = code_version(["redi.artifacts"])
    assert a == code_version(["redi.artifacts"])
    assert a != code_version(["redi.artifacts", "redi.schema"])
    with pytest.raises(ValueError, match="not found"):
        code_version(["redi.no_such_module"])


def test_code_version_follows_package_imports_transitively():
    from redi.artifacts import module_closure

    train = module_closure(["redi.train"], ["redi.config"])
    assert {"redi.train", "redi.losses", "redi.packing", "redi.prompts"} <= set(train)
    assert {"redi.train_checkpoints", "redi.train_report"} <= set(train)  # a split module still keys training
    assert not any(m.startswith("redi.config") for m in train)
    ev = module_closure(["redi.evaluate"], ["redi.config", "redi.grader", "redi.metrics"])
    assert "redi.generate" in ev and "redi.grader" not in ev  # the grader is keyed by the grade step
    assert {"redi.generate_hf", "redi.generate_vllm", "redi.generate_engine"} <= set(ev)  # backends key evaluation
    grade = module_closure(["redi.grader", "redi.gradepool", "redi.metrics"], ["redi.config"])
    assert {"redi.gradebatch", "redi.gradeworker"} <= set(grade)  # the pool's split modules key grading
    # registries the configs read (so reached through redi.config, which is left out) still key their stages
    assert "redi.sources" in module_closure(["redi.data"], ["redi.config"])
    assert "redi.label_rules" in module_closure(["redi.verify"], ["redi.config"])
    assert "redi.benchmarks" in ev


def test_url_root_through_fsspec_memory(tmp_path):
    """A URL root (fsspec's in-process memory://, the generic backend path): a build is published with its
    manifest naming its data prefix, a second machine (another cache folder) pulls and verifies it, and a
    corrupt remote object makes the next lookup rebuild and replace the manifest."""
    import fsspec

    url = f"memory://redi-test-{os.getpid()}-{time.time_ns()}"
    a = ArtifactStore(url, cache_dir=tmp_path / "m1").build("verify", "k", _writer("payload"))
    assert not a.cached and a.dir.is_relative_to(tmp_path / "m1")
    fs = fsspec.filesystem("memory")
    base = url.removeprefix("memory://")
    manifest = json.loads(fs.cat_file(f"{base}/verify/k/manifest.json"))
    assert set(manifest["files"]) == {"data.txt", "sub/x.json"}
    assert fs.cat_file(f"{base}/verify/k/{manifest['data']}/data.txt") == b"payload"

    other = ArtifactStore(url, cache_dir=tmp_path / "m2")
    b = other.lookup("verify", "k")
    assert b is not None and b.cached and (b.dir / "sub" / "x.json").read_text() == (a.dir / "sub" / "x.json").read_text()

    fs.pipe_file(f"{base}/verify/k/{manifest['data']}/data.txt", b"paylaod")  # same size, other bytes
    third = ArtifactStore(url, cache_dir=tmp_path / "m3")
    assert third.lookup("verify", "k") is None
    c = third.build("verify", "k", _writer("payload"))
    assert not c.cached and json.loads(fs.cat_file(f"{base}/verify/k/manifest.json"))["data"] != manifest["data"]
    assert ArtifactStore(url, cache_dir=tmp_path / "m4").lookup("verify", "k") is not None
    fs.rm(base, recursive=True)


# ------------------------------------------------------------------ full disk, read-only root (injected errors)


def _enospc(path):
    import errno

    return OSError(errno.ENOSPC, "No space left on device", str(path))


def test_enospc_in_a_build_is_one_line_and_leaves_nothing(tmp_path):
    from redi.artifacts import StorageError

    store = ArtifactStore(tmp_path)

    def fn(out, work):
        (out / "half.bin").write_bytes(b"x" * (3 << 20))
        raise _enospc(out / "half.bin")

    with pytest.raises(StorageError) as e:
        store.build("verify", "k", fn)
    assert str(e.value).startswith(f"no space left in {tmp_path / 'verify'} (needs more than the 3 MB written when it failed, ")
    assert str(e.value).endswith(" MB free): free space or set run.artifact_root elsewhere")
    assert isinstance(e.value.__cause__, OSError)
    assert store.lookup("verify", "k") is None and not list((tmp_path / "verify").glob(".tmp-*"))


def test_enospc_writing_the_manifest_leaves_nothing(tmp_path, monkeypatch):
    import redi.artifacts as A

    store = ArtifactStore(tmp_path)
    real = Path.write_text

    def full(self, *a, **k):
        if self.name == "manifest.json":
            real(self, "{")  # a partial write
            raise _enospc(self)
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(A.StorageError, match="no space left in"):
        store.build("verify", "k", _writer("abc"))
    monkeypatch.setattr(Path, "write_text", real)
    assert not (tmp_path / "verify" / "k").exists() and not list((tmp_path / "verify").glob(".tmp-*"))
    assert not store.build("verify", "k", _writer("abc")).cached  # the next run builds it


def test_read_only_root_serves_hits_without_a_lock(tmp_path, monkeypatch, caplog):
    import errno

    from redi.artifacts import StorageError

    store = ArtifactStore(tmp_path)
    store.build("download", "k1", _writer("abc"))

    def read_only(self, stage, key):
        raise OSError(errno.EROFS, "Read-only file system", str(self.root / stage / ".locks"))

    monkeypatch.setattr(ArtifactStore, "_lock", read_only)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with caplog.at_level("INFO", logger="redi.artifacts"):
        hit = store.build("download", "k1", _writer("zzz"))
    assert hit.cached and hit.summary == {"rows": 3} and "read-only root, no lock" in caplog.text
    with pytest.raises(StorageError, match=rf"^{tmp_path / 'download'} is not writable and download k2 must be built "
                                          r"\(it is not cached\): set run.artifact_root to a writable folder$"):
        store.build("download", "k2", _writer("abc"))
    with pytest.raises(StorageError, match="--refresh asks to rebuild it"):
        store.build("download", "k1", _writer("abc"), refresh=True)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing created


def test_cli_names_the_folder_of_an_oserror_enospc():
    from redi.cli import user_error

    line = user_error(_enospc("/nonexistent-x/artifacts/sft/model.safetensors"))
    assert line.startswith("no space left in /nonexistent-x/artifacts/sft (") and " MB free): free space" in line
