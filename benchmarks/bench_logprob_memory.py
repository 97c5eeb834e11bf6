"""Peak memory and speed of one REDI step's log-probs: full (N, V) logits (the former path) vs chunked.

A Qwen2.5-1.5B-shaped model (hidden 1536, vocabulary 151,936, tied embeddings, Qwen2.5-1.5B's
attention and MLP sizes) with ``--layers`` decoder layers (default 1), random init, fp32 weights,
bf16 autocast on CPU. One step = one pair (chosen + rejected, each ``T/2`` completion tokens after a
64-token prompt, one row each), forward + REDI loss + backward, no optimiser.

- ``full``: ``redi.logprobs.full_logits_token_logps``, the model's own forward with
  ``logits_to_keep`` then ``.float()`` + ``logsumexp`` (the former ``redi.packing`` path).
- ``chunked``: ``redi.packing.sequence_logps`` through ``redi.logprobs.LogProbLM`` (``kernel="chunked"``),
  what the trainer runs on CPU for a pair at this head: ``ChunkedLinearLogp``, whose first chunks keep
  ``onehot - softmax`` up to ``KEEP_BYTES`` (1 GiB) and the rest recompute their logits in backward.

Each (method, T) runs in its own subprocess so peak RSS is clean: reported is the peak RSS during the
step (sampled every 2 ms, and ``ru_maxrss``) minus the RSS right before it (model built, batch made).
Speed: one more subprocess with one model that alternates full and chunked steps per size (after a
warm-up step of each), ``--speed-rounds`` rounds, medians (separate processes mislead on a shared machine). The full path cannot hold 19k tokens in 24 GB: it runs up to
``--full-max`` tokens and its growth per token is fitted (least squares) and extrapolated.

Usage: ``python benchmarks/bench_logprob_memory.py [--out docs/benchmarks/train.md]`` (replaces only its own
section of that file).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HIDDEN, VOCAB, HEADS, KV_HEADS, MLP = 1536, 151_936, 12, 2, 8960  # Qwen2.5-(Math-)1.5B
PROMPT = 64


def build_model(layers: int, checkpointing: bool = False):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=layers,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, tie_word_embeddings=True,
                      max_position_embeddings=32768, attn_implementation="sdpa", use_cache=False)
    model = Qwen2ForCausalLM(cfg)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def make_batch(tokens: int, seed: int = 0):
    import torch

    from redi.packing import Example, collate

    g = torch.Generator().manual_seed(seed)
    half = tokens // 2
    seqs = [Example(tuple(torch.randint(0, VOCAB, (PROMPT + half,), generator=g).tolist()), PROMPT) for _ in range(2)]
    return collate(seqs, packed=True, row_tokens=PROMPT + half)  # one row per sequence, as the trainer's CPU rows


def step(model, batch, method: str) -> None:
    import torch

    from redi.logprobs import LogProbLM, full_logits_token_logps
    from redi.losses import redi_loss
    from redi.packing import sequence_logps

    with torch.autocast("cpu", dtype=torch.bfloat16):
        if method == "full":
            lp = full_logits_token_logps(model, batch.input_ids, batch.keep, batch.targets, batch.position_ids)
            sums = torch.zeros(2).index_add(0, batch.seg, lp)
        else:  # what the trainer runs: per-sequence sums through LogProbLM's chunked head
            sums, _ = sequence_logps(LogProbLM(model, kernel="chunked"), batch)
    lens = torch.bincount(batch.seg, minlength=2)
    redi_loss(sums[:1], sums[1:], lens[:1], lens[1:], alpha=0.8).sum().backward()
    model.zero_grad(set_to_none=True)


def child(method: str, tokens: int, layers: int, steps: int, checkpointing: bool) -> dict:
    import psutil
    import torch

    torch.set_num_threads(int(os.environ.get("REDI_THREADS", "2")))
    proc = psutil.Process()
    model = build_model(layers, checkpointing)
    batch = make_batch(tokens)
    before = proc.memory_info().rss
    peak, done = [before], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step(model, batch, method)
        times.append(time.perf_counter() - t0)
    done.set()
    th.join()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    n = int(batch.targets.numel())
    return {"method": method, "tokens": n, "layers": layers, "before_gb": before / 1e9,
            "growth_gb": (peak[0] - before) / 1e9, "maxrss_growth_gb": (maxrss - before) / 1e9,
            "step_s": times, "tokens_per_s": n / (times[-1] if len(times) == 1 else statistics.median(times[1:]))}


def speed_child(sizes: list[int], layers: int, rounds: int, checkpointing: bool) -> dict:
    """One process, one model: full and chunked steps alternated per size (after a warm-up of each); medians of
    wall-clock and of process CPU time (steadier on a loaded machine). Prints each size's line as it ends."""
    import torch

    torch.set_num_threads(int(os.environ.get("REDI_THREADS", "2")))
    model = build_model(layers, checkpointing)
    out = {}
    for t in sizes:
        batch = make_batch(t)
        for m in ("full", "chunked"):  # warm-up
            step(model, batch, m)
        times: dict[str, list[float]] = {"full": [], "chunked": []}
        cpu: dict[str, list[float]] = {"full": [], "chunked": []}
        for _ in range(rounds):
            for m in times:
                t0, c0 = time.perf_counter(), time.process_time()
                step(model, batch, m)
                times[m].append(time.perf_counter() - t0)
                cpu[m].append(time.process_time() - c0)
        n = int(batch.targets.numel())
        out[str(t)] = {m: n / statistics.median(v) for m, v in times.items()}
        out[str(t)].update({f"{m}_cpu": n / statistics.median(v) for m, v in cpu.items()})
        print(json.dumps({str(t): out[str(t)], "rounds": {m: v for m, v in times.items()}}), flush=True)
    return out


def run_child(method: str, tokens: int, layers: int, steps: int, checkpointing: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--child", method, str(tokens), "--layers", str(layers), "--steps", str(steps)]
    cmd += ["--checkpointing"] if checkpointing else []
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        return {"method": method, "tokens": tokens, "error": (p.stderr or p.stdout).strip().splitlines()[-1][:200]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares line growth = a + b * tokens."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def render(res: list[dict], args, a: float, b: float) -> str:
    by = {(r["method"], r["tokens"]): r for r in res if "error" not in r}
    lines = [
        f"## Log-prob memory: full (N, V) logits vs chunked, {args.layers} layer(s)"
        f"{', checkpointing' if args.checkpointing else ''} (`benchmarks/bench_logprob_memory.py`)",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} on this CPU ({os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end). "
        f"Qwen2.5-1.5B-shaped model with {args.layers} decoder layer(s) (hidden {HIDDEN}, vocabulary {VOCAB:,}, tied "
        f"embeddings), fp32 weights, bf16 autocast, gradient checkpointing {'on' if args.checkpointing else 'off'}; one pair per step (two rows, 64-token prompts), forward + REDI loss + "
        "backward. Growth = peak RSS during the step minus RSS before it, one subprocess per cell; tokens/s from one "
        f"process alternating full and chunked steps ({args.speed_rounds} rounds after a warm-up, medians).",
        "",
        "| completion tokens | full: growth GB | chunked: growth GB | chunked / full | full tokens/s | chunked tokens/s "
        "| chunked / full speed | same, CPU time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in sorted({r["tokens"] for r in res if "error" not in r}):
        f, c = by.get(("full", t)), by.get(("chunked", t))
        fg = f"{f['growth_gb']:.2f}" if f else f"~{a + b * t:.1f} (extrapolated)"
        full_g = f["growth_gb"] if f else a + b * t
        cg = f"{c['growth_gb']:.2f}" if c else "-"
        ratio = f"1/{full_g / c['growth_gb']:.1f}" if c else "-"
        fs = f"{f['tokens_per_s']:,.0f}" if f else "-"
        cs = f"{c['tokens_per_s']:,.0f}" if c else "-"
        sp = f"{c['tokens_per_s'] / f['tokens_per_s']:.2f}x" if f and c else "-"
        cpu = f"{c['cpu_tokens_per_s'] / f['cpu_tokens_per_s']:.2f}x" if f and c and c.get("cpu_tokens_per_s") else "-"
        lines.append(f"| {t:,} | {fg} | {cg} | {ratio} | {fs} | {cs} | {sp} | {cpu} |")
    lines += ["", f"Full path fitted growth: {a:.2f} GB + {b * 1e3:.2f} MB per completion token "
              f"(points: {', '.join(str(t) for (m, t) in by if m == 'full')} tokens).", ""]
    errs = [r for r in res if "error" in r]
    if errs:
        lines += ["Failed cells: " + "; ".join(f"{r['method']} {r['tokens']}: {r['error']}" for r in errs), ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs=2, metavar=("METHOD", "TOKENS"), help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (the recipe's setting)")
    ap.add_argument("--steps", type=int, default=2, help="steps per cell (the first is a warm-up when > 1)")
    ap.add_argument("--tokens", default="1024,4096,19456", help="completion tokens per step (chosen + rejected)")
    ap.add_argument("--full-max", type=int, default=4096, help="largest T the full path runs at (24 GB machine)")
    ap.add_argument("--full-extra", default="2048", help="extra T for the full path's fit")
    ap.add_argument("--rounds", type=int, default=2, help="alternated rounds of the cells up to --full-max (speed)")
    ap.add_argument("--out", type=Path, default=None, help="write the markdown table here too")
    ap.add_argument("--speed-rounds", type=int, default=3, help="alternated full/chunked steps per size in the speed process")
    ap.add_argument("--speed-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.speed_child:
        sizes_s = [int(x) for x in args.speed_child.split(",")]
        print(json.dumps(speed_child(sizes_s, args.layers, args.speed_rounds, args.checkpointing)))
        return
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.layers, args.steps, args.checkpointing)))
        return
    sizes = [int(x) for x in args.tokens.split(",")]
    extra = [int(x) for x in args.full_extra.split(",") if x]
    small = sorted({t for t in sizes + extra if t <= args.full_max})
    res: list[dict] = []
    rounds: dict[tuple[str, int], list[dict]] = {}
    for _ in range(args.rounds):
        for t in small:
            for m in ("full", "chunked") if t in sizes else ("full",):
                r = run_child(m, t, args.layers, args.steps, args.checkpointing)
                print(json.dumps(r), flush=True)
                rounds.setdefault((m, t), []).append(r)
    for rs in rounds.values():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            res.append(rs[0])
            continue
        med = dict(ok[0])
        med["growth_gb"] = max(r["growth_gb"] for r in ok)
        med["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in ok)
        res.append(med)
    for t in sizes:
        if t > args.full_max:
            r = run_child("chunked", t, args.layers, 1, args.checkpointing)
            print(json.dumps(r), flush=True)
            res.append(r)
    speed_sizes = ",".join(str(t) for t in sizes if t <= args.full_max)
    cmd = [sys.executable, __file__, "--speed-child", speed_sizes, "--layers", str(args.layers), "--speed-rounds",
           str(args.speed_rounds)] + (["--checkpointing"] if args.checkpointing else [])
    p = subprocess.run(cmd, capture_output=True, text=True)
    speed = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else {}
    print(json.dumps(speed), flush=True)
    for r in res:
        if "error" not in r and str(r["tokens"]) in speed:
            r["tokens_per_s"] = speed[str(r["tokens"])][r["method"]]
            r["cpu_tokens_per_s"] = speed[str(r["tokens"])].get(r["method"] + "_cpu")
    pts = [(r["tokens"], r["growth_gb"]) for r in res if r.get("method") == "full" and "error" not in r]
    a, b = fit(pts) if len(pts) >= 2 else (0.0, 0.0)
    report = render(res, args, a, b)
    print(report)
    if args.out:
        write_section(args.out, report)


SECTION = "## Log-prob memory"


def sections(text: str, prefix: str = SECTION) -> list[str]:
    """Every part of ``text`` from a line starting with ``prefix`` to the next ``## `` header (or the end)."""
    lines = text.splitlines(keepends=True)
    out = []
    for i, line in enumerate(lines):
        if line.startswith(prefix):
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("## ")), len(lines))
            out.append("".join(lines[i:end]))
    return out


def write_section(path: Path, report: str) -> None:
    """Put ``report`` into ``path``, replacing the section with the same header line, keeping the rest."""
    old = path.read_text() if path.exists() else ""
    same = sections(old, report.splitlines()[0])
    body = report.rstrip("\n") + "\n\n"
    path.write_text(old.replace(same[0], body) if same else old.rstrip("\n") + "\n\n" + body)


if __name__ == "__main__":
    main()
