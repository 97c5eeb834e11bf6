"""Artifact roots on S3 against a real S3-protocol server: moto's standalone server, started here on 127.0.0.1.

Every test talks HTTP to that server through s3fs/aiobotocore (endpoint and credentials from the environment,
as a user's would be): a round trip, a build SIGKILLed between two uploaded files, a corrupted object, a
missing manifest, two builders of one key in two processes, the server going away mid-run, the errors a
user sees before any work, training resumed in a fresh working folder from checkpoints on the store, and
the tiny recipe's DAG end to end (the demo DAG on s3 is in the slow tier).
"""

from __future__ import annotations

import importlib.util
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("s3fs", reason="the s3 extra (s3fs) is not installed")
# Only looked up, not imported: moto.server imports flask, whose request proxies break an in-process vLLM
# started later in the same pytest process (vLLM's dispatcher probes every module's globals).
if importlib.util.find_spec("moto") is None or importlib.util.find_spec("flask") is None:
    pytest.skip("moto[server] (dev extra) is not installed", allow_module_level=True)

from conftest_orchestration import REPO, redi_argv, subprocess_env, write_recipe  # noqa: E402

from redi import storage  # noqa: E402
from redi.artifacts import ArtifactStore  # noqa: E402
from redi.storage import RemoteError  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_moto(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=2)
            return proc
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"moto server did not start on port {port}") from None
            time.sleep(0.1)


@pytest.fixture(scope="module")
def moto_port():
    port = _free_port()
    proc = _start_moto(port)
    yield port
    proc.kill()
    proc.wait()


def _clear_fs_cache() -> None:
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


def _use_endpoint(monkeypatch, port: int) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "FSSPEC_S3_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    _clear_fs_cache()  # s3fs instances are cached by their arguments, not by the environment


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    """Stores opened without a cache_dir (registered_runs, nightly) cache under tmp_path, never in ~/.cache."""
    monkeypatch.setenv("REDI_CACHE_DIR", str(tmp_path / "default-cache"))


def _fail_fast(monkeypatch) -> None:
    """One try per request (s3fs retries 5 times with back-off, botocore again): a dead endpoint fails in seconds."""
    import fsspec
    import s3fs

    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    monkeypatch.setitem(fsspec.config.conf, "s3", {"config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}})
    _clear_fs_cache()


def _bucket(name: str) -> None:
    import s3fs

    s3fs.S3FileSystem().mkdir(name)


@pytest.fixture
def s3(moto_port, monkeypatch, request):
    """A fresh bucket on the module's server; yields the root URL ``s3://<bucket>/root``."""
    _use_endpoint(monkeypatch, moto_port)
    bucket = f"t{time.time_ns()}"
    _bucket(bucket)
    yield f"s3://{bucket}/root"
    _clear_fs_cache()


def _fs():
    import s3fs

    return s3fs.S3FileSystem()


def _writer(payload: str, calls: list | None = None):
    def fn(out: Path, work: Path) -> dict:
        if calls is not None:
            calls.append(payload)
        (out / "a.txt").write_text(payload)
        (out / "sub").mkdir()
        (out / "sub" / "b.bin").write_bytes(payload.encode() * 1000)
        (out / "c.json").write_text(json.dumps({"p": payload}))
        return {"n": len(payload)}

    return fn


def _manifest(url: str, stage: str, key: str) -> dict:
    return json.loads(_fs().cat_file(f"{url.removeprefix('s3://')}/{stage}/{key}/manifest.json"))


def _prefixes(url: str, stage: str, key: str) -> list[str]:
    fs = _fs()
    fs.invalidate_cache()
    return sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{url.removeprefix('s3://')}/{stage}/{key}", detail=False)
                  if p.rsplit("/", 1)[-1].startswith("data-"))


# ------------------------------------------------------------------ round trip
def test_round_trip_between_two_caches(s3, tmp_path, monkeypatch):
    calls: list = []
    a = ArtifactStore(s3, tmp_path / "m1").build("verify", "k", _writer("hello", calls), config={"x": 1})
    assert not a.cached and calls == ["hello"] and Path(a.path).is_relative_to(tmp_path / "m1")
    m = _manifest(s3, "verify", "k")
    assert set(m["files"]) == {"a.txt", "sub/b.bin", "c.json"} and m["data"].startswith("data-")
    assert _prefixes(s3, "verify", "k") == [m["data"]]

    other = ArtifactStore(s3, tmp_path / "m2")  # another machine: empty cache
    assert other.has("verify", "k")
    b = other.lookup("verify", "k")
    assert b.cached and b.manifest["files"] == a.manifest["files"]
    assert (b.dir / "sub" / "b.bin").read_bytes() == (a.dir / "sub" / "b.bin").read_bytes()
    again = other.build("verify", "k", _writer("never", calls))
    assert again.cached and calls == ["hello"]

    # a cache that holds the committed manifest's files is a hit without downloading a byte
    monkeypatch.setattr(storage.Remote, "download", lambda *a, **k: pytest.fail("downloaded a cached artifact"))
    assert ArtifactStore(s3, tmp_path / "m2").lookup("verify", "k").cached


# ------------------------------------------------------------------ kill mid-upload
_CHILD_KILLED = r"""
import sys, time
from pathlib import Path
from redi import storage
from redi.artifacts import ArtifactStore
url, cache, marker = sys.argv[1:4]
real = storage.Remote.upload
def one_by_one(self, pairs, what):
    for i, pair in enumerate(pairs):
        real(self, [pair], what)
        if i == 0:
            Path(marker).write_text("one file uploaded")
            time.sleep(120)
storage.Remote.upload = one_by_one
def fn(out, work):
    (out / "a.txt").write_text("first")
    (out / "b.txt").write_text("second")
    (out / "c.txt").write_text("third")
    return {}
ArtifactStore(url, cache).build("sft", "k", fn)
"""


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 90) -> None:
    deadline = time.time() + seconds
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"child exited with {proc.returncode} before {path.name}: {proc.stderr.read()}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"child did not reach {path.name}")
        time.sleep(0.05)


def test_build_killed_mid_upload_is_not_trusted(s3, tmp_path, monkeypatch, caplog):
    marker = tmp_path / "uploading"
    proc = subprocess.Popen([sys.executable, "-c", _CHILD_KILLED, s3, str(tmp_path / "c1"), str(marker)],
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    _wait_for(marker, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    [partial] = _prefixes(s3, "sft", "k")  # one file of the attempt is on the store, no manifest
    assert len(_fs().find(f"{s3.removeprefix('s3://')}/sft/k/{partial}")) == 1
    store = ArtifactStore(s3, tmp_path / "c1")  # same machine, same cache: its .tmp- folder is no artifact
    assert not store.has("sft", "k") and store.lookup("sft", "k") is None
    calls: list = []
    monkeypatch.setattr(storage, "STALE_S", 0.0)  # the dead upload is old enough to be cleaned after a publish
    art = store.build("sft", "k", _writer("rebuilt", calls))
    assert calls == ["rebuilt"] and not art.cached
    assert _prefixes(s3, "sft", "k") == [_manifest(s3, "sft", "k")["data"]] != [partial]
    assert not list((tmp_path / "c1" ).rglob(".tmp-*"))


def test_young_partial_upload_is_ignored_and_kept(s3, tmp_path):
    """A data- prefix without a manifest that is younger than STALE_S may be a builder in flight: ignored, kept."""
    _fs().pipe_file(f"{s3.removeprefix('s3://')}/download/k/data-inflight/a.txt", b"partial")
    store = ArtifactStore(s3, tmp_path / "c")
    assert store.lookup("download", "k") is None
    art = store.build("download", "k", _writer("full"))
    assert (art.dir / "a.txt").read_text() == "full"
    assert _prefixes(s3, "download", "k") == sorted(["data-inflight", art.manifest["data"]])


# ------------------------------------------------------------------ corrupt object, missing manifest
def test_corrupted_object_is_detected_and_rebuilt(s3, tmp_path, caplog):
    a = ArtifactStore(s3, tmp_path / "m1").build("verify", "k", _writer("hello"))
    data = a.manifest["data"]
    obj = f"{s3.removeprefix('s3://')}/verify/k/{data}/sub/b.bin"
    raw = bytearray(_fs().cat_file(obj))
    raw[len(raw) // 2] ^= 0x01  # one bit, same size
    _fs().pipe_file(obj, bytes(raw))

    calls: list = []
    other = ArtifactStore(s3, tmp_path / "m2")
    with caplog.at_level("WARNING", logger="redi.artifacts"):
        assert other.lookup("verify", "k") is None
    assert "sub/b.bin checksum mismatch" in caplog.text and f"{s3}/verify/k" in caplog.text
    assert not (tmp_path / "m2" / other.root.name / "verify" / "k").exists()  # nothing unverified in the cache
    b = other.build("verify", "k", _writer("hello", calls))
    assert calls == ["hello"] and not b.cached
    assert _manifest(s3, "verify", "k")["data"] != data  # the manifest was replaced (If-Match on the old one)
    # the first machine's cache holds the old commit: it takes the new one, reusing its unchanged files
    c = ArtifactStore(s3, tmp_path / "m1").lookup("verify", "k")
    assert c.manifest["data"] == b.manifest["data"] and (c.dir / "sub" / "b.bin").read_bytes() == b"hello" * 1000


def test_missing_manifest_is_not_trusted(s3, tmp_path):
    store = ArtifactStore(s3, tmp_path / "m1")
    store.build("model", "k", _writer("v1"))
    _fs().rm(f"{s3.removeprefix('s3://')}/model/k/manifest.json")
    # the local cache still holds a complete, valid copy: the store is the truth, so it is not trusted
    assert store.lookup("model", "k") is None and not store.has("model", "k")
    calls: list = []
    art = store.build("model", "k", _writer("v2", calls))
    assert calls == ["v2"] and (art.dir / "a.txt").read_text() == "v2"


def test_unreadable_manifest_is_rebuilt(s3, tmp_path):
    store = ArtifactStore(s3, tmp_path / "m1")
    store.build("model", "k", _writer("v1"))
    _fs().pipe_file(f"{s3.removeprefix('s3://')}/model/k/manifest.json", b"{\"truncated")
    assert ArtifactStore(s3, tmp_path / "m2").lookup("model", "k") is None
    art = ArtifactStore(s3, tmp_path / "m2").build("model", "k", _writer("v2"))
    assert (art.dir / "a.txt").read_text() == "v2" and _manifest(s3, "model", "k")["data"] == art.manifest["data"]


# ------------------------------------------------------------------ two builders of one key
_CHILD_RACE = r"""
import json, sys, time
from pathlib import Path
from redi.artifacts import ArtifactStore
url, cache, me, ready, go = sys.argv[1:6]
def fn(out, work):
    Path(ready).write_text("ready")
    while not Path(go).exists():
        time.sleep(0.02)
    for name in ("a.txt", "b.txt", "c.txt"):
        (out / name).write_text(me * 50)
    return {"builder": me}
art = ArtifactStore(url, cache).build("evaluate", "k", fn)
print(json.dumps({"cached": art.cached, "a": (art.dir / "a.txt").read_text(), "summary": art.summary}))
"""


def test_two_concurrent_builders_of_one_key(s3, tmp_path):
    """Two machines (two caches) build one key at once with different bytes: one manifest wins, the other
    builder drops its upload and returns the winner's artifact; the store holds one complete attempt."""
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD_RACE, s3, str(tmp_path / f"cache{i}"), name,
                               str(tmp_path / f"ready{i}"), str(go)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=REPO) for i, name in enumerate("XY")]
    for i, p in enumerate(procs):
        _wait_for(tmp_path / f"ready{i}", p)
    go.write_text("go")  # both are past their lookup and build now
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert outs[0]["a"] == outs[1]["a"]  # both return the same (the winner's) content
    winner = outs[0]["a"][0]
    assert sorted(o["cached"] for o in outs) == [False, True]  # the loser's result is the winner's, from the store
    m = _manifest(s3, "evaluate", "k")
    assert m["summary"] == {"builder": winner}
    assert _prefixes(s3, "evaluate", "k") == [m["data"]]  # the loser deleted its own upload
    fresh = ArtifactStore(s3, tmp_path / "cache3").lookup("evaluate", "k")
    assert (fresh.dir / "c.txt").read_text() == winner * 50


# ------------------------------------------------------------------ the server going away
class _Proxy:
    """A TCP forwarder to the moto server that can drop every connection and stop listening (the endpoint
    goes away) and come back on the same port."""

    def __init__(self, target: int):
        self.target, self.port = target, _free_port()
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.start()

    def start(self) -> None:
        self.srv = socket.socket()
        self.srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.srv.bind(("127.0.0.1", self.port))
        self.srv.listen(64)
        threading.Thread(target=self._accept, args=(self.srv,), daemon=True).start()

    def _accept(self, srv: socket.socket) -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            u = socket.create_connection(("127.0.0.1", self.target))
            with self.lock:
                self.conns += [c, u]
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def stop(self) -> None:
        self.srv.close()
        with self.lock:
            for c in self.conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                    c.close()
                except OSError:
                    pass
            self.conns.clear()


def test_server_going_away_mid_run(moto_port, monkeypatch, tmp_path):
    _fail_fast(monkeypatch)
    proxy = _Proxy(moto_port)
    _use_endpoint(monkeypatch, proxy.port)
    bucket = f"t{time.time_ns()}"
    _bucket(bucket)
    url = f"s3://{bucket}/root"
    store = ArtifactStore(url, tmp_path / "c")
    store.build("download", "k1", _writer("one"))

    def fn(out, work):
        _writer("two")(out, work)
        proxy.stop()  # the endpoint disappears while the stage finishes
        return {}

    t0 = time.time()
    with pytest.raises(RemoteError) as e:
        store.build("model", "k2", fn)
    msg = str(e.value)
    assert "\n" not in msg and url in msg and "AWS_ENDPOINT_URL" in msg and "nothing unverified was trusted" in msg
    assert time.time() - t0 < 60
    assert not store.dir("model", "k2").exists() and not list(store.dir("model", "k2").parent.glob(".tmp-*"))
    with pytest.raises(RemoteError, match="not reachable"):  # a new run fails at once, before any work
        ArtifactStore(url, tmp_path / "c2")

    proxy.start()  # back: the rerun completes
    _clear_fs_cache()
    calls: list = []
    again = ArtifactStore(url, tmp_path / "c")
    assert again.build("download", "k1", _writer("x", calls)).cached
    art = again.build("model", "k2", _writer("two", calls))
    assert calls == ["two"] and not art.cached and again.has("model", "k2")
    proxy.stop()


# ------------------------------------------------------------------ errors before any work
def test_errors_before_any_work(moto_port, monkeypatch, tmp_path):
    _fail_fast(monkeypatch)
    _use_endpoint(monkeypatch, moto_port)
    with pytest.raises(RemoteError, match=r"bucket 'nobucket' does not exist: create it"):
        ArtifactStore("s3://nobucket/root", tmp_path)
    _use_endpoint(monkeypatch, _free_port())  # nothing listens there
    with pytest.raises(RemoteError, match=r"s3://b/root is not reachable .*AWS_ENDPOINT_URL"):
        ArtifactStore("s3://b/root", tmp_path)
    with pytest.raises(RemoteError, match=r"gcsfs is not installed|unknown protocol|gs://"):
        ArtifactStore("gs://b/root", tmp_path)


def test_cli_one_line_errors_for_missing_backend_and_endpoint(tmp_path):
    """`redi status` with the root on s3: s3fs missing (hidden from the interpreter) or the endpoint down is one
    line naming the URL and the fix; the credentials never appear."""
    recipe = write_recipe(tmp_path, {"run.artifact_root": "s3://bkt/root", "run.cache_dir": str(tmp_path / "cache")})
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['s3fs'] = None\n")
    secret = "sekrit-key-123"
    env = subprocess_env(AWS_ENDPOINT_URL=f"http://127.0.0.1:{_free_port()}", AWS_ACCESS_KEY_ID="AKIA-test",
                         AWS_SECRET_ACCESS_KEY=secret, PYTHONPATH=str(hide))
    r = subprocess.run(redi_argv("status", str(recipe)), env=env, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "s3://bkt/root" in r.stderr and "s3fs is not installed" in r.stderr and "pip install" in r.stderr
    env["PYTHONPATH"] = ""
    env["FSSPEC_S3"] = json.dumps({"config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}})
    r = subprocess.run(redi_argv("status", str(recipe)), env=env, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0, r.stderr
    assert r.stderr.startswith("redi: ") and "Traceback" not in r.stderr
    assert "s3://bkt/root is not reachable" in r.stderr and "AWS_ENDPOINT_URL" in r.stderr
    assert secret not in r.stderr + r.stdout
    r = subprocess.run(redi_argv("run", str(recipe)), env=env, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr  # a bad input, before Prefect starts
    assert "s3://bkt/root is not reachable" in r.stderr and secret not in r.stderr + r.stdout


# ------------------------------------------------------------------ pipeline and training on s3
def _tiny(tmp_path: Path, url: str, cache: str, **over) -> object:
    from redi.config import load_recipe

    return load_recipe(write_recipe(tmp_path, {"run.artifact_root": url, "run.cache_dir": str(tmp_path / cache), **over},
                                    name=f"{cache}.yaml"))


def test_tiny_dag_end_to_end_on_s3(s3, tmp_path):
    """The tiny recipe's full DAG (the REDI model evaluated) with its root on s3; a second machine (fresh
    cache) sees every node as committed, gets them from the store without building, and finds the registered
    run and the results."""
    from redi import runs
    from redi.pipeline import Pipeline

    out = Pipeline(_tiny(tmp_path, s3, "m1", **{"evaluate.models": ["redi"]})).run()
    assert out["report"]["registered"]
    fs = _fs()
    root = s3.removeprefix("s3://")
    latest = json.loads(fs.cat_file(f"{root}/runs/tiny/latest.json"))
    assert set(latest["models"]) == {"redi"}
    assert fs.find(f"{root}/results")  # the results store's parts are on the store

    second = Pipeline(_tiny(tmp_path, s3, "m2", **{"evaluate.models": ["redi"]}))
    assert all(n.cached for n in second.plan())  # committed on the store (nothing downloaded yet)
    sft = second.sft()  # pulled with its upstream, verified, not built
    assert sft.cached and all(a.cached for a in second.nodes.values()) and (sft.dir / "model").is_dir()
    [reg] = runs.registered_runs(s3)
    assert reg.name == "tiny" and reg.latest["recipe_hash"] == latest["recipe_hash"]
    nightly = runs.nightly_recipe(reg, s3)
    assert nightly.run.artifact_root == s3 and nightly.run.cache_dir is None  # this machine's default cache


class _Preempted(RuntimeError):
    pass


def test_training_resumes_from_a_checkpoint_on_s3_in_a_fresh_folder(s3, tmp_path, monkeypatch):
    """SFT is preempted after step 2 on one machine; another machine (fresh cache, fresh working folder) pulls
    checkpoint-2 from the store, resumes there and ends with the weights of an uninterrupted run."""
    from safetensors.torch import load_file

    from redi import train as T
    from redi.pipeline import Pipeline

    r1 = _tiny(tmp_path, s3, "m1")
    p1 = Pipeline(r1)
    p1.verify()
    key = p1.key("sft")

    def preempt(step: int) -> None:
        if step == 2:
            raise _Preempted("node lost after step 2")

    monkeypatch.setattr(T, "CHECKPOINT_HOOKS", [preempt])
    with pytest.raises(_Preempted):
        p1.sft()
    monkeypatch.setattr(T, "CHECKPOINT_HOOKS", [])
    work = f"{s3.removeprefix('s3://')}/sft/.work-{key}"
    fs = _fs()
    fs.invalidate_cache()
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(work, detail=False))
    assert "checkpoint-2" in names and fs.exists(f"{work}/checkpoint-2/checksums.json")

    other_dir = tmp_path / "other"
    other_dir.mkdir()
    monkeypatch.chdir(other_dir)
    p2 = Pipeline(_tiny(tmp_path, s3, "m2"))
    assert p2.key("sft") == key
    art = p2.sft()
    assert not art.cached and art.summary["resumed_from_step"] == 2
    fs.invalidate_cache()
    assert not fs.exists(work)  # the store's work folder is deleted once the artifact is published

    straight = Pipeline(_tiny(tmp_path, str(tmp_path / "local-root"), "m3")).sft()
    assert straight.summary.get("resumed_from_step", 0) == 0
    a, b = load_file(straight.dir / "model" / "model.safetensors"), load_file(art.dir / "model" / "model.safetensors")
    assert a.keys() == b.keys() and max(float((a[k].float() - b[k].float()).abs().max()) for k in a) < 1e-6


@pytest.mark.slow
def test_demo_dag_on_s3(s3, tmp_path):
    """The demo recipe (redi/recipes/demo.yaml) end to end with its root on s3, then again from a fresh cache:
    every node from the store."""
    from redi.config import load_recipe
    from redi.pipeline import Pipeline

    demo = REPO / "redi" / "recipes" / "demo.yaml"
    sets = [f"run.artifact_root={s3}", f"run.cache_dir={tmp_path / 'm1'}"]
    out = Pipeline(load_recipe(demo, sets)).run()
    assert out["report"]["registered"]
    second = Pipeline(load_recipe(demo, [f"run.artifact_root={s3}", f"run.cache_dir={tmp_path / 'm2'}"]))
    again = second.run()
    assert all(a.cached for a in second.nodes.values())
    assert again["report"]["table_markdown"] == out["report"]["table_markdown"]
