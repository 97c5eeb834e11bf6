"""redi.train (with redi.train_checkpoints and redi.train_report) / redi.packing / redi.signals on a tiny
locally built model (CPU, a few steps each)."""

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from _train_data import write_fixture

from redi import train as T
from redi import train_checkpoints as C
from redi import train_data as D
from redi import train_report as R
from redi.config import ModelConfig, SFTConfig, Stage2Config
from redi.config.model import TinyModelConfig
from redi.losses import OBJECTIVES
from redi.packing import Example, collate, make_example, sequence_logps
from redi.tinymodel import build_base_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SMALL = dict(global_batch=8, micro_batch=4, save_steps=100)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    data = write_fixture(d / "data", n_problems=48)
    build_base_model(ModelConfig(tiny=TinyModelConfig(num_layers=2)), d / "base", data["traces"])
    return d, data


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


# ------------------------------------------------------------------ packing


def test_packed_logps_equal_unpacked(env):
    """Packed sequences must not attend to each other (position-id packing, use_cache=False)."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(env[0] / "base")).eval()
    exs = [Example(tuple(range(5, 25)), 8), Example(tuple(range(30, 42)), 3), Example(tuple(range(7, 60)), 20)]
    with torch.no_grad():
        packed, lens = sequence_logps(m, collate(exs, packed=True))
        padded, _ = sequence_logps(m, collate(exs, packed=False, pad_id=0))
        alone = torch.stack([sequence_logps(m, collate([e]))[0][0] for e in exs])
    assert torch.allclose(packed, alone, atol=1e-4) and torch.allclose(padded, alone, atol=1e-4)
    assert lens.tolist() == [12, 9, 33]  # completion tokens incl. EOS


def test_make_example_truncation():
    ex, cut = make_example([1, 2, 3], [4, 5], eos_id=9, max_length=10)
    assert not cut and ex.ids == (1, 2, 3, 4, 5, 9) and ex.completion_len == 3
    ex, cut = make_example([1, 2, 3], [4, 5, 6, 7], eos_id=9, max_length=4, keep="end")
    # the whole prompt cut: the first token is never predicted, so 3 of the 4 tokens are scored
    assert cut and ex.ids == (5, 6, 7, 9) and ex.prompt_len == 0 and ex.completion_len == 3
    ex, cut = make_example([1, 2, 3], [4, 5, 6, 7], eos_id=9, max_length=5, keep="start")
    assert cut and ex.ids == (1, 2, 3, 4, 5) and ex.completion_len == 2


# ------------------------------------------------------------------ schedule and data order


def test_lr_schedule_warmup_and_linear_decay():
    f = D.lr_factor(SFTConfig(warmup_ratio=0.2, schedule="linear"), total=10)
    assert [round(f(s), 3) for s in range(10)] == [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]
    c = D.lr_factor(SFTConfig(warmup_ratio=0.0, schedule="cosine", min_lr_ratio=0.1), total=4)
    assert c(0) == pytest.approx(1.0) and c(2) == pytest.approx(0.1 + 0.9 * 0.5)


def test_step_indices_are_epoch_permutations():
    first = [i for s in range(5) for i in D.step_indices(10, 2, s, seed=0)]
    assert sorted(first) == list(range(10))
    assert D.step_indices(10, 2, 3, seed=0) == D.step_indices(10, 2, 3, seed=0)
    assert first != [i for s in range(5) for i in D.step_indices(10, 2, s, seed=1)]


# ------------------------------------------------------------------ SFT and stage 2


@pytest.fixture(scope="module")
def sft_run(env):
    d, data = env
    cfg = SFTConfig(lr=3e-3, max_steps=12, warmup_ratio=0.1, **SMALL)
    summary = T.train_sft(cfg, d / "base", data["positives"], d / "sft", d / "sft_work", "cpu")
    return summary, d / "sft"


def test_a_finished_stage_drops_its_model_and_accelerate_state(env, sft_run, tmp_path, monkeypatch):
    """After training, the stage drops the model, its optimizer state and the DPO reference (live copy and
    precomputed log-probs) on every rank and empties accelerate's references and the device cache
    (Accelerator.free_memory, then a collection once the training frame is gone): under a launch the other ranks wait at a barrier while rank 0 starts vLLM engines
    that want 90 % of each GPU free."""
    import weakref

    import accelerate

    d, data = env
    loaded, freed = [], []
    real_load, real_free = T._load_model, accelerate.Accelerator.free_memory

    def load(*a, **k):
        m = real_load(*a, **k)
        loaded.append(weakref.ref(m))
        loaded.append(weakref.ref(next(m.parameters())))  # held by the optimizer too
        return m

    monkeypatch.setattr(T, "_load_model", load)
    monkeypatch.setattr(accelerate.Accelerator, "free_memory", lambda self, *o: freed.append(1) or real_free(self, *o))
    T.train_sft(SFTConfig(max_steps=2, **SMALL), d / "base", data["positives"], tmp_path / "o", tmp_path / "w", "cpu")
    cfg = Stage2Config(loss="dpo", precompute_ref=False, max_steps=2, beta=0.1, **SMALL)
    T.train_stage2(cfg, sft_run[1] / "model", data["pairs"], tmp_path / "o2", tmp_path / "w2", "cpu")
    assert len(freed) == 2 and len(loaded) == 6  # SFT's model; stage 2's model and its live reference
    assert [r() is None for r in loaded] == [True] * 6


def test_sft_learns_and_writes_outputs(sft_run):
    summary, out = sft_run
    recs = [json.loads(line) for line in (out / "signals.jsonl").read_text().splitlines()]
    assert len(recs) == 12 and summary["steps"] == 12
    assert recs[-1]["loss"] < recs[0]["loss"] - 0.5  # visibly learns in 12 steps
    assert recs[-1]["chosen_logp"] > recs[0]["chosen_logp"]
    for k in ("grad_norm", "update_norm", "lr", "tokens_per_s"):
        assert recs[-1][k] is not None and recs[-1][k] > 0
    assert (out / "signals.png").stat().st_size > 1000
    assert (out / "model" / "model.safetensors").exists() and (out / "model" / "tokenizer.json").exists()
    assert summary["counts"]["examples"] == 48 and summary["tokens_per_s"] > 0


def _pair_logps(model_dir: Path, pairs_path: Path) -> tuple[float, float]:
    """Mean per-token chosen and rejected log-probs of the first 16 pairs under a saved model."""
    from transformers import AutoModelForCausalLM

    from redi.tinymodel import load_tokenizer

    tok = load_tokenizer(model_dir)
    items, _ = D.load_pair_examples(Stage2Config(), tok, pairs_path)
    m = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        sums, lens = sequence_logps(m, collate([p[0] for p in items[:16]] + [p[1] for p in items[:16]]))
    pt = sums / lens
    return pt[:16].mean().item(), pt[16:].mean().item()


@pytest.mark.parametrize("loss", list(OBJECTIVES))
def test_stage2_objectives_run(env, sft_run, loss, tmp_path):
    d, data = env
    cfg = Stage2Config(loss=loss, lr=1e-3, max_steps=4, warmup_ratio=0.0, beta=0.1 if loss == "dpo" else 2.0, **SMALL)
    s = T.train_stage2(cfg, sft_run[1] / "model", data["pairs"], tmp_path / "out", tmp_path / "work", "cpu")
    first, last = s["first"], s["last"]
    assert s["steps"] == 4 and math.isfinite(last["loss"])
    if loss == "dpo":
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 1
    c0, r0 = _pair_logps(sft_run[1] / "model", data["pairs"])
    c1, r1 = _pair_logps(tmp_path / "out" / "model", data["pairs"])
    assert c1 - r1 > c0 - r0  # every objective separates chosen from rejected on the same pairs
    if loss == "redi":
        assert c1 > c0  # chosen log-prob rises
        assert not (tmp_path / "work" / "ref_logps.pt").exists()  # REDI never touches a reference


def test_dpo_precomputed_reference_matches_live_reference(env, sft_run, tmp_path):
    d, data = env
    runs = {}
    for pre in (True, False):
        cfg = Stage2Config(loss="dpo", beta=0.1, lr=1e-3, max_steps=2, precompute_ref=pre, **SMALL)
        T.train_stage2(cfg, sft_run[1] / "model", data["pairs"], tmp_path / f"o{pre}", tmp_path / f"w{pre}", "cpu")
        runs[pre] = _weights(tmp_path / f"o{pre}" / "model")
    # same updates (Adam turns float64-vs-float32 reference rounding into ~1e-5 differences at lr 1e-3)
    assert _max_diff(runs[True], runs[False]) < 2e-4
    assert _max_diff(runs[True], _weights(sft_run[1] / "model")) > 1e-3


# ------------------------------------------------------------------ resume
class Killed(RuntimeError):
    """Stands for a kill right after a checkpoint (raised by a redi.train.CHECKPOINT_HOOKS hook)."""


def kill_after(n: int):
    def hook(step: int) -> None:
        if step == n:
            raise Killed(f"simulated kill after step {step}")
    return hook



def test_killed_run_resumes_to_same_weights(env, tmp_path, monkeypatch):
    d, data = env
    cfg = SFTConfig(lr=3e-3, max_steps=6, global_batch=8, micro_batch=4, save_steps=3)
    T.train_sft(cfg, d / "base", data["positives"], tmp_path / "full", tmp_path / "wfull", "cpu")
    monkeypatch.setattr(T, "CHECKPOINT_HOOKS", [kill_after(3)])
    with pytest.raises(Killed):
        T.train_sft(cfg, d / "base", data["positives"], tmp_path / "part", tmp_path / "wpart", "cpu")
    assert (tmp_path / "wpart" / "checkpoint-3").exists()
    monkeypatch.setattr(T, "CHECKPOINT_HOOKS", [])
    s = T.train_sft(cfg, d / "base", data["positives"], tmp_path / "part2", tmp_path / "wpart", "cpu")
    assert s["resumed_from_step"] == 3
    assert len((tmp_path / "part2" / "signals.jsonl").read_text().splitlines()) == 6
    assert _max_diff(_weights(tmp_path / "full" / "model"), _weights(tmp_path / "part2" / "model")) < 1e-6


def test_flipped_bit_in_a_checkpoint_falls_back_to_the_previous_one(env, tmp_path, monkeypatch, caplog):
    """A resume verifies checksums.json: one flipped byte in checkpoint-4/model.safetensors is named, that
    checkpoint is dropped, training resumes from checkpoint-2 and ends with the uninterrupted run's weights."""
    d, data = env
    cfg = SFTConfig(lr=3e-3, max_steps=6, global_batch=8, micro_batch=4, save_steps=2)
    T.train_sft(cfg, d / "base", data["positives"], tmp_path / "full", tmp_path / "wfull", "cpu")
    monkeypatch.setattr(T, "CHECKPOINT_HOOKS", [kill_after(4)])
    with pytest.raises(Killed):
        T.train_sft(cfg, d / "base", data["positives"], tmp_path / "part", tmp_path / "w", "cpu")
    assert sorted(p.name for p in (tmp_path / "w").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    for ck in ("checkpoint-2", "checkpoint-4"):
        assert C.verify_checkpoint(tmp_path / "w" / ck) is None
    weights = tmp_path / "w" / "checkpoint-4" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one bit, same size
    weights.write_bytes(bytes(raw))
    monkeypatch.setattr(T, "CHECKPOINT_HOOKS", [])
    with caplog.at_level("WARNING", logger="redi.train_checkpoints"):
        s = T.train_sft(cfg, d / "base", data["positives"], tmp_path / "part2", tmp_path / "w", "cpu")
    assert f"{weights} does not match its sha256" in caplog.text
    assert "previous good checkpoint" in caplog.text
    assert s["resumed_from_step"] == 2
    assert _max_diff(_weights(tmp_path / "full" / "model"), _weights(tmp_path / "part2" / "model")) < 1e-6


def test_corrupt_only_checkpoint_starts_over(env, tmp_path, monkeypatch, caplog):
    d, data = env
    cfg = SFTConfig(lr=3e-3, max_steps=2, global_batch=8, micro_batch=4, save_steps=1)
    monkeypatch.setattr(T, "CHECKPOINT_HOOKS", [kill_after(1)])
    with pytest.raises(Killed):
        T.train_sft(cfg, d / "base", data["positives"], tmp_path / "part", tmp_path / "w", "cpu")
    (tmp_path / "w" / "checkpoint-1" / "trainer_state.json").write_text("{}")  # another size
    monkeypatch.setattr(T, "CHECKPOINT_HOOKS", [])
    with caplog.at_level("WARNING", logger="redi.train_checkpoints"):
        s = T.train_sft(cfg, d / "base", data["positives"], tmp_path / "o", tmp_path / "w", "cpu")
    assert "checkpoint-1/trainer_state.json has 2 bytes" in caplog.text and "training starts over" in caplog.text
    assert s["resumed_from_step"] == 0


def test_full_disk_at_checkpoint_is_one_line_and_leaves_no_tmp(env, tmp_path, monkeypatch):
    """ENOSPC while a checkpoint is written (injected at its last file): a StorageError naming work_dir and the
    space, no checkpoint-N.tmp left (the real C++ writer error on a full tmpfs: tests/test_faults.py)."""
    import errno

    from redi.artifacts import StorageError

    d, data = env

    def full(folder):
        (folder / "partial").write_bytes(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "optimizer.bin"))

    monkeypatch.setattr(C, "write_checksums", full)
    cfg = SFTConfig(lr=3e-3, max_steps=2, global_batch=8, micro_batch=4, save_steps=1)
    with pytest.raises(StorageError, match=r"^no space left in .*/w \(needs ~\d+ MB, \d+ MB free\): free space or set "
                                           r"run.artifact_root elsewhere$"):
        T.train_sft(cfg, d / "base", data["positives"], tmp_path / "o", tmp_path / "w", "cpu")
    assert not list((tmp_path / "w").glob("checkpoint-*"))


# ------------------------------------------------------------------ bad input


def _pairs(tmp_path, rows):
    p = tmp_path / "pairs.parquet"
    pd.DataFrame(rows).to_parquet(p)
    return p


def test_identical_and_long_prompt_pairs_dropped_and_counted(env, sft_run, tmp_path):
    d, data = env
    df = pd.read_parquet(data["pairs"]).head(8).copy()
    df.loc[df.index[:2], "rejected"] = df.loc[df.index[:2], "chosen"]  # identical pairs
    df.loc[df.index[2], "problem"] = "Tom has 1 apple. " * 60  # a very long prompt
    cfg = Stage2Config(max_steps=1, max_prompt_length=200, max_length=60, global_batch=4, micro_batch=4)
    s = T.train_stage2(cfg, sft_run[1] / "model", _pairs(tmp_path, df), tmp_path / "o", tmp_path / "w", "cpu")
    c = s["counts"]
    assert c["dropped_identical"] == 2 and c["dropped_long_prompt"] == 1 and c["examples"] == 5
    assert c["truncated_sequences"] == 10  # every kept sequence > 60 tokens: keep_end truncation


def test_all_identical_pairs_is_a_clear_error(env, sft_run, tmp_path):
    d, data = env
    df = pd.read_parquet(data["pairs"]).head(4).copy()
    df["rejected"] = df["chosen"]
    with pytest.raises(ValueError, match="no pairs left.*4 with chosen == rejected") as e:
        T.train_stage2(Stage2Config(max_steps=1), sft_run[1] / "model", _pairs(tmp_path, df), tmp_path / "o",
                       tmp_path / "w", "cpu")
    from redi.cli import user_error

    assert "no pairs left" in user_error(e.value)  # the CLI prints it as one line, no traceback


def test_empty_positives_is_a_clear_error(env, tmp_path):
    d, _ = env
    p = tmp_path / "pos.parquet"
    pd.DataFrame({"problem": ["x"], "completion": [" "]}).to_parquet(p)
    with pytest.raises(ValueError, match="no training examples"):
        T.train_sft(SFTConfig(max_steps=1), d / "base", p, tmp_path / "o", tmp_path / "w", "cpu")


def test_tokenizer_without_chat_template_is_a_clear_error(env, tmp_path):
    d, data = env
    m = tmp_path / "m"
    m.mkdir()
    for f in (d / "base").iterdir():
        if f.name != "chat_template.jinja":
            (m / f.name).write_bytes(f.read_bytes())
    tc = json.loads((m / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (m / "tokenizer_config.json").write_text(json.dumps(tc))
    with pytest.raises(ValueError, match="no chat template"):
        T.train_sft(SFTConfig(max_steps=1), m, data["positives"], tmp_path / "o", tmp_path / "w", "cpu")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(env, sft_run, tmp_path, monkeypatch):
    d, data = env
    calls = {"n": 0}
    real = OBJECTIVES["redi"].fn

    def poisoned(b, cfg):
        calls["n"] += 1
        out = real(b, cfg)
        return out * float("nan") if calls["n"] > 4 else out  # 2 micro-batches per step: NaN in step 3

    monkeypatch.setitem(OBJECTIVES, "redi", dataclasses.replace(OBJECTIVES["redi"], fn=poisoned))
    cfg = Stage2Config(lr=1e-4, max_steps=4, global_batch=8, micro_batch=4, save_steps=1)
    with pytest.raises(T.TrainingError, match=r"non-finite.*step 3.*checkpoint-2"):
        T.train_stage2(cfg, sft_run[1] / "model", data["pairs"], tmp_path / "o", tmp_path / "w", "cpu")
    assert (tmp_path / "w" / "checkpoint-2").exists() and not (tmp_path / "w" / "checkpoint-3").exists()


def test_unknown_device_and_loss_errors():
    with pytest.raises(ValueError, match="device"):
        T.resolve_device("tpu", "auto")
    with pytest.raises(ValueError, match="cuda"):
        if not torch.cuda.is_available():
            T.resolve_device("cuda", "auto")
        else:
            raise ValueError("cuda present")


def test_collapse_warning(caplog):
    from redi.signals import SignalLog

    s = SignalLog(collapse_threshold=-0.1)
    with caplog.at_level("WARNING"):
        for i, c in enumerate([-0.05, -0.2, -0.3]):
            s.add({"step": i + 1, "chosen_logp": c})
    assert s.collapse_steps == 2 and sum("collapse" in r.message for r in caplog.records) == 1


def test_collapse_warning_relative_to_the_start(caplog):
    """From a start already below the absolute threshold only the fall relative to the start counts."""
    from redi.signals import SignalLog

    s = SignalLog(collapse_threshold=-0.1, collapse_drop=0.3)
    with caplog.at_level("WARNING"):
        for i, c in enumerate([-0.62, -0.65, -0.80, -1.5, -2.8]):
            s.add({"step": i + 1, "chosen_logp": c})
    assert [r["collapsed"] for r in s.records] == [False, False, False, True, True]
    assert sum("collapse_drop" in r.message for r in caplog.records) == 1
    quiet = SignalLog(collapse_threshold=-0.1)  # absolute only, start below it: never fires
    for i, c in enumerate([-0.62, -2.8]):
        quiet.add({"step": i + 1, "chosen_logp": c})
    assert quiet.collapse_steps == 0


# ------------------------------------------------------------------ multi-process


_DDP_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from redi.config import SFTConfig
from redi.train import train_sft
cfg = SFTConfig(lr=3e-3, max_steps=3, global_batch=8, micro_batch=2, save_steps=100)
train_sft(cfg, Path({base!r}), Path({pos!r}), Path(sys.argv[1]), Path(sys.argv[2]), "cpu")
"""


@pytest.mark.slow
def test_two_process_gloo_matches_one_process(env, tmp_path):
    d, data = env
    script = tmp_path / "run.py"
    script.write_text(_DDP_SCRIPT.format(tests=str(Path(__file__).parent), base=str(d / "base"),
                                         pos=str(data["positives"])))
    penv = {**os.environ, "OMP_NUM_THREADS": "1", "REDI_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node"]
    subprocess.run(torchrun + ["1", str(script), str(tmp_path / "o1"), str(tmp_path / "w1")], check=True, env=penv)
    subprocess.run(torchrun + ["2", str(script), str(tmp_path / "o2"), str(tmp_path / "w2")], check=True, env=penv)
    assert _max_diff(_weights(tmp_path / "o1" / "model"), _weights(tmp_path / "o2" / "model")) < 1e-5
    l1 = [json.loads(x)["loss"] for x in (tmp_path / "o1" / "signals.jsonl").read_text().splitlines()]
    l2 = [json.loads(x)["loss"] for x in (tmp_path / "o2" / "signals.jsonl").read_text().splitlines()]
    assert l1 == pytest.approx(l2, rel=1e-5)


def test_saved_state_casts_floating_weights_and_drops_the_wrapper_prefix():
    state = {"lm.w": torch.tensor([1.0 + 2**-12, 3.0]), "lm.idx": torch.tensor([1, 2])}
    out = R.saved_state(state, "bfloat16")
    assert out["w"].dtype == torch.bfloat16 and out["w"].tolist() == [1.0, 3.0]  # rounded to bf16's 8-bit mantissa
    assert out["idx"].dtype == torch.int64
    assert R.saved_state(state, "auto")["w"].dtype == torch.float32


def test_tied_head_notice_is_dropped_other_shared_tensors_are_not():
    import logging

    def rec(msg: str) -> logging.LogRecord:
        return logging.LogRecord("accelerate.utils.other", logging.WARNING, "", 0, msg, None, None)

    assert not C.tied_head_notice(rec("Removed shared tensor {'lm.lm_head.weight'} while saving. This should be OK"))
    assert C.tied_head_notice(rec("Removed shared tensor {'lm.lm_head.weight', 'lm.model.norm.weight'} while saving."))
    assert C.tied_head_notice(rec("something else"))
    # as accelerate's logger sends it (a rank prefix in front)
    assert not C.tied_head_notice(rec("[RANK 0] Removed shared tensor {'lm.lm_head.weight'} while saving. This should be OK"))
    assert C.tied_head_notice(rec("[RANK 1] Removed shared tensor {'lm.model.norm.weight'} while saving."))
