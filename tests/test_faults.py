"""Faults: SIGKILL mid-stage then rerun, two runs of one recipe at once, a corrupt artifact, a full disk,
a read-only artifact root.

The kill and concurrency tests run the real `redi` CLI (``--no-prefect``) in subprocesses on the
tiny recipe, so they are marked slow (about a minute each on 2 busy cores). The full disk is a real 400 kB
tmpfs and the read-only root a real read-only bind mount: both need root (``mount``) and are skipped
without it; ``tests/test_artifacts.py`` covers the same paths by injected errors everywhere.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest_orchestration import redi_argv, subprocess_env, write_recipe

from redi.artifacts import validate  # noqa: E402
from redi.cli import main  # noqa: E402


def _status(recipe: Path) -> dict[str, dict]:
    p = subprocess.run(redi_argv("status", str(recipe), "--json"), capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return {n["stage"]: n for n in json.loads(p.stdout)}


def _wait_for(pred, proc: subprocess.Popen, timeout: float) -> None:
    t0 = time.time()
    while not pred():
        assert proc.poll() is None, f"process ended (rc {proc.returncode}) before the stage started"
        assert time.time() - t0 < timeout, "timed out waiting for the stage"
        time.sleep(0.05)


def _kill_group_when(pred, proc: subprocess.Popen, timeout: float = 300) -> None:
    """kill -9 the process group of ``proc`` once ``pred()`` holds (and in any case before returning)."""
    try:
        _wait_for(pred, proc, timeout=timeout)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
def test_sigkill_during_training_then_rerun_resumes(tmp_path):
    recipe = write_recipe(tmp_path, {"sft.max_steps": 12, "sft.save_steps": 1})
    root = tmp_path / "artifacts"
    env = subprocess_env()
    proc = subprocess.Popen(redi_argv("run", str(recipe), "--no-prefect"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    # kill -9 once SFT has written its first complete checkpoint (mid-stage); a "checkpoint-N.tmp" being
    # written does not count: killed then, the rerun rightly starts from scratch
    _kill_group_when(lambda: any(c.suffix != ".tmp" and (c / "trainer_state.json").exists()
                                 for c in (root / "sft").glob(".work-*/checkpoint-*")), proc)
    before = _status(recipe)
    assert all(before[s]["cached"] for s in ("download", "model", "verify"))
    assert not before["sft"]["cached"] and not Path(before["sft"]["path"]).exists()  # nothing half-written in place
    assert any((root / "sft").glob(".tmp-*"))  # the killed attempt's temp folder

    p = subprocess.run(redi_argv("run", str(recipe), "--no-prefect"), capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = {line.split()[0]: line.split()[1:3] for line in p.stdout.splitlines() if line.split() and line.split()[0] in before}
    assert rows["download"][0] == rows["model"][0] == rows["verify"][0] == "cache"  # "cache hit"
    assert rows["sft"][0] == "built"
    after = _status(recipe)
    assert all(n["cached"] for n in after.values())
    manifest = validate(Path(after["sft"]["path"]))
    assert manifest["summary"].get("resumed_from_step", 0) >= 1  # resumed from its checkpoint, not from scratch
    assert not list((root / "sft").glob(".tmp-*")) and not list((root / "sft").glob(".work-*"))


_KILL_CASES = {  # stage -> (overrides that make it last a few seconds, the command that runs it)
    "download": ({"data.synth.n_train": 20000}, ["stage", "download"]),
    "verify": ({"data.synth.n_train": 2000}, ["run"]),
    "redi": ({"redi.max_steps": 40}, ["run"]),
    "evaluate": ({"evaluate.n_samples": 8, "evaluate.max_new_tokens": 256}, ["run"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(_KILL_CASES))
def test_sigkill_during_a_stage_then_rerun(tmp_path, stage):
    """kill -9 of the whole process group while ``stage`` builds (its temp folder exists), then the same
    command again: nothing half-written is in place after the kill, the rerun takes the upstream stages
    from cache, builds the killed one and leaves no temp or work folder. (SFT: the test above.)"""
    overrides, cmd = _KILL_CASES[stage]
    recipe = write_recipe(tmp_path, overrides)
    root = tmp_path / "artifacts"
    env = subprocess_env()
    proc = subprocess.Popen(redi_argv(*cmd, str(recipe), "--no-prefect"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    _kill_group_when(lambda: any((root / stage).glob(".tmp-*")), proc)
    before = _status(recipe)
    assert not before[stage if stage != "evaluate" else "evaluate[base]"]["cached"]
    assert not [p for p in (root / stage).iterdir() if not p.name.startswith(".")]  # nothing half-written in place

    p = subprocess.run(redi_argv(*cmd, str(recipe), "--no-prefect"), capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    killed = stage if stage != "evaluate" else "evaluate[base]"
    assert re.search(rf"^{re.escape(killed)}\s+built", p.stdout, re.M), p.stdout
    for up in ("download", "model", "verify", "sft")[: ("download", "verify", "redi", "evaluate").index(stage) + 1]:
        if up != stage and up in before and before[up]["cached"]:
            assert re.search(rf"^{up}\s+cache hit", p.stdout, re.M), (up, p.stdout)
    after = _status(recipe)
    validate(Path(after[killed]["path"]))
    assert not list(root.glob("*/.tmp-*")) and not list(root.glob("*/.work-*"))


@pytest.mark.slow
def test_two_runs_of_one_recipe_at_once_share_one_artifact(tmp_path):
    recipe = write_recipe(tmp_path)
    env = subprocess_env()
    procs = [subprocess.Popen(redi_argv("stage", "verify", str(recipe), "--no-prefect"), env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    statuses = sorted(next(line.split()[1] for line in out.splitlines() if line.startswith("verify ")) for out, _ in outs)
    assert statuses == ["built", "cache"]  # one built it, the other waited on the lock and took it from cache
    plan = _status(recipe)
    for s in ("download", "model", "verify"):
        assert plan[s]["cached"]
        validate(Path(plan[s]["path"]))
        assert not list(Path(plan[s]["path"]).parent.glob(".tmp-*"))


def test_corrupt_artifact_is_rebuilt(tmp_path, capsys):
    recipe = write_recipe(tmp_path)
    assert main(["stage", "download", str(recipe), "--no-prefect"]) == 0
    capsys.readouterr()
    folder = next(p for p in (tmp_path / "artifacts" / "download").iterdir() if not p.name.startswith("."))
    traces = folder / "traces.parquet"
    good = traces.read_bytes()
    traces.write_bytes(good[:-10] + b"0123456789")  # same size, different content
    assert main(["status", str(recipe), "--json"]) == 0
    assert not {n["stage"]: n for n in json.loads(capsys.readouterr().out)}["download"]["cached"]
    assert main(["stage", "download", str(recipe), "--no-prefect"]) == 0
    out = capsys.readouterr().out
    assert "download  built" in out
    validate(folder)
    assert traces.read_bytes() == good  # deterministic rebuild


def test_corrupt_model_weights_and_manifest_are_rebuilt(tmp_path, capsys):
    """One flipped bit in the SFT model's weights and a manifest cut short: both found by the next lookup
    and rebuilt (the SFT rebuild deterministic: the same weights, byte for byte)."""
    recipe = write_recipe(tmp_path)
    assert main(["stage", "sft", str(recipe), "--no-prefect"]) == 0
    root = tmp_path / "artifacts"
    sft = next(p for p in (root / "sft").iterdir() if not p.name.startswith("."))
    verify = next(p for p in (root / "verify").iterdir() if not p.name.startswith("."))
    weights = sft / "model" / "model.safetensors"
    good = weights.read_bytes()
    raw = bytearray(good)
    raw[len(raw) // 2] ^= 0x04
    weights.write_bytes(bytes(raw))
    manifest = verify / "manifest.json"
    manifest.write_text(manifest.read_text()[:-40])
    capsys.readouterr()
    assert main(["status", str(recipe), "--json"]) == 0
    plan = {n["stage"]: n for n in json.loads(capsys.readouterr().out)}
    assert plan["download"]["cached"] and plan["model"]["cached"]
    assert not plan["verify"]["cached"] and not plan["sft"]["cached"]
    assert main(["stage", "sft", str(recipe), "--no-prefect"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^verify\s+built", out, re.M) and re.search(r"^sft\s+built", out, re.M), out
    validate(sft)
    validate(verify)
    assert weights.read_bytes() == good


@pytest.mark.slow
@pytest.mark.parametrize("sig,group", [(signal.SIGTERM, False), (signal.SIGINT, True), (signal.SIGTERM, True)],
                         ids=["kill-pid", "ctrl-c-to-group", "scheduler-sigterm-to-group"])
def test_interrupt_stops_a_long_stage_of_a_prefect_run(tmp_path, sig, group):
    """`kill <pid>`, Ctrl-C (SIGINT to the terminal's process group) or a scheduler's SIGTERM to the job's
    group, on a Prefect run whose SFT would train for 100,000 steps: the stage, which runs in a task-runner
    thread the signal never reaches, stops at its next step; exit 143 / 130 well before the forced-exit
    deadline (set far away here, so only the cooperative stop can pass), the temporary Prefect server
    (its own session) outlives the signal to report the crash, and nothing is orphaned."""
    import psutil

    recipe = write_recipe(tmp_path, {"sft.max_steps": 100_000, "sft.save_steps": 1})
    root = tmp_path / "artifacts"
    proc = subprocess.Popen(redi_argv("run", str(recipe)), env=subprocess_env(REDI_STOP_GRACE_S="600"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for(lambda: any((root / "sft").glob(".work-*/checkpoint-*")), proc, timeout=300)
        children = psutil.Process(proc.pid).children(recursive=True)
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        t0 = time.time()
        _, err = proc.communicate(timeout=120)
        took = time.time() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == (143 if sig == signal.SIGTERM else 130), err[-2000:]
    assert "stops at its next step" in err and "did not stop within" not in err, err[-2000:]
    assert took < 30, f"{took:.0f} s to stop"
    psutil.wait_procs(children, timeout=30)
    alive = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert not alive, [" ".join(c.cmdline()[:4]) for c in alive]
    assert not any((root / "sft").glob("*/manifest.json"))  # nothing published for the stopped stage


def test_stop_deadline_kills_children_and_exits(tmp_path):
    """The bound on an interrupted run: a stage stuck where no stop check runs (here a thread joined
    forever) still ends at the deadline, with its child processes killed and the signal's status."""
    import psutil

    script = tmp_path / "stuck.py"
    script.write_text(
        "import subprocess, sys, threading, time\n"
        "from redi import interrupt\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        "print(child.pid, flush=True)\n"
        "interrupt.request_stop(); interrupt.start_deadline(1.0, 143)\n"
        "threading.Thread(target=time.sleep, args=(600,)).start()\n"
    )
    t0 = time.time()
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=subprocess_env())
    assert p.returncode == 143, p.stderr[-2000:]
    assert time.time() - t0 < 30
    assert "did not stop within 1 s" in p.stderr
    child = int(p.stdout.split()[0])
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE


def test_stop_check_raises_only_after_a_request():
    from redi import interrupt

    interrupt.clear()
    interrupt.check("nothing")  # no request: no effect
    interrupt.request_stop()
    try:
        with pytest.raises(interrupt.Stopped, match="sft at step 3 stopped"):
            interrupt.check("sft at step 3")
        assert isinstance(interrupt.Stopped("x"), KeyboardInterrupt)  # no `except Exception` swallows it
    finally:
        interrupt.clear()


_SIGNAL_TO_A_WORKER = """
import queue, signal, sys, threading, time
from redi import interrupt

def handler(signum, frame):
    raise KeyboardInterrupt("handled")

signal.signal(signal.SIGUSR1, handler)

def worker():  # the kernel may hand a process-directed SIGTERM to any thread: here, explicitly, this one
    time.sleep(0.3)
    signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)
    time.sleep(60)

threading.Thread(target=worker, daemon=True).start()
q = queue.Queue()
t0 = time.time()
try:
    q.get() if sys.argv[1] == "plain" else interrupt.get(q)
except KeyboardInterrupt as e:
    print(f"{e} after {time.time() - t0:.1f} s")
"""


@pytest.mark.parametrize("how", ["interrupt.get", "plain"])
def test_a_signal_handed_to_a_worker_thread_reaches_a_waiting_main_thread(how):
    """The scheduler of a Prefect run waits in its main thread while stages run in worker threads. A signal the
    kernel hands to a worker thread only flags the Python handler; interrupt.get wakes every 0.2 s, so it runs
    (a plain queue.get sleeps on: the 1-in-4 hang of the group-SIGTERM test above)."""
    cmd = [sys.executable, "-c", _SIGNAL_TO_A_WORKER, how]
    if how == "plain":
        with pytest.raises(subprocess.TimeoutExpired):
            subprocess.run(cmd, capture_output=True, text=True, timeout=5, env=subprocess_env())
        return
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=subprocess_env())
    assert r.returncode == 0 and r.stdout.startswith("handled after"), r.stderr[-2000:]
    assert float(r.stdout.split()[2]) < 2


# ------------------------------------------------------------------ full disk, read-only root (real mounts)


def _mount(*args: str) -> None:
    p = subprocess.run(["mount", *args], capture_output=True, text=True)
    if p.returncode:
        pytest.skip(f"mount {' '.join(args)} is not allowed here (needs root): {p.stderr.strip()}")


@contextmanager
def _tmpfs(folder: Path, size: str):
    folder.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder))
    try:
        yield
    finally:  # lazily: the tokenised data of a failed run may still be memory-mapped
        subprocess.run(["umount", "-l", str(folder)], check=True)


@contextmanager
def _read_only(folder: Path):
    _mount("--bind", str(folder), str(folder))
    try:
        p = subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], capture_output=True, text=True)
        if p.returncode:
            pytest.skip(f"cannot remount read-only here: {p.stderr.strip()}")
        with pytest.raises(OSError):  # really read-only, even for root
            (folder / "probe").write_text("")
        yield
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def _one_line(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err
    lines = re.findall(r"(?<![\w.])redi: [^\r\n]*", err)  # a progress bar may precede it on its line
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def test_full_disk_at_a_checkpoint_is_one_line_and_leaves_nothing_trusted(tmp_path, capsys):
    """SFT on a 400 kB file system: torch's writer fails mid-checkpoint (a C++ iostream error, not an
    OSError); the CLI says which folder is full and how much it needs; no checkpoint-N.tmp, no temp artifact."""
    recipe = write_recipe(tmp_path)
    assert main(["stage", "verify", str(recipe), "--no-prefect"]) == 0
    sft = tmp_path / "artifacts" / "sft"
    with _tmpfs(sft, "400k"):
        line = _one_line(capsys, ["stage", "sft", str(recipe), "--no-prefect"])
        assert line.startswith(f"redi: no space left in {sft}/.work-") and "MB free): free space or set run.artifact_root" in line
        assert "needs ~" in line
        assert not list(sft.glob(".work-*/checkpoint-*")) and not list(sft.glob(".tmp-*"))
        assert main(["status", str(recipe), "--json"]) == 0
        assert not {n["stage"]: n for n in json.loads(capsys.readouterr().out)}["sft"]["cached"]


def test_read_only_root_serves_cache_hits_without_locks(tmp_path, capsys):
    recipe = write_recipe(tmp_path)
    assert main(["stage", "verify", str(recipe), "--no-prefect"]) == 0
    root = tmp_path / "artifacts"
    with _read_only(root):
        capsys.readouterr()
        assert main(["status", str(recipe), "--json"]) == 0
        plan = {n["stage"]: n for n in json.loads(capsys.readouterr().out)}
        assert all(plan[s]["cached"] for s in ("download", "model", "verify"))
        assert main(["stage", "verify", str(recipe), "--no-prefect"]) == 0
        out = capsys.readouterr().out
        assert re.search(r"^verify\s+cache hit", out, re.M) and "built" not in out, out
        line = _one_line(capsys, ["stage", "sft", str(recipe), "--no-prefect"])
        assert line == (f"redi: {root}/sft is not writable and sft {plan['sft']['key']} must be built (it is not cached): "
                        "set run.artifact_root to a writable folder")


def test_redi_run_on_a_read_only_root_of_a_finished_run(tmp_path, capsys):
    """The issue's case: `redi status` said 11/11 cached and `redi run` failed creating a lock file."""
    recipe = write_recipe(tmp_path)
    assert main(["run", str(recipe), "--no-prefect"]) == 0
    root = tmp_path / "artifacts"
    with _read_only(root):
        capsys.readouterr()
        assert main(["status", str(recipe), "--json"]) == 0
        assert all(n["cached"] for n in json.loads(capsys.readouterr().out))
        assert main(["run", str(recipe), "--no-prefect"]) == 0
        out = capsys.readouterr().out
        assert "built" not in out and "the artifact root is read-only" in out and "| redi |" in out
        changed = write_recipe(tmp_path, {"redi.lr": 2e-6}, name="changed.yaml")
        assert f"redi: {root}/redi is not writable and redi " in _one_line(capsys, ["run", str(changed), "--no-prefect"])


def test_end_processes_terminates_then_kills_after_the_grace():
    """What a stopped launch does to its process tree: SIGTERM, then SIGKILL for one that ignores it."""
    import psutil

    from redi import interrupt

    code = "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); time.sleep(120)"
    stubborn = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    polite = subprocess.Popen([sys.executable, "-c", "import time; print(1, flush=True); time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    for p in (stubborn, polite):
        p.stdout.readline()  # its handler is installed
    t0 = time.time()
    interrupt.end_processes([psutil.Process(stubborn.pid), psutil.Process(polite.pid)], grace=1.0)
    assert 0.9 < time.time() - t0 < 10
    assert not psutil.pid_exists(stubborn.pid) and not psutil.pid_exists(polite.pid)
