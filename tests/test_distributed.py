"""Multi-process training with two REAL processes on CPU (gloo): the recipe README's command shapes.

- ``accelerate launch --multi_gpu --num_processes 2 -m redi.cli stage sft RECIPE --no-prefect`` (the README's
  ``accelerate launch --config_file ... -m redi.cli stage sft ...`` with the config's 8 GPUs replaced by 2 CPU
  processes: ``--multi_gpu`` goes through torchrun, each process joins over gloo). (Were every rank to take
  the artifact lock, the launch would deadlock at the start of SFT.)
- the same for ``stage redi`` (loss redi and dpo), and ``redi run`` with ``run.launcher=accelerate`` from one
  process (the pipeline spawns the launch for each training stage).
- the shipped FSDP / ZeRO-2 / ZeRO-3 configs on CPU (slow): kill, resume, save, DPO, all equal to DDP.
- the artifact store's rank protocol on its own (two spawned gloo processes, no model).
- the backend helpers of ``redi.train_backend`` (decay groups, update norm, DeepSpeed config) on literals.

Every launch test asserts that BOTH ranks trained (the summary's per-rank report: two pids, tokens on rank 1)
and that exactly one artifact folder was published per stage.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest_orchestration import subprocess_env, write_recipe

from redi import train_backend as TB

ACCELERATE = str(Path(sys.executable).parent / "accelerate")
ACCELERATE_CONFIGS = Path(__file__).resolve().parents[1] / "deployments" / "accelerate"
CPU_BACKEND_SHIM = Path(__file__).resolve().parent / "cpu_backends"  # sitecustomize.py: FSDP / DeepSpeed on CPU


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(*redi_args: str, config: str | None = None, check: bool = True, timeout: int = 600,
            **env: str) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes 2 -m redi.cli ARGS` (the README's shape, 2 CPU processes),
    or `accelerate launch --config_file deployments/accelerate/CONFIG --num_processes 2 ...`."""
    how = ["--config_file", str(ACCELERATE_CONFIGS / config)] if config else [
        "--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd = [ACCELERATE, "launch", *how, "--num_processes", "2", "--main_process_port", str(_port()),
           "-m", "redi.cli", *redi_args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                       env=subprocess_env(OMP_NUM_THREADS="1", REDI_THREADS="1", **env))
    if check:
        assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-5000:])
    return p


def _published(root: Path, stage: str) -> list[Path]:
    """The published artifact folders of a stage (temp, work, lock and trash folders start with a dot)."""
    return [p for p in (root / stage).iterdir() if not p.name.startswith(".")]


def _assert_two_ranks_trained(summary: dict) -> None:
    assert summary["world_size"] == 2
    ranks = summary["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and ranks[0]["pid"] != ranks[1]["pid"]
    assert all(r["steps"] == summary["steps"] and r["tokens"] > 0 and r["sequences"] > 0 for r in ranks), ranks


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


# ------------------------------------------------------------------ the README's launch, two real processes


@pytest.fixture(scope="module")
def sft_launch(tmp_path_factory):
    """One 2-process `stage sft` launch shared by the tests of this module (the module's costly step, run once)."""
    d = tmp_path_factory.mktemp("dist")
    recipe = write_recipe(d, {"redi.global_batch": 4, "redi.micro_batch": 2})
    return recipe, d / "artifacts", _launch("stage", "sft", str(recipe), "--no-prefect")


def test_readme_sft_launch_trains_on_both_ranks_and_publishes_once(sft_launch):
    recipe, root, p = sft_launch
    for stage in ("download", "model", "verify", "sft"):
        folders = _published(root, stage)
        assert len(folders) == 1, (stage, folders)
        assert not list((root / stage).glob(".tmp-*")) and not list((root / stage).glob(".work-*"))
    summary = _manifest(_published(root, "sft")[0])["summary"]
    _assert_two_ranks_trained(summary)
    assert summary["steps"] == 3 and math.isfinite(summary["last"]["loss"])
    assert summary["last"]["update_norm"] > 0 and summary["params"] > 0
    assert "rank 1/2" in p.stderr and "trained 3 steps" in p.stderr  # rank 1's own log line
    assert len(re.findall(r"^sft\s+built", p.stdout, re.M)) == 1  # the table is printed by rank 0 only
    # download, model and verify were built by rank 0 alone: one "built" log line from rank 0's store each
    assert p.stderr.count("redi.artifacts: built verify") == 1


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["redi", "dpo"])
def test_readme_stage2_launch_on_both_ranks(sft_launch, loss):
    """`stage redi` (REDI, and the DPO baseline with its reference precomputed sharded over the ranks)."""
    recipe, root, _ = sft_launch
    extra = ["--set", "redi.loss=dpo", "--set", "redi.beta=0.1"] if loss == "dpo" else []
    p = _launch("stage", "redi", str(recipe), "--no-prefect", *extra)
    assert not re.findall(r"^sft\s+built", p.stdout, re.M)  # SFT is not retrained
    folders = _published(root, "redi")
    summaries = {f: _manifest(f)["summary"] for f in folders}
    summary = next(s for s in summaries.values() if s["loss_type"] == loss)
    _assert_two_ranks_trained(summary)
    assert summary["steps"] == 2 and math.isfinite(summary["last"]["loss"])
    if loss == "dpo":  # step 1: policy == the reference each rank computed for its slice of the pairs
        assert summary["first"]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert len(_published(root, "sft")) == 1


@pytest.mark.slow
def test_redi_run_with_the_accelerate_launcher_trains_both_stages_in_two_processes(tmp_path):
    """`redi run RECIPE --no-prefect` from ONE process with run.launcher=accelerate, num_processes=2: the pipeline
    spawns `accelerate launch --multi_gpu --num_processes 2 -m redi.train` for SFT and for REDI, then evaluates."""
    recipe = write_recipe(tmp_path, {"run.launcher": "accelerate", "run.num_processes": 2,
                                     "redi.global_batch": 4, "redi.micro_batch": 2})
    p = subprocess.run([sys.executable, "-m", "redi.cli", "run", str(recipe), "--no-prefect"],
                       capture_output=True, text=True, timeout=900,
                       env=subprocess_env(OMP_NUM_THREADS="1", REDI_THREADS="1"))
    assert p.returncode == 0, p.stderr[-5000:]
    root = tmp_path / "artifacts"
    for stage in ("sft", "redi"):
        folders = _published(root, stage)
        assert len(folders) == 1
        _assert_two_ranks_trained(_manifest(folders[0])["summary"])
    assert p.stderr.count("--multi_gpu") == 2  # the launch line the pipeline logs, once per training stage
    assert len(_published(root, "grade")) == len(_published(root, "evaluate")) >= 1


@pytest.mark.slow
def test_whole_dag_under_a_launch_evaluates_and_reports_on_rank_0(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2 -m redi.cli run RECIPE --no-prefect`: both training stages
    on both ranks; evaluation, grading and the report by rank 0 alone, whose report the other rank receives."""
    recipe = write_recipe(tmp_path, {"redi.global_batch": 4, "redi.micro_batch": 2})
    p = _launch("run", str(recipe), "--no-prefect", timeout=900)
    root = tmp_path / "artifacts"
    for stage in ("sft", "redi"):
        _assert_two_ranks_trained(_manifest(_published(root, stage)[0])["summary"])
    for stage in ("download", "model", "verify", "sft", "redi"):
        assert len(_published(root, stage)) == 1
    n_eval = len(_published(root, "evaluate"))
    assert n_eval == len(_published(root, "grade")) >= 1
    assert p.stderr.count("redi.artifacts: built evaluate") == n_eval  # one build per model, by rank 0
    assert p.stdout.count("Run folder:") == 1 and (root / "runs" / "tiny").is_dir()


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model" / "model.safetensors"))


def _losses(folder: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (folder / "signals.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def ddp_dpo(sft_launch):
    """The DDP (2 gloo processes) DPO stage on the module's SFT model: the reference for the backend tests."""
    recipe, root, _ = sft_launch
    _launch("stage", "redi", str(recipe), "--no-prefect", "--set", "redi.loss=dpo", "--set", "redi.beta=0.1")
    return next(f for f in _published(root, "redi") if _manifest(f)["summary"]["loss_type"] == "dpo")


@pytest.mark.slow
@pytest.mark.parametrize("config", ["fsdp.yaml", "zero2.yaml", "zero3.yaml"])
def test_backend_config_trains_checkpoints_resumes_and_saves_like_ddp(sft_launch, ddp_dpo, tmp_path, config):
    """The shipped FSDP / ZeRO-2 / ZeRO-3 configs, 2 CPU processes over gloo, the README's command shape.

    accelerate runs these backends only on accelerators; tests/cpu_backends/sitecustomize.py lets it run them
    on CPU (DeepSpeed's CPU accelerator, torch's FSDP2 over gloo) without touching the trainer. SFT is killed
    after its step-2 checkpoint and resumed from the sharded checkpoint; its losses and final weights must
    equal the DDP run's, and so must DPO's, whose reference is computed through the sharded model."""
    import shutil

    recipe_ddp, root_ddp, _ = sft_launch
    root = tmp_path / "artifacts"
    for stage in ("download", "model", "verify"):  # same upstream artifacts, not rebuilt
        shutil.copytree(root_ddp / stage, root / stage, ignore=shutil.ignore_patterns(".*"))
    recipe = write_recipe(tmp_path, {"redi.global_batch": 4, "redi.micro_batch": 2})
    env = {"PYTHONPATH": f"{CPU_BACKEND_SHIM}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "REDI_TEST_CPU_BACKEND": "1", "DS_ACCELERATOR": "cpu"}
    killed = _launch("stage", "sft", str(recipe), "--no-prefect", config=config, check=False,
                     REDI_TEST_KILL_AT_STEP="2", **env)
    assert killed.returncode != 0 and "simulated kill after step 2" in killed.stderr
    assert not _published(root, "sft") and list((root / "sft").glob(".work-*/checkpoint-2"))
    _launch("stage", "sft", str(recipe), "--no-prefect", config=config, **env)
    [sft] = _published(root, "sft")
    summary = _manifest(sft)["summary"]
    _assert_two_ranks_trained({**summary, "steps": 1})  # this attempt trained step 3 only
    assert summary["resumed_from_step"] == 2 and summary["params"] == _manifest(_published(root_ddp, "sft")[0])["summary"]["params"]
    ddp_sft = _published(root_ddp, "sft")[0]
    assert _losses(sft) == pytest.approx(_losses(ddp_sft), rel=1e-5)
    want, got = _weights(ddp_sft), _weights(sft)
    assert max((want[k] - got[k].float()).abs().max().item() for k in want) < 1e-5
    _launch("stage", "redi", str(recipe), "--no-prefect", "--set", "redi.loss=dpo", "--set", "redi.beta=0.1",
            config=config, **env)
    [dpo] = _published(root, "redi")
    _assert_two_ranks_trained(_manifest(dpo)["summary"])
    assert _losses(dpo)[0] == pytest.approx(math.log(2), abs=1e-5)  # the sharded reference equals the policy
    assert _losses(dpo) == pytest.approx(_losses(ddp_dpo), rel=1e-5)
    upd = [json.loads(x)["update_norm"] for x in (dpo / "signals.jsonl").read_text().splitlines()]
    ddp_upd = [json.loads(x)["update_norm"] for x in (ddp_dpo / "signals.jsonl").read_text().splitlines()]
    assert upd == pytest.approx(ddp_upd, rel=1e-4)  # from the sharded fp32 optimiser state, summed over ranks


@pytest.mark.slow
def test_fsdp2_config_trains_in_bf16_on_both_ranks(tmp_path):
    """The shipped fsdp.yaml with the recipe in bf16 (CPU autocast, FSDP2's bf16 parameters under the trainer's
    fp32-reduce / fp32-output policy), 2 processes: SFT and the DPO baseline (reference precomputed through the
    sharded model) train on both ranks; at step 1 the policy equals its reference (loss log 2)."""
    recipe = write_recipe(tmp_path, {"redi.global_batch": 4, "redi.micro_batch": 2, "sft.dtype": "bfloat16",
                                     "redi.dtype": "bfloat16"})
    env = {"PYTHONPATH": f"{CPU_BACKEND_SHIM}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "REDI_TEST_CPU_BACKEND": "1"}
    _launch("stage", "sft", str(recipe), "--no-prefect", config="fsdp.yaml", **env)
    _launch("stage", "redi", str(recipe), "--no-prefect", "--set", "redi.loss=dpo", "--set", "redi.beta=0.1",
            config="fsdp.yaml", **env)
    root = tmp_path / "artifacts"
    for stage in ("sft", "redi"):
        [art] = _published(root, stage)
        summary = _manifest(art)["summary"]
        _assert_two_ranks_trained(summary)
        assert summary["mixed_precision"] == "bf16" and all(math.isfinite(x) for x in _losses(art))
    assert _losses(art)[0] == pytest.approx(math.log(2), abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["zero2.yaml", "zero3.yaml"])
def test_deepspeed_bf16_float32_save_holds_the_fp32_masters(tmp_path, config):
    """DeepSpeed's bf16 engine (on its CPU accelerator here) holds the module in bf16 and the fp32 masters in the
    optimiser partitions. `save_dtype: float32` saves the masters: values bf16 cannot hold, which round to exactly
    the bf16 weights a `save_dtype: bfloat16` run of the same steps saves (before, it saved the bf16 values upcast)."""
    from safetensors.torch import load_file

    env = {"PYTHONPATH": f"{CPU_BACKEND_SHIM}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "REDI_TEST_CPU_BACKEND": "1",
           "DS_ACCELERATOR": "cpu"}
    weights = {}
    for save in ("float32", "bfloat16"):
        recipe = write_recipe(tmp_path, {"redi.global_batch": 4, "redi.micro_batch": 2, "sft.dtype": "bfloat16",
                                         "sft.save_dtype": save})
        _launch("stage", "sft", str(recipe), "--no-prefect", config=config, **env)
        [art] = [a for a in _published(tmp_path / "artifacts", "sft") if _manifest(a)["key"] not in weights]
        _assert_two_ranks_trained(_manifest(art)["summary"])
        weights[_manifest(art)["key"]] = load_file(art / "model" / "model.safetensors")
    f32, b16 = weights.values()
    assert {v.dtype for v in f32.values()} == {torch.float32} and {v.dtype for v in b16.values()} == {torch.bfloat16}
    assert all(not torch.equal(v, v.bfloat16().float()) for v in f32.values())  # not bf16 values upcast
    assert all(torch.equal(f32[k].bfloat16(), b16[k]) for k in b16)  # the masters of the same weights


@pytest.mark.parametrize("env", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_backend_config_that_accelerate_dropped_is_refused(monkeypatch, env):
    """On CPU accelerate turns an FSDP / DeepSpeed config into plain DDP without a word: the trainer refuses."""
    monkeypatch.setenv(env, "true")
    acc = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=None), distributed_type="DistributedType.MULTI_CPU",
                          device=torch.device("cpu"))
    with pytest.raises(ValueError, match="accelerate runs it only on GPUs"):
        TB.check_backend(acc)
    monkeypatch.delenv(env)
    TB.check_backend(acc)  # no backend asked for: fine


def test_launch_without_no_prefect_is_a_clear_error(tmp_path, monkeypatch, capsys):
    from redi.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["stage", "sft", str(write_recipe(tmp_path))]) == 2
    assert "--no-prefect" in capsys.readouterr().err
    assert main(["study", str(tmp_path), "--no-prefect"]) == 2
    assert "not under a launcher" in capsys.readouterr().err


# ------------------------------------------------------------------ the store's rank protocol (no model)

_STORE_SCRIPT = r"""
import json, sys, time
from pathlib import Path
from redi import distributed
from redi.artifacts import ArtifactStore, StageFailed

base = Path(sys.argv[1])
distributed.init("cpu")
rank = distributed.rank()
for mode in ("main", "collective", "fail"):
    root = base / mode
    store = ArtifactStore(root)
    calls = []

    def fn(out, work):
        calls.append(rank)
        if mode == "fail":
            raise RuntimeError("broken stage")
        # main: rank 0 is slow, rank 1 must wait for its publish; collective: rank 1 is slow, rank 0 must wait
        time.sleep(0.5 if (rank == 0) == (mode == "main") else 0.0)
        (out / f"rank{rank}.txt").write_text(str(rank))
        return {"rank_that_summarised": rank}

    try:
        art = store.build("s", "k", fn, collective=mode == "collective")
        res = {"path": art.path, "files": sorted(art.manifest["files"]), "summary": art.summary}
    except StageFailed as e:
        res = {"error": str(e)}
    except RuntimeError as e:
        res = {"raised": str(e)}
    res["calls"], res["root"] = calls, str(root)
    (root / f"result{rank}.json").write_text(json.dumps(res))
"""


@pytest.fixture(scope="module")
def store_runs(tmp_path_factory) -> dict[str, list[dict]]:
    """ArtifactStore.build under torchrun with 2 gloo processes, no model: {mode: [rank 0 result, rank 1 result]}."""
    d = tmp_path_factory.mktemp("store")
    script = d / "store.py"
    script.write_text(_STORE_SCRIPT)
    base = d / "roots"
    base.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port()),
           str(script), str(base)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=subprocess_env(OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stderr[-4000:]
    return {m: [json.loads((base / m / f"result{r}.json").read_text()) for r in (0, 1)] for m in ("main", "collective", "fail")}


def test_store_builds_on_rank_0_only_and_shares_the_artifact(store_runs):
    r0, r1 = store_runs["main"]
    assert r0["calls"] == [0] and r1["calls"] == []  # rank 1 never built, never took the lock
    assert r0["path"] == r1["path"] and r1["files"] == ["rank0.txt"]


def test_store_collective_build_runs_on_every_rank_and_publishes_once(store_runs):
    r0, r1 = store_runs["collective"]
    assert r0["calls"] == [0] and r1["calls"] == [1]
    assert r0["path"] == r1["path"]
    assert r1["files"] == ["rank0.txt", "rank1.txt"]  # rank 0 published after the slower rank 1 wrote
    assert r1["summary"] == {"rank_that_summarised": 0}
    stage = Path(r0["path"]).parent
    assert [p.name for p in stage.iterdir() if not p.name.startswith(".")] == ["k"]


def test_store_failure_on_rank_0_is_reported_on_every_rank(store_runs):
    r0, r1 = store_runs["fail"]
    assert r0["raised"] == "broken stage"
    assert "rank 0 failed to build it (RuntimeError: broken stage)" in r1["error"]
    left = [p.name for p in (Path(r0["root"]) / "s").iterdir()]
    assert not [n for n in left if not n.startswith(".") or n.startswith(".tmp-")]  # nothing published or half-written


# ------------------------------------------------------------------ backend helpers


def _tiny_lm():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg)


def test_decay_groups_by_name_not_ndim():
    model = _tiny_lm()
    name_of = {id(p): n for n, p in model.named_parameters()}
    groups = TB.decay_groups(model, 0.1)
    names = [{name_of[id(p)] for p in g["params"]} for g in groups]
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert all(n.endswith("bias") or "norm" in n for n in names[1]) and names[1]
    assert any(n.endswith("q_proj.bias") for n in names[1]) and "model.norm.weight" in names[1]
    assert all(not n.endswith("bias") and "norm" not in n for n in names[0])
    assert names[0] | names[1] == set(name_of.values())
    # ZeRO-3 replaces every parameter by a 1-D placeholder: the groups must not change
    for mod in model.modules():
        for pn, _ in list(mod.named_parameters(recurse=False)):
            setattr(mod, pn, torch.nn.Parameter(torch.empty(0)))
    flat = [{n for n, p in model.named_parameters() if any(p is q for q in g["params"])}
            for g in TB.decay_groups(model, 0.1)]
    assert flat == names


def test_update_norm_from_adamw_state_equals_the_parameter_change():
    model = _tiny_lm()
    opt = torch.optim.AdamW(TB.decay_groups(model, 0.05), lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    acc = SimpleNamespace(device=torch.device("cpu"), state=SimpleNamespace(deepspeed_plugin=None),
                          distributed_type="NO")
    ids = torch.randint(0, 64, (2, 12))
    for _ in range(3):
        before = [p.detach().clone() for p in model.parameters()]
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        got = TB.adam_update_norm(acc, opt)
        want = math.sqrt(sum(((p.detach() - b).double() ** 2).sum().item() for p, b in zip(model.parameters(), before, strict=True)))
        opt.zero_grad()
        assert got == pytest.approx(want, rel=1e-4)
    assert TB.adam_update_norm(acc, torch.optim.AdamW(model.parameters())) is None  # no step yet


def test_update_norm_of_a_tiny_step_is_the_fp32_update_not_bf16_rounding():
    """lr 1e-6 (the paper's REDI lr): the fp32 master update, where a bf16 weight snapshot reads rounding flips."""
    model = _tiny_lm()
    opt = torch.optim.AdamW(TB.decay_groups(model, 1e-4), lr=1e-6)
    acc = SimpleNamespace(device=torch.device("cpu"), state=SimpleNamespace(deepspeed_plugin=None), distributed_type="NO")
    ids = torch.randint(0, 64, (2, 12))
    before = [p.detach().clone() for p in model.parameters()]
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    got = TB.adam_update_norm(acc, opt)

    def norm(cast):
        return math.sqrt(sum(((cast(p.detach()).double() - cast(b).double()) ** 2).sum().item()
                             for p, b in zip(model.parameters(), before, strict=True)))

    fp32, bf16 = norm(lambda t: t), norm(lambda t: t.bfloat16())
    assert got == pytest.approx(fp32, rel=1e-2)  # fp32 subtraction itself loses digits at this lr
    assert bf16 > 3 * fp32  # what a bf16 snapshot diff would have reported: rounding, not the update


def _fake_ds(config: dict, world: int = 2):
    plugin = SimpleNamespace(deepspeed_config=config, zero_stage=config.get("zero_optimization", {}).get("stage", 2))
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin), num_processes=world)


def test_deepspeed_gets_micro_batch_accumulation_and_clipping_from_the_recipe():
    cfg = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
           "train_batch_size": "auto", "zero_optimization": {"stage": 3}}
    acc = _fake_ds(cfg, world=8)
    TB.configure_deepspeed(acc, micro_batch=2, grad_accum=8, max_grad_norm=0.5)
    assert cfg["train_micro_batch_size_per_gpu"] == 2 and cfg["gradient_accumulation_steps"] == 8
    assert cfg["train_batch_size"] == 128 and cfg["gradient_clipping"] == 0.5
    TB.configure_deepspeed(_fake_ds(c := {"gradient_clipping": "auto"}), 1, 1, None)
    assert c["gradient_clipping"] == 0.0  # max_grad_norm None = no clipping (accelerate's auto would say 1.0)
    with pytest.raises(ValueError, match="gradient_clipping=1.0 but the recipe needs 0.3"):
        TB.configure_deepspeed(_fake_ds({"gradient_clipping": 1.0}), 1, 1, 0.3)


@pytest.mark.parametrize("version", [1, 2])
def test_fsdp_bf16_reduces_gradients_and_returns_outputs_in_fp32(version):
    """accelerate's own bf16 policy (what mixed_precision="bf16" builds) is bf16 for reduction and, for FSDP2, for
    the root's outputs: the trainer replaces it before prepare; fp32 runs and other backends are left alone."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(fsdp_version=version)
    plugin.set_mixed_precision("bf16")
    assert plugin.mixed_precision_policy.reduce_dtype == torch.bfloat16  # accelerate's default
    acc = SimpleNamespace(distributed_type="DistributedType.FSDP", state=SimpleNamespace(fsdp_plugin=plugin))
    TB.configure_fsdp(acc, "bf16")
    pol = plugin.mixed_precision_policy
    assert pol.param_dtype == torch.bfloat16 and pol.reduce_dtype == torch.float32
    assert (pol.output_dtype if version == 2 else pol.buffer_dtype) == torch.float32
    before = FullyShardedDataParallelPlugin(fsdp_version=version)
    TB.configure_fsdp(SimpleNamespace(distributed_type="DistributedType.FSDP", state=SimpleNamespace(fsdp_plugin=before)),
                      "no")
    assert before.mixed_precision_policy is None
    TB.configure_fsdp(SimpleNamespace(distributed_type="DistributedType.MULTI_GPU", state=None), "bf16")  # DDP: no-op


_FSDP2_BF16 = """
import json, os, sys, torch
import torch.distributed as dist
from types import SimpleNamespace
from torch.distributed.fsdp import fully_shard
from transformers import Qwen2Config, Qwen2ForCausalLM
from accelerate.utils import FullyShardedDataParallelPlugin
from redi import train_backend as TB
from redi.logprobs import LogProbLM
from redi.packing import Example, collate, sequence_logps
dist.init_process_group("gloo")
out = {}
for which in ("accelerate", "redi"):
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    plugin.set_mixed_precision("bf16")  # what Accelerator(mixed_precision="bf16") does
    if which == "redi":
        TB.configure_fsdp(SimpleNamespace(distributed_type="FSDP", state=SimpleNamespace(fsdp_plugin=plugin)), "bf16")
    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, attn_implementation="sdpa"))
    m = LogProbLM(lm)
    for layer in lm.model.layers:  # as accelerate's FSDP2 preparation: each decoder layer, then the root
        fully_shard(layer, mp_policy=plugin.mixed_precision_policy)
    fully_shard(m, mp_policy=plugin.mixed_precision_policy)
    g = torch.Generator().manual_seed(1)
    b = collate([Example(tuple(torch.randint(0, 300, (n,), generator=g).tolist()), 4) for n in (700, 650)], packed=True)
    sums, _ = sequence_logps(m, b)
    out[which] = [str(sums.dtype), sums.tolist()]
dist.destroy_process_group()
print(json.dumps(out))
"""


def test_fsdp2_bf16_log_prob_sums_stay_fp32_under_the_trainers_policy(tmp_path):
    """FSDP2 for real (fully_shard over a one-process gloo group, bf16 parameters on CPU): under accelerate's bf16
    policy the root casts LogProbLM's per-sequence sums to bf16 (a sum near -4,000 moves in steps of 16 nats);
    under the policy the trainer sets they come out fp32, and bf16 compute puts them within a few nats."""
    env = subprocess_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_port()), RANK="0", WORLD_SIZE="1",
                         OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", _FSDP2_BF16], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    (acc_dtype, acc_sums), (redi_dtype, redi_sums) = out["accelerate"], out["redi"]
    assert acc_dtype == "torch.bfloat16" and all(x % 16 == 0 for x in acc_sums)  # |sum| in [2048, 4096): 16-nat steps
    assert redi_dtype == "torch.float32" and any(x % 1 for x in redi_sums)
    assert max(abs(a - b) for a, b in zip(acc_sums, redi_sums, strict=True)) <= 16


def test_param_count_reads_zero3_placeholders():
    p = torch.nn.Parameter(torch.empty(0))
    p.ds_numel = 1234
    m = torch.nn.Module()
    m.w, m.b = p, torch.nn.Parameter(torch.zeros(5))
    assert TB.param_count(m) == 1239


def test_shipped_accelerate_configs_leave_batch_and_clipping_to_the_recipe():
    import yaml

    root = Path(__file__).resolve().parents[1] / "deployments" / "accelerate"
    for name in ("zero2.yaml", "zero3.yaml"):
        ds = yaml.safe_load((root / name).read_text())["deepspeed_config"]
        assert ds["gradient_accumulation_steps"] == "auto" and ds["gradient_clipping"] == "auto"
    assert yaml.safe_load((root / "zero3.yaml").read_text())["deepspeed_config"]["zero3_save_16bit_model"] is True


def test_env_launch_helpers(monkeypatch):
    from redi import distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert not distributed.launched() and distributed.is_main() and distributed.broadcast({"a": 1}) == {"a": 1}
    distributed.barrier()  # a no-op outside a launch
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert distributed.launched() and not distributed.is_main() and distributed.rank() == 3


def test_accelerate_command_starts_n_processes_on_cpu():
    from redi.config import Recipe
    from redi.launch import accelerate_command

    run = Recipe.model_validate({"run": {"launcher": "accelerate", "num_processes": 2}}).run
    cmd = accelerate_command(run, "cpu")
    assert "--multi_gpu" in cmd and cmd[cmd.index("--num_processes") + 1] == "2"
    run1 = Recipe.model_validate({"run": {"launcher": "accelerate", "num_processes": 1}}).run
    assert "--multi_gpu" not in accelerate_command(run1, "cpu")
    cfg = Recipe.model_validate({"run": {"launcher": "accelerate", "accelerate_config": "x.yaml", "num_processes": 8}}).run
    c = accelerate_command(cfg, "cuda")
    assert "--multi_gpu" not in c and c[c.index("--config_file") + 1] == "x.yaml"  # the config says how to launch
