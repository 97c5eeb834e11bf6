"""GPU training benchmark at the paper's scale: peak memory and tokens/s of SFT and REDI steps.

On one CUDA GPU: a Qwen2.5-Math-1.5B-shaped model (random init; hidden 1536, 28 layers, 12 heads / 2
KV heads, MLP 8960, vocabulary 151,936, tied embeddings; max positions raised to 32,768 so 32k rows
fit), fp32 master weights with bf16 autocast and gradient checkpointing (what ``redi.train`` runs
under accelerate's ``mixed_precision: bf16``), fused AdamW. For each micro-batch size in tokens
(default 4k, 16k, 32k) it runs a few optimiser steps of

- SFT: sequences of ``tokens/4`` (200-token prompts), completion-only NLL;
- REDI: one pair of ``tokens/2`` each (chosen + rejected), Eq. 5 with alpha 0.8;

for every available attention path (``flash_attention_2`` if flash-attn imports: one packed row
read as varlen; ``sdpa``: each packed sequence alone, no mask) and log-prob path (``liger`` if
liger-kernel >= 0.8.5 imports, ``chunked``, and ``full`` = the former (N, V) fp32 logits path, for
comparison), all through the library's own code (``redi.packing.collate`` / ``row_budget`` /
``sequence_logps``, ``redi.logprobs.LogProbLM``, ``redi.losses``). Prints and writes a markdown table (peak GPU memory
from ``torch.cuda.max_memory_allocated``, tokens/s as the median of the timed steps).

Needs torch and transformers (optional: flash-attn, liger-kernel). On a machine without
CUDA it says so and exits 0. ``--cpu-smoke`` runs the same code on a tiny model on CPU (for tests).

Usage: ``python benchmarks/bench_gpu.py [--tokens 4096,16384,32768] [--steps 3] [--out docs/benchmarks/gpu_run.md]``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from redi.logprobs import LogProbLM, full_logits_token_logps, liger_available  # noqa: E402
from redi.losses import redi_loss  # noqa: E402
from redi.packing import Example, collate, row_budget, sequence_logps  # noqa: E402

FULL = dict(vocab_size=151_936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
            num_key_value_heads=2, max_position_embeddings=32768, rope_theta=10000.0, rms_norm_eps=1e-6,
            tie_word_embeddings=True)
TINY = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=4096, tie_word_embeddings=True)
PROMPT = 200


def build(shape: dict, device: str):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(**shape, use_cache=False, attn_implementation="sdpa")
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def set_attention(model, impl: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:
        model.config._attn_implementation = impl


def attention_paths(device: str) -> list[str]:
    paths = ["sdpa"]
    if device == "cuda":
        from transformers.utils import is_flash_attn_2_available

        if is_flash_attn_2_available():
            paths.insert(0, "flash_attention_2")
    return paths


def logprob_paths(device: str) -> list[str]:
    return (["liger"] if device == "cuda" and liger_available() else []) + ["chunked", "full"]


def examples(task: str, tokens: int, vocab: int, prompt: int, seed: int) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    n, each = (4, tokens // 4) if task == "sft" else (2, tokens // 2)
    return [Example(tuple(torch.randint(0, vocab, (each,), generator=g).tolist()), min(prompt, each // 2))
            for _ in range(n)]


def one_step(model, opt, task: str, exs: list[Example], logprob: str, device: str, split: bool | None) -> None:
    batch = collate(exs, packed=True, pad_id=0, row_tokens=row_budget(device, 512)).to(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        if logprob == "full":
            lp = full_logits_token_logps(model, batch.input_ids, batch.keep, batch.targets, batch.position_ids)
            sums = torch.zeros(batch.n_seqs, device=device).index_add(0, batch.seg, lp)
        else:  # what the trainer runs
            sums, _ = sequence_logps(LogProbLM(model, kernel=logprob, split=split), batch)
    lens = torch.bincount(batch.seg, minlength=batch.n_seqs)
    loss = -sums.sum() / lens.sum() if task == "sft" else redi_loss(sums[:1], sums[1:], lens[:1], lens[1:], alpha=0.8).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def measure(model, opt, task, tokens, attn, logprob, device, steps, split) -> dict:
    set_attention(model, attn)
    exs = examples(task, tokens, model.config.vocab_size, PROMPT if device == "cuda" else 8, seed=tokens)
    row = {"task": task, "tokens": tokens, "attention": attn, "logprobs": logprob}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    try:
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        one_step(model, opt, task, exs, logprob, device, split)  # warm-up (kernels, allocator)
        times = []
        for _ in range(steps):
            sync()
            t0 = time.perf_counter()
            one_step(model, opt, task, exs, logprob, device, split)
            sync()
            times.append(time.perf_counter() - t0)
        row["step_s"] = statistics.median(times)
        row["tokens_per_s"] = tokens / row["step_s"]
        row["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    except torch.OutOfMemoryError:
        row["error"] = "out of memory"
        opt.zero_grad(set_to_none=True)
    return row


def versions() -> str:
    import transformers

    out = [f"python {platform.python_version()}", f"torch {torch.__version__}", f"transformers {transformers.__version__}"]
    for mod in ("flash_attn", "liger_kernel"):
        try:
            from importlib.metadata import version

            out.append(f"{mod} {version(mod.replace('_', '-'))}")
        except Exception:  # noqa: BLE001 - optional package absent
            out.append(f"{mod} absent")
    return ", ".join(out)


def render(rows: list[dict], device_name: str, n_params: int, args) -> str:
    lines = [
        f"GPU benchmark (`benchmarks/bench_gpu.py`), {time.strftime('%Y-%m-%d %H:%M')}, {device_name}; {versions()}.",
        f"Model: {n_params / 1e9:.2f}B params ({'Qwen2.5-Math-1.5B shape' if not args.cpu_smoke else 'tiny CPU smoke shape'}), "
        f"fp32 weights + bf16 autocast, gradient checkpointing, {'AdamW' if args.cpu_smoke else 'fused AdamW'}; "
        f"median of {args.steps} steps after one warm-up.",
        "",
        "| task | tokens / micro-batch | attention | log-probs | peak GPU GiB | tokens/s | step s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r or "skipped" in r:
            lines.append(f"| {r['task']} | {r['tokens']:,} | {r['attention']} | {r['logprobs']} | "
                         f"{r.get('error') or r.get('skipped')} | - | - |")
            continue
        peak = f"{r['peak_gb']:.1f}" if r["peak_gb"] is not None else "n/a (CPU)"
        lines.append(f"| {r['task']} | {r['tokens']:,} | {r['attention']} | {r['logprobs']} | {peak} | "
                     f"{r['tokens_per_s']:,.0f} | {r['step_s']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="4096,16384,32768", help="tokens per micro-batch")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per setting (after one warm-up)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip the remaining settings after this many seconds")
    ap.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    ap.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        device, shape, sizes = "cpu", TINY, [64]
    elif not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing to measure here.")
        return 0
    else:
        device, shape, sizes = "cuda", FULL, [int(x) for x in args.tokens.split(",")]
    t_start = time.time()
    model = build(shape, device)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=1e-4, fused=device == "cuda")
    # CPU smoke: force the CUDA no-flash layout (each packed sequence alone) so that path runs too.
    split = True if args.cpu_smoke else None
    rows = []
    for tokens in sizes:
        for task in ("sft", "redi"):
            for attn in attention_paths(device):
                for logprob in logprob_paths(device):
                    if time.time() - t_start > args.budget_s:
                        rows.append({"task": task, "tokens": tokens, "attention": attn, "logprobs": logprob,
                                     "skipped": "skipped (time budget)"})
                        continue
                    r = measure(model, opt, task, tokens, attn, logprob, device, args.steps, split)
                    print(r, flush=True)
                    rows.append(r)
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU smoke ({platform.processor() or 'cpu'})"
    report = render(rows, name, n_params, args)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
