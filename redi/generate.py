"""Sampling completions for evaluation: one interface, two backends (vLLM, transformers ``generate``).

``open_generator(cfg, model_dir)`` returns a :class:`Generator` (a context manager); its
``generate(requests, skip)`` yields lists of samples as they finish, so the caller can grade and save them
while the rest is generated. Every sample is a dict with the columns of :data:`SAMPLE_COLUMNS`.

Backends: :mod:`redi.generate_vllm` (``cfg.backend == "vllm"``: engines in child processes,
:mod:`redi.generate_engine`, continuous batching, one seed per problem) and :mod:`redi.generate_hf`
(``cfg.backend == "hf"``: transformers ``generate``, one process). Their docstrings say how each one
schedules and seeds.

Both: a prompt that does not fit the context leaves no room to generate: its n samples are returned empty
with finish reason ``length`` (counted as truncated, never dropped). ``max_new_tokens`` is capped by the
room left in the context; hitting either limit is ``length``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import interrupt
from .config.evaluate import EvaluateConfig
from .prompts import render_prompt
from .schema import stable_id

log = logging.getLogger(__name__)

SAMPLE_COLUMNS: dict[str, str] = {
    "benchmark": "benchmark name",
    "problem_id": "problem id (the benchmark's id)",
    "sample_index": "index of the sample within its problem (0..n-1)",
    "text": "generated completion (special tokens removed; a forced prefix of the prompt protocol is not part of it)",
    "prompt_tokens": "tokens in the prompt (chat template and any forced generation prefix included)",
    "completion_tokens": "generated tokens (the EOS included when the sample stopped on it)",
    "finish_reason": "'stop' (EOS) or 'length' (token limit or context full)",
}


class GenerationError(RuntimeError):
    """Generation cannot start or failed; the message names the model and the cause."""


@dataclass(frozen=True)
class Request:
    """One problem to sample n completions for."""

    benchmark: str
    problem_id: str
    prompt_ids: tuple[int, ...]
    seed: int


# ---------------------------------------------------------------- model folder, tokenizer, prompts


def check_model_dir(model_dir: Path) -> Path:
    """Fail before any engine starts when the model folder is missing or is not a transformers model."""
    p = Path(model_dir)
    if not p.is_dir():
        raise GenerationError(f"model folder does not exist: {p}")
    if not (p / "config.json").exists():
        raise GenerationError(f"{p} is not a transformers model folder (no config.json)")
    return p


def load_eval_tokenizer(model_dir: Path) -> Any:
    """The model's tokenizer (``redi.tinymodel.load_tokenizer``); a missing chat template is an error."""
    from .tinymodel import load_tokenizer

    tok = load_tokenizer(check_model_dir(model_dir))
    if not getattr(tok, "chat_template", None):
        raise GenerationError(
            f"model {model_dir} has no chat template: evaluation prompts use the model's chat template "
            "(set model.chat_template in the recipe, e.g. redi.prompts.CHATML_TEMPLATE, and rebuild the model)"
        )
    if tok.eos_token_id is None:
        raise GenerationError(f"tokenizer of {model_dir} has no EOS token: generation could never stop")
    return tok


def context_length(model_dir: Path, cfg: EvaluateConfig) -> int:
    """Tokens that fit in one sequence: cfg.max_model_len, else the model's max_position_embeddings."""
    if cfg.max_model_len:
        return cfg.max_model_len
    conf = json.loads((Path(model_dir) / "config.json").read_text())
    text = conf.get("text_config", conf)
    return int(text.get("max_position_embeddings") or text.get("max_sequence_length") or 32768)


def problem_seed(cfg: EvaluateConfig, benchmark: str, problem_id: str) -> int:
    return int(stable_id(cfg.seed, benchmark, problem_id), 16) % (2**31 - 1)


def build_requests(tokenizer: Any, benchmark: str, rows: Sequence[dict], cfg: EvaluateConfig) -> list[Request]:
    """One request per problem: the evaluation protocol's prompt in the model's chat template (its forced
    prefix last, so counted in ``prompt_tokens``), tokenised."""
    out, protocol = [], cfg.protocol()
    for r in rows:
        text = render_prompt(tokenizer, r["problem"], protocol)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        out.append(Request(benchmark, r["id"], tuple(ids), problem_seed(cfg, benchmark, r["id"])))
    return out


def sampling(cfg: EvaluateConfig) -> dict:
    """The sampling protocol (paper final tables: n=16, T=0.6, top_p=0.95, max 30,720 new tokens)."""
    return {"n": cfg.n_samples, "temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.new_tokens()}


def sample_rows(req: Request, outs: Sequence[tuple[Sequence[int], str]], tokenizer: Any,
                keep_special: bool = False) -> list[dict]:
    """The rows (:data:`SAMPLE_COLUMNS`) of one problem's outputs (token ids, finish reason); a final EOS is
    counted in ``completion_tokens``, not decoded.

    ``keep_special`` (``evaluate.keep_special_tokens``, set by the ``generate`` data source): decode the
    tokenizer's special tokens too, so that a trace reads as the model wrote it (``<think>`` ... ``</think>``
    where the tokenizer marks them special); the final stop token, whichever special token it is, is still
    not decoded. Evaluation skips them (vLLM's default): only the answer is graded."""
    eos = tokenizer.eos_token_id
    stops = set(getattr(tokenizer, "all_special_ids", ()) or ()) | {eos} if keep_special else {eos}
    rows = []
    for i, (ids, finish) in enumerate(outs):
        ids = list(ids)
        body = ids[:-1] if ids and ids[-1] in stops and finish == "stop" else ids
        rows.append({
            "benchmark": req.benchmark, "problem_id": req.problem_id, "sample_index": i,
            "text": tokenizer.decode(body, skip_special_tokens=not keep_special), "prompt_tokens": len(req.prompt_ids),
            "completion_tokens": len(ids), "finish_reason": finish or "length",
        })
    return rows


# ---------------------------------------------------------------- the interface


class Generator:
    """Base class: chunking, prompts that do not fit, and the context-manager protocol."""

    backend = "?"

    def __init__(self, cfg: EvaluateConfig, model_dir: Path, tokenizer: Any):
        self.cfg, self.model_dir, self.tokenizer = cfg, Path(model_dir), tokenizer
        self.ctx = context_length(model_dir, cfg)
        self.chunk = cfg.gen_chunk_prompts

    def generate(self, requests: Sequence[Request], skip: frozenset = frozenset()) -> Iterator[list[dict]]:
        """Yield lists of samples (n per request, all columns of SAMPLE_COLUMNS), batch by batch.

        ``skip`` holds (benchmark, problem id) pairs already done (a resumed run): a batch whose problems
        are all done is not generated; a batch with any missing is generated whole (its samples depend on
        the batch) and only the missing problems are yielded, so a resumed run draws what an uninterrupted
        one would.
        """
        params = sampling(self.cfg)
        for start in range(0, len(requests), self.chunk):
            interrupt.check("generation")
            chunk = list(requests[start : start + self.chunk])
            if all((r.benchmark, r.problem_id) in skip for r in chunk):
                continue
            fits = [r for r in chunk if len(r.prompt_ids) < self.ctx]
            outs = dict(zip(fits, self._generate(fits, params), strict=True)) if fits else {}
            rows: list[dict] = []
            for r in chunk:
                if (r.benchmark, r.problem_id) in skip:
                    continue
                rows += sample_rows(r, outs[r], self.tokenizer, self.cfg.keep_special_tokens) if r in outs else self._unfit(r, params["n"])
            yield rows

    def _unfit(self, r: Request, n: int) -> list[dict]:
        log.warning("%s/%s: prompt of %d tokens does not fit the context (%d): %d samples counted as truncated",
                    r.benchmark, r.problem_id, len(r.prompt_ids), self.ctx, n)
        return sample_rows(r, [((), "length")] * n, self.tokenizer)

    def _generate(self, requests: list[Request], params: dict) -> list[list[tuple[list[int], str]]]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_generator(cfg: EvaluateConfig, model_dir: Path, tokenizer: Any | None = None, log_path: Path | None = None) -> Generator:
    """The backend the config names, started for `model_dir` (checked first: no engine for a bad path).

    ``log_path``: vLLM engines write their stdout/stderr there (appended; vLLM's INFO and warnings, library
    warnings, tracebacks) instead of the console; a failure's error quotes its last lines. None: a file in
    the engines' temporary cache folder, deleted on close."""
    check_model_dir(model_dir)
    tokenizer = tokenizer or load_eval_tokenizer(model_dir)
    if cfg.backend == "hf":
        if cfg.data_parallel_size > 1:
            raise GenerationError(f"evaluate.data_parallel_size={cfg.data_parallel_size} needs backend=vllm "
                                  "(the transformers backend runs one process on one device): set it to 1")
        from .generate_hf import HFGenerator

        return HFGenerator(cfg, model_dir, tokenizer)
    from .generate_vllm import VLLMGenerator

    return VLLMGenerator(cfg, model_dir, tokenizer, log_path)
