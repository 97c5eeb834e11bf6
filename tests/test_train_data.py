"""redi.train_data token tables: Arrow files built once, memory-mapped, same examples as in memory."""

import os

import numpy as np
import pandas as pd
import pytest
from _train_data import write_fixture

from redi import train_data as D
from redi.config import ModelConfig, SFTConfig, Stage2Config
from redi.config.model import TinyModelConfig
from redi.packing import make_example
from redi.prompts import completion_suffix, render_prompt
from redi.tinymodel import build_base_model, load_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("tokens")
    data = write_fixture(d / "data", n_problems=24)
    build_base_model(ModelConfig(tiny=TinyModelConfig(num_layers=1)), d / "base", data["traces"])
    return d, data, load_tokenizer(d / "base")


def _same(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert list(x.ids) == list(y.ids) and x.prompt_len == y.prompt_len


def test_pairs_cached_equal_in_memory_and_are_memory_mapped(env, tmp_path, monkeypatch):
    d, data, tok = env
    cfg = Stage2Config(max_length=120)
    mem, counts = D.load_pair_examples(cfg, tok, data["pairs"])
    cached, counts2 = D.load_pair_examples(cfg, tok, data["pairs"], cache_dir=tmp_path)
    assert counts == counts2 and len(cached) == counts["examples"] > 0
    _same([p for pair in mem for p in pair], [p for pair in cached for p in pair])
    ids = cached[0][0].ids
    assert ids.dtype == np.int32 and not ids.flags.writeable and not ids.flags.owndata  # a view into the mapped file
    assert len(list(tmp_path.glob("pairs-*.arrow"))) == 1
    # the second load maps the file without tokenising again
    monkeypatch.setattr(D, "_build_pairs", lambda *a: pytest.fail("rebuilt a cached token table"))
    again, _ = D.load_pair_examples(cfg, tok, data["pairs"], cache_dir=tmp_path)
    _same([p for pair in cached for p in pair], [p for pair in again for p in pair])
    # another length limit is another table
    monkeypatch.undo()
    D.load_pair_examples(Stage2Config(max_length=60), tok, data["pairs"], cache_dir=tmp_path)
    assert len(list(tmp_path.glob("pairs-*.arrow"))) == 2


def test_sft_examples_match_direct_tokenisation(env, tmp_path):
    d, data, tok = env
    cfg = SFTConfig(max_length=100)
    table, counts = D.load_sft_examples(cfg, tok, data["positives"], cache_dir=tmp_path)
    df = pd.read_parquet(data["positives"])
    assert counts["examples"] == len(table) == len(df)
    for i in (0, len(df) - 1):
        p = tok(render_prompt(tok, df.problem.iloc[i]), add_special_tokens=False)["input_ids"]
        c = tok(df.completion.iloc[i] + completion_suffix(tok), add_special_tokens=False)["input_ids"]
        ex, _ = make_example(p, c, tok.eos_token_id, cfg.max_length, keep="start")
        assert list(table[i].ids) == list(ex.ids) and table[i].prompt_len == ex.prompt_len
    assert table[:3][2].completion_len == table[2].completion_len


def test_other_ranks_wait_for_local_rank_zero(env, tmp_path, monkeypatch):
    d, data, tok = env
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("REDI_TOKENS_WAIT_S", "0.5")
    with pytest.raises(TimeoutError, match="local rank 0 tokenises it"):
        D.load_sft_examples(SFTConfig(), tok, data["positives"], cache_dir=tmp_path)
    assert not list(tmp_path.glob("*.arrow"))  # rank 1 never builds
    monkeypatch.setenv("LOCAL_RANK", "0")
    built, _ = D.load_sft_examples(SFTConfig(), tok, data["positives"], cache_dir=tmp_path)
    monkeypatch.setenv("LOCAL_RANK", "1")
    mapped, _ = D.load_sft_examples(SFTConfig(), tok, data["positives"], cache_dir=tmp_path)
    _same(built, mapped)


def test_sft_loss_on_prompt_puts_every_token_but_the_first_in_the_loss(env):
    """sft.loss_on_prompt (the official run's collator masks nothing): same ids, prompt_len 0, so |y| = all tokens but the first."""
    d, data, tok = env
    plain, _ = D.load_sft_examples(SFTConfig(max_length=100), tok, data["positives"])
    full, _ = D.load_sft_examples(SFTConfig(max_length=100, loss_on_prompt=True), tok, data["positives"])
    assert len(plain) == len(full)
    for a, b in zip(plain, full, strict=True):
        assert list(a.ids) == list(b.ids) and a.prompt_len > 0 and b.prompt_len == 0
        assert b.completion_len == len(b.ids) - 1 > a.completion_len  # the first token is never predicted


def test_long_prompts_drop_or_truncate_keeping_the_end(env):
    """redi.long_prompts: `drop` removes the pair; `truncate` keeps the prompt's last max_prompt_length tokens
    (the official TRL fork's prompt_input_ids[-max_prompt_length:]) and keeps every pair."""
    d, data, tok = env
    pairs = pd.read_parquet(data["pairs"])
    n_prompt = [len(tok(render_prompt(tok, p), add_special_tokens=False)["input_ids"]) for p in pairs["problem"]]
    limit = sorted(n_prompt)[len(n_prompt) // 2]  # about half the prompts are longer
    longer = sum(n > limit for n in n_prompt)
    assert 0 < longer < len(pairs)
    dropped, c1 = D.load_pair_examples(Stage2Config(max_length=400, max_prompt_length=limit), tok, data["pairs"])
    cut, c2 = D.load_pair_examples(Stage2Config(max_length=400, max_prompt_length=limit, long_prompts="truncate"),
                                   tok, data["pairs"])
    assert c1["dropped_long_prompt"] == c2["truncated_long_prompt"] == longer
    assert len(dropped) == len(pairs) - longer and len(cut) == len(pairs)
    for i, (chosen, _) in enumerate(cut):
        full = tok(render_prompt(tok, pairs["problem"][i]), add_special_tokens=False)["input_ids"]
        assert chosen.prompt_len == min(len(full), limit)
        assert list(chosen.ids[:chosen.prompt_len]) == full[-chosen.prompt_len:]
