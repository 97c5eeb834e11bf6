"""The base model of a run: a tiny Qwen2 built offline, or a Hub / local model with the paper's config edits.

``build_base_model(cfg, out_dir, traces_path)`` writes a transformers folder (config, safetensors,
tokenizer with a chat template, generation config) that the training stages, the verify stage (token
counts) and vLLM all load.

Tiny model (``cfg.base == "tiny"``):
- tokenizer: byte-level BPE trained with the ``tokenizers`` library on the traces' user turns
  (problem + Open-R1 suffix) and traces. Its normaliser, pre-tokenizer (Qwen2's regex, which splits
  every digit into its own token), BPE settings and decoder are exactly those that transformers'
  ``Qwen2Tokenizer`` rebuilds, so ``AutoTokenizer`` (and hence vLLM) and ``load_tokenizer`` give
  identical ids — a tokenizer reloaded by vLLM cannot give other ids than training's. Special tokens:
  ``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>`` (EOS), ``<think>``, ``</think>``.
- model: ``Qwen2ForCausalLM`` from scratch, tied embeddings, grouped-query attention, sized by
  ``cfg.tiny``; saved in **float32**: CPU training runs in fp32 and stage 2's small learning rates
  need fp32 master weights. Evaluation may serve the checkpoint in fp32 or bf16.

Every stage loads tokenizers with :func:`load_tokenizer` (never ``AutoTokenizer`` directly).

Hub / local model: ``from_pretrained(base, revision, trust_remote_code)`` with the recipe's config
overrides (the paper sets max_position_embeddings 32768 and rope_theta 300000 for
Qwen2.5-Math-1.5B) and a chat template installed when the tokenizer has none (or the recipe sets one).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .config.model import ModelConfig, TinyModelConfig
from .prompts import CHATML_TEMPLATE, PROTOCOLS

log = logging.getLogger(__name__)

PAD, IM_START, IM_END, THINK, END_THINK = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END, THINK, END_THINK]
MARKER = "redi_tokenizer.json"
"""A file written next to a locally trained tokenizer; its presence makes load_tokenizer use the exact file."""

# Qwen2Tokenizer's pre-tokenizer regex (transformers/models/qwen2/tokenization_qwen2.py): \p{N} = one digit.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


# ----------------------------------------------------------------------------------------- tokenizer


def load_tokenizer(path: str | Path, trust_remote_code: bool = False, revision: str | None = None) -> Any:
    """THE way every stage loads a tokenizer.

    A folder written by :func:`build_base_model` for the tiny model holds ``redi_tokenizer.json``;
    it is loaded as ``PreTrainedTokenizerFast`` from its own ``tokenizer.json`` (exactly as trained).
    Anything else goes through ``AutoTokenizer`` (Hub ids, real checkpoints).
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    p = Path(path)
    if (p / MARKER).exists():
        return PreTrainedTokenizerFast.from_pretrained(str(p))
    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code, revision=revision)


def _training_texts(traces_path: Path, limit: int) -> Iterator[str]:
    """User turns (problem + suffix) and traces of the first `limit` trace rows."""
    import pandas as pd

    df = pd.read_parquet(traces_path, columns=["problem", "trace"]).head(limit)
    if df.empty:
        raise ValueError(f"{traces_path}: no traces to train the tiny tokenizer on")
    # Role names are included so that the chat template's "user"/"assistant" become single tokens.
    for problem in df["problem"].drop_duplicates():
        yield "user\n" + PROTOCOLS["open-r1"].user_turn(str(problem))
    for trace in df["trace"]:
        yield "assistant\n" + str(trace)


def train_tokenizer(texts: Iterator[str] | list[str], vocab_size: int) -> Any:
    """A byte-level BPE with Qwen2's normaliser/pre-tokenizer/decoder, wrapped as a fast tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=PAD, bos_token=None,
                                   unk_token=None, additional_special_tokens=[IM_START, THINK, END_THINK])
    fast.chat_template = CHATML_TEMPLATE
    fast.model_max_length = 1 << 30
    return fast


# ----------------------------------------------------------------------------------------- tiny model


def tiny_config(t: TinyModelConfig, tokenizer: Any) -> Any:
    """A Qwen2Config sized by ``t``; vocabulary = the trained tokenizer's size."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
        max_position_embeddings=t.max_position_embeddings, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD), use_cache=True, dtype="float32",
    )


def _save_generation_config(model: Any, tokenizer: Any) -> None:
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None


def build_tiny(cfg: ModelConfig, out_dir: Path, traces_path: Path) -> dict:
    """Train the tokenizer on the traces, build a random Qwen2, save both (fp32 safetensors)."""
    import torch
    from transformers import Qwen2ForCausalLM

    t = cfg.tiny
    tok = train_tokenizer(_training_texts(Path(traces_path), t.tokenizer_samples), t.vocab_size)
    torch.manual_seed(t.seed)
    model = Qwen2ForCausalLM(tiny_config(t, tok)).float()
    _save_generation_config(model, tok)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    (out_dir / MARKER).write_text(json.dumps({"loader": "PreTrainedTokenizerFast", "why": "redi.tinymodel.load_tokenizer"}))
    n = sum(p.numel() for p in model.parameters())
    log.info("tiny model: %.3fM parameters, vocab %d, saved to %s (float32)", n / 1e6, len(tok), out_dir)
    return {"params": n, "vocab_size": len(tok), "dtype": "float32", "base": "tiny"}


# ----------------------------------------------------------------------------------------- Hub model


def _apply_overrides(config: Any, cfg: ModelConfig) -> dict:
    """The paper's config edits (max_position_embeddings, rope_theta); returns what changed."""
    changed: dict[str, Any] = {}
    if cfg.max_position_embeddings is not None:
        config.max_position_embeddings = cfg.max_position_embeddings
        changed["max_position_embeddings"] = cfg.max_position_embeddings
    if cfg.rope_theta is not None:
        rp = getattr(config, "rope_parameters", None)
        if isinstance(rp, dict):
            rp["rope_theta"] = cfg.rope_theta
        else:
            config.rope_theta = cfg.rope_theta
        changed["rope_theta"] = cfg.rope_theta
    return changed


def build_pretrained(cfg: ModelConfig, out_dir: Path) -> dict:
    """Load cfg.base (Hub id or folder) with its revision, edit its config, install a template, save."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
    config = AutoConfig.from_pretrained(cfg.base, **kw)
    changed = _apply_overrides(config, cfg)
    model = AutoModelForCausalLM.from_pretrained(cfg.base, config=config, dtype="auto", **kw)
    tok = load_tokenizer(cfg.base, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    if cfg.chat_template:
        tok.chat_template = cfg.chat_template
    elif not getattr(tok, "chat_template", None):
        log.info("%s has no chat template: installing the Qwen-style ChatML one", cfg.base)
        tok.chat_template = CHATML_TEMPLATE
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    n = sum(p.numel() for p in model.parameters())
    return {"params": n, "vocab_size": len(tok), "dtype": str(model.dtype).replace("torch.", ""),
            "base": cfg.base, "revision": cfg.revision, "config_overrides": changed}


def build_base_model(cfg: ModelConfig, out_dir: Path, traces_path: Path | None) -> dict:
    """Entry point of the ``model`` stage: write the base model folder to ``out_dir``; return a summary."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if cfg.base == "tiny":
        if traces_path is None:
            raise ValueError("model.base is 'tiny' but no traces were given to train its tokenizer on")
        summary = build_tiny(cfg, out_dir, Path(traces_path))
    else:
        summary = build_pretrained(cfg, out_dir)
    summary["seconds"] = round(time.time() - t0, 2)
    return summary
