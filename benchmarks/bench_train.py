"""Training throughput: our reference-free REDI step vs TRL's DPOTrainer and CPOTrainer-SimPO; packing vs padding.

Each comparison ALTERNATES the methods' steps in one process (the machine is shared; separate runs
mislead), reporting medians and ratios:

1. Stage 2 on the same model and pairs: our REDI step (packed, and padded), vs TRL 1.16 ``DPOTrainer``
   (sigmoid loss, its default reference copy, padded) and TRL's fastest reference-free trainer,
   ``trl.experimental.cpo.CPOTrainer`` with ``loss_type="simpo"``, ``cpo_alpha=0`` (padded, full
   logits). Peak memory is measured separately, in fresh subprocesses per method (RSS cannot be split
   inside one process; median of ``--memory-reps`` runs): peak RSS and its growth over the process's RSS
   right before the first step. Ours runs with the trainer's CPU defaults, ``lean_layers`` included.
2. Length-skewed SFT batches (most sequences short, a few long): padded (B, L_max) vs packed rows,
   in useful (non-pad) tokens/s.
3. Host RAM of tokenised stage-2 data per token: tuples of Python ints (the former layout) vs the
   memory-mapped Arrow token table of ``redi.train_data`` (one subprocess each).

Usage: ``python benchmarks/bench_train.py [--steps 12] [--out docs/benchmarks/train.md]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from redi import lean_layers  # noqa: E402
from redi.config import DataConfig, ModelConfig, Stage2Config  # noqa: E402
from redi.config.data import SynthConfig  # noqa: E402
from redi.logprobs import PACKED_SDPA, resolve_attn  # noqa: E402
from redi.losses import redi_loss  # noqa: E402
from redi.packing import Example, collate, row_budget, sequence_logps  # noqa: E402
from redi.prompts import render_prompt  # noqa: E402
from redi.tinymodel import build_base_model, load_tokenizer  # noqa: E402
from redi.train_data import load_pair_examples  # noqa: E402

log = logging.getLogger("bench_train")
WIDTH, LAYERS, HEADS = 256, 4, 4  # ~6M params with the demo tokenizer


def setup(root: Path) -> tuple[Path, Path]:
    """Demo-like pairs (redi.synth through redi.data) and a ~6M-param random Qwen2 with the demo tokenizer."""
    import pandas as pd

    from redi.data import download

    if not (root / "model" / "config.json").exists():
        download(DataConfig(synth=SynthConfig(n_train=600, n_val=0, n_test=0)), root / "data")
        tr = pd.read_parquet(root / "data" / "traces.parquet")
        good = tr[tr.label_math_verify.astype(bool)].groupby("problem_id").head(1).set_index("problem_id")
        bad = tr[~tr.label_math_verify.astype(bool)].groupby("problem_id").head(1).set_index("problem_id")
        ids = good.index.intersection(bad.index)
        pd.DataFrame({"problem": good.loc[ids, "problem"].values, "chosen": good.loc[ids, "trace"].values,
                      "rejected": bad.loc[ids, "trace"].values}).to_parquet(root / "pairs.parquet")
        tiny = ModelConfig().tiny.model_copy(update={"hidden_size": WIDTH, "num_layers": LAYERS, "num_heads": HEADS,
                                                     "num_kv_heads": 2, "intermediate_size": 4 * WIDTH})
        build_base_model(ModelConfig(tiny=tiny), root / "model", root / "data" / "traces.parquet")
    return root / "model", root / "pairs.parquet"


def wide_head_model(model_dir: Path, vocab: int) -> Path:
    """The same model with its embedding and head resized to ``vocab`` rows (the demo tokenizer uses the first
    few hundred): the LM-head cost of a Qwen-sized vocabulary on the same data."""
    import shutil

    out = model_dir.parent / f"model_v{vocab}"
    if not (out / "config.json").exists():
        m = _load(model_dir)
        m.resize_token_embeddings(vocab, mean_resizing=False)
        m.save_pretrained(out)
        for f in model_dir.iterdir():
            if not f.name.startswith(("model", "config")) and f.is_file():
                shutil.copy(f, out / f.name)
    return out


def _load(model_dir: Path, attn: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation=attn)
    m.config.use_cache = False
    return m.train()


class Ours:
    """Our stage-2 step: chosen+rejected of B pairs in one forward, REDI loss (Eq. 5), AdamW step; the model
    loaded and the rows laid out as the trainer does on CPU with the recipe defaults (attention
    ``resolve_attn(attn_implementation)``, rows of ``pack_tokens``)."""

    def __init__(self, model_dir: Path, pairs_path: Path, batch: int, packed: bool, attn: str = "auto"):
        cfg = Stage2Config(attn_implementation=attn)
        self.tok = load_tokenizer(model_dir)
        self.pairs, _ = load_pair_examples(cfg, self.tok, pairs_path)
        self.model = _load(model_dir, resolve_attn(cfg.attn_implementation, "cpu"))
        if lean_layers.enabled(cfg.lean_layers, "cpu"):  # as the trainer does (redi.train._load_model)
            lean_layers.apply(self.model)
        self.batch, self.packed, self.pos, self.rows = batch, packed, 0, row_budget("cpu", cfg.pack_tokens, cfg.attn_implementation)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-6)

    def step(self) -> int:
        idx = [(self.pos + i) % len(self.pairs) for i in range(self.batch)]
        self.pos += self.batch
        seqs = [self.pairs[i][0] for i in idx] + [self.pairs[i][1] for i in idx]
        b = collate(seqs, packed=self.packed, pad_id=self.tok.pad_token_id, row_tokens=self.rows)
        sums, lens = sequence_logps(self.model, b)
        n = len(idx)
        redi_loss(sums[:n], sums[n:], lens[:n], lens[n:], alpha=0.8).mean().backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return b.n_tokens


def _trl_pairs(model_dir: Path, pairs_path: Path):
    """The tokenizer and the pairs as a TRL preference dataset (prompts rendered as our trainer renders them)."""
    import pandas as pd
    from datasets import Dataset

    tok = load_tokenizer(model_dir)
    df = pd.read_parquet(pairs_path)
    return tok, Dataset.from_dict({"prompt": [render_prompt(tok, p) for p in df.problem],
                                   "chosen": list(df.chosen), "rejected": list(df.rejected)})


class TRLDPO:
    """TRL 1.16 DPOTrainer's own compute_loss (reference copy, padded batches), plain AdamW step."""

    def __init__(self, model_dir: Path, pairs_path: Path, batch: int, work: Path):
        from trl import DPOConfig, DPOTrainer

        tok, ds = _trl_pairs(model_dir, pairs_path)
        args = DPOConfig(output_dir=str(work / "trl"), per_device_train_batch_size=batch, learning_rate=1e-6,
                         bf16=False, gradient_checkpointing=False, max_length=2048, report_to=[], logging_steps=10**6,
                         save_strategy="no", use_cpu=True, beta=0.1, precompute_ref_log_probs=False,
                         dataloader_num_workers=0, seed=0)
        self._start(DPOTrainer(model=_load(model_dir), args=args, train_dataset=ds, processing_class=tok))

    def _start(self, trainer) -> None:
        self.trainer = trainer
        self.trainer.create_optimizer()
        self.it = iter(self.trainer.get_train_dataloader())

    def step(self) -> int:
        """One step through the trainer's own compute_loss; returns the real (unpadded) tokens of the batch."""
        try:
            batch = next(self.it)
        except StopIteration:
            self.it = iter(self.trainer.get_train_dataloader())
            batch = next(self.it)
        loss = self.trainer.compute_loss(self.trainer.model, batch)
        loss.backward()
        self.trainer.optimizer.step()
        self.trainer.optimizer.zero_grad(set_to_none=True)
        return self._tokens(batch)

    @staticmethod
    def _tokens(batch) -> int:
        return int(sum(v.sum().item() for k, v in batch.items() if k.endswith("attention_mask")))


class TRLSimPO(TRLDPO):
    """TRL 1.16's fastest reference-free trainer: ``trl.experimental.cpo.CPOTrainer`` with ``loss_type="simpo"``,
    ``cpo_alpha=0`` (pure SimPO, no NLL term), its own compute_loss (padded batches, full logits), plain AdamW step."""

    def __init__(self, model_dir: Path, pairs_path: Path, batch: int, work: Path):
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        tok, ds = _trl_pairs(model_dir, pairs_path)
        args = CPOConfig(output_dir=str(work / "trl_cpo"), per_device_train_batch_size=batch, learning_rate=1e-6,
                         bf16=False, gradient_checkpointing=False, max_length=2048, report_to=[], logging_steps=10**6,
                         save_strategy="no", use_cpu=True, loss_type="simpo", cpo_alpha=0.0, beta=2.0, simpo_gamma=1.0,
                         dataloader_num_workers=0, seed=0)
        self._start(CPOTrainer(model=_load(model_dir), args=args, train_dataset=ds, processing_class=tok))

    @staticmethod
    def _tokens(batch) -> int:  # CPO's chosen / rejected rows already hold the prompt
        return int(batch["chosen_attention_mask"].sum().item() + batch["rejected_attention_mask"].sum().item())


def _timed(fn) -> tuple[float, int]:
    t = time.perf_counter()
    n = fn()
    return time.perf_counter() - t, n


def interleave(methods: dict, steps: int, warmup: int = 2) -> dict[str, dict]:
    """Alternate one step of each method; median tokens/s after ``warmup`` steps."""
    for _ in range(warmup):
        for m in methods.values():
            m()
    rates: dict[str, list[float]] = {k: [] for k in methods}
    toks: dict[str, list[int]] = {k: [] for k in methods}
    for _ in range(steps):
        for k, m in methods.items():
            dt, n = _timed(m)
            rates[k].append(n / dt)
            toks[k].append(n)
    return {k: {"tokens_per_s": statistics.median(v), "tokens_per_step": statistics.mean(toks[k])}
            for k, v in rates.items()}


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def memory_child(method: str, model_dir: Path, pairs: Path, batch: int, steps: int) -> dict:
    """Run only one method (in a subprocess); a sampling thread records the RSS during its steps.

    Returns the peak RSS during the steps and its growth over the RSS right before step 1 (which
    already holds the model(s), e.g. TRL's reference copy: reported as ``setup_gb`` over a bare import).
    """
    import threading

    import psutil

    proc = psutil.Process()
    bare = proc.memory_info().rss / 1024**3
    with tempfile.TemporaryDirectory() as work:
        m = {"redi_packed": lambda: Ours(model_dir, pairs, batch, True),
             "redi_packed_rows": lambda: Ours(model_dir, pairs, batch, True, "sdpa"),
             "redi_padded": lambda: Ours(model_dir, pairs, batch, False),
             "trl_dpo": lambda: TRLDPO(model_dir, pairs, batch, Path(work)),
             "trl_simpo": lambda: TRLSimPO(model_dir, pairs, batch, Path(work))}[method]()
        before = proc.memory_info().rss / 1024**3
        peak, done = [before], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], proc.memory_info().rss / 1024**3)
                time.sleep(0.005)

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        for _ in range(steps):
            m.step()
        done.set()
        t.join()
        return {"peak_rss_gb": peak[0], "growth_gb": peak[0] - before, "setup_gb": before - bare}


def memory(method: str, args, extra: list[str] | None = None) -> dict:
    """``args.memory_reps`` fresh subprocesses of one method; the run with the median peak RSS (a process's
    peak varies by tens of MB from run to run with the allocator's arenas)."""
    runs = []
    for _ in range(args.memory_reps):
        r = subprocess.run([sys.executable, __file__, "--memory-child", method, "--work", str(args.work), "--batch",
                            str(args.batch), *(extra or [])], capture_output=True, text=True, check=True)
        runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    runs.sort(key=lambda d: d["peak_rss_gb"])
    return runs[len(runs) // 2] | {"peak_rss_runs_gb": [round(d["peak_rss_gb"], 3) for d in runs]}


def tokens_child(kind: str, model_dir: Path, pairs: Path, work: Path, copies: int = 40) -> dict:
    """Host RAM of tokenised stage-2 data held by one process: tuples of Python ints (the former layout) vs
    the memory-mapped Arrow token table. The demo pairs are repeated ``copies`` times for a few million
    tokens; the Arrow file is built before the measurement starts (by "local rank 0"), as in training."""
    import gc

    import pandas as pd
    import psutil

    from redi import train_data

    big = work / f"pairs_x{copies}.parquet"
    if not big.exists():
        df = pd.read_parquet(pairs)
        pd.concat([df] * copies, ignore_index=True).to_parquet(big)
    tok = load_tokenizer(model_dir)
    cfg = Stage2Config()
    cache = work / "tokens"
    if kind == "arrow":
        train_data.load_pair_examples(cfg, tok, big, cache_dir=cache)  # built once, not measured
    gc.collect()
    proc = psutil.Process()
    before = proc.memory_full_info()
    if kind == "arrow":
        pairs_seq, _ = train_data.load_pair_examples(cfg, tok, big, cache_dir=cache)
    else:
        table, _ = train_data.load_pair_examples(cfg, tok, big)
        pairs_seq = [tuple((tuple(int(x) for x in ex.ids), ex.prompt_len) for ex in table[i]) for i in range(len(table))]
        del table
    gc.collect()
    n = 0
    for i in range(len(pairs_seq)):  # touch every token, as an epoch does
        for ex in pairs_seq[i]:
            ids = ex.ids if kind == "arrow" else ex[0]
            n += len(ids)
            ids[len(ids) // 2]
    after = proc.memory_full_info()
    return {"kind": kind, "tokens": n, "rss_bytes_per_token": (after.rss - before.rss) / n,
            "uss_bytes_per_token": (after.uss - before.uss) / n}


def render_tokens(toks: dict) -> str:
    t, a = toks["tuples"], toks["arrow"]
    return "\n".join([
        "", f"## Host RAM of tokenised stage-2 data ({a['tokens']:,} tokens: the demo pairs repeated 40 times)", "",
        "| layout | RSS growth bytes/token | private (USS) growth bytes/token |", "|---|---|---|",
        f"| tuples of Python ints (former) | {t['rss_bytes_per_token']:.1f} | {t['uss_bytes_per_token']:.1f} |",
        f"| Arrow int32, memory-mapped (`redi.train_data`) | {a['rss_bytes_per_token']:.1f} | {a['uss_bytes_per_token']:.1f} |",
        "", "The mapped pages are the OS page cache, shared by every rank of a node; RSS counts them in each process "
        "that touched them, USS (private memory) does not.", ""])


def skewed_examples(n: int, vocab: int, seed: int = 0) -> list[Example]:
    """85% short (60-140 tokens), 15% long (600-1000): a length-skewed SFT micro-batch stream."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        long = torch.rand(1, generator=g).item() < 0.15
        lo, hi = (600, 1000) if long else (60, 140)
        length = int(torch.randint(lo, hi, (1,), generator=g))
        ids = torch.randint(10, vocab, (length,), generator=g).tolist()
        out.append(Example(tuple(ids), prompt_len=length // 3))
    return out


def packing_methods(model_dir: Path, batch: int) -> dict:
    model = _load(model_dir)
    exs = skewed_examples(batch * 64, model.config.vocab_size)
    state = {"pos": 0}

    def run(packed: bool, row_tokens: int | None, m=model):
        def f() -> int:
            i = state["pos"] % (len(exs) - batch)
            b = collate(exs[i:i + batch], packed=packed, pad_id=0, row_tokens=row_tokens)
            sums, lens = sequence_logps(m, b)
            (-sums.sum() / lens.sum()).backward()
            m.zero_grad(set_to_none=True)
            return b.n_tokens  # useful (non-pad) tokens
        return f

    def tick():
        state["pos"] += batch

    per_seq = _load(model_dir, resolve_attn(PACKED_SDPA, "cpu"))  # the same weights, SDPA per packed sequence
    per_seq.load_state_dict(model.state_dict())
    return {"padded": run(False, None), "packed_rows_1024": run(True, 1024), "packed_one_row": run(True, None),
            "packed_one_row_sdpa_per_sequence": run(True, None, per_seq)}, tick


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12, help="measured steps per method (after 2 warm-up steps)")
    ap.add_argument("--batch", type=int, default=8, help="pairs (stage 2) / sequences (packing) per step")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "redi_bench_train")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "train.md")
    ap.add_argument("--memory-reps", type=int, default=3, help="subprocesses per method for peak memory (median reported)")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tokens-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--head-vocab", type=int, default=None,
                    help="only stage 2, ours vs TRL SimPO, with the head resized to this vocabulary (e.g. 151936); "
                    "writes its own section of --out")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    log.setLevel(logging.INFO)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_dir, pairs = setup(args.work)
    if args.head_vocab:
        model_dir = wide_head_model(model_dir, args.head_vocab)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, model_dir, pairs, args.batch, 4)))
        return
    if args.tokens_child:
        print(json.dumps(tokens_child(args.tokens_child, model_dir, pairs, args.work)))
        return
    threads = torch.get_num_threads()
    n_params = sum(p.numel() for p in _load(model_dir).parameters())
    if args.head_vocab:
        wide_head(args, model_dir, pairs, threads, n_params)
        return

    log.info("stage 2: interleaving ours (packed, padded), TRL DPOTrainer and TRL CPOTrainer (SimPO)")
    with tempfile.TemporaryDirectory() as work:
        ours_p, ours_u = Ours(model_dir, pairs, args.batch, True), Ours(model_dir, pairs, args.batch, False)
        ours_r = Ours(model_dir, pairs, args.batch, True, "sdpa")
        trl = TRLDPO(model_dir, pairs, args.batch, Path(work))
        simpo = TRLSimPO(model_dir, pairs, args.batch, Path(work))
        s2 = interleave({"redi_packed": ours_p.step, "redi_packed_rows": ours_r.step, "redi_padded": ours_u.step,
                         "trl_dpo": trl.step, "trl_simpo": simpo.step}, args.steps)
    log.info("stage 2: %s", s2)
    mem = {m: memory(m, args) for m in ("redi_packed", "redi_packed_rows", "redi_padded", "trl_dpo", "trl_simpo")}

    log.info("memory: %s; packing vs padding next", mem)
    methods, tick = packing_methods(model_dir, args.batch * 2)
    for _ in range(2):  # warm-up
        for f in methods.values():
            f()
    rates = {k: [] for k in methods}
    for _ in range(args.steps):
        for k, f in methods.items():
            dt, n = _timed(f)
            rates[k].append(n / dt)
        tick()
    pk = {k: statistics.median(v) for k, v in rates.items()}

    toks = {}
    for kind in ("tuples", "arrow"):
        r = subprocess.run([sys.executable, __file__, "--tokens-child", kind, "--work", str(args.work)],
                           capture_output=True, text=True, check=True)
        toks[kind] = json.loads(r.stdout.strip().splitlines()[-1])
    log.info("tokenised data memory: %s", toks)
    report = render(s2, mem, pk, args, threads, n_params) + render_tokens(toks)
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from bench_logprob_memory import sections  # keep the sections written by the other scripts / modes

    old = args.out.read_text() if args.out.exists() else ""
    kept = "".join(sections(old) + sections(old, "## Stage 2 with a Qwen-sized head") + sections(old, "## Notes"))
    args.out.write_text(report.rstrip("\n") + "\n\n" + kept if kept else report)


def wide_head(args, model_dir: Path, pairs: Path, threads: int, n_params: int) -> None:
    """Stage 2 with a Qwen-sized head: ours (packed) vs TRL CPOTrainer-SimPO, alternated; memory per subprocess."""
    from bench_logprob_memory import write_section

    with tempfile.TemporaryDirectory() as work:
        ours, simpo = Ours(model_dir, pairs, args.batch, True), TRLSimPO(model_dir, pairs, args.batch, Path(work))
        s2 = interleave({"redi_packed": ours.step, "trl_simpo": simpo.step}, args.steps)
        del ours, simpo
    mem = {m: memory(m, args, ["--head-vocab", str(args.head_vocab)]) for m in s2}
    log.info("wide head: %s %s", s2, mem)
    o, t = s2["redi_packed"], s2["trl_simpo"]
    lines = [f"## Stage 2 with a Qwen-sized head: vocabulary {args.head_vocab:,} (`bench_train.py --head-vocab`)", "",
             f"Measured {time.strftime('%Y-%m-%d %H:%M')}, torch threads {threads}; the same {WIDTH}-wide {LAYERS}-layer "
             f"model with its embedding and head resized ({n_params / 1e6:.1f}M params), same pairs and tokenizer, "
             f"{args.batch} pairs per step, {args.steps} alternated steps (medians); memory: median of {args.memory_reps} subprocesses per method.", "",
             "| method | tokens/s | vs TRL SimPO | peak RSS GB | vs TRL SimPO | RSS growth in steps GB |", "|---|---|---|---|---|---|"]
    for k, name in (("redi_packed", "ours: REDI, one padding-free row (SDPA per sequence), chunked head"),
                    ("trl_simpo", "TRL CPOTrainer, simpo, cpo_alpha=0 (full logits)")):
        lines.append(f"| {name} | {s2[k]['tokens_per_s']:,.0f} | {s2[k]['tokens_per_s'] / t['tokens_per_s']:.2f}x | "
                     f"{mem[k]['peak_rss_gb']:.2f} | {mem[k]['peak_rss_gb'] / mem['trl_simpo']['peak_rss_gb']:.2f}x | "
                     f"{mem[k]['growth_gb']:.2f} |")
    report = "\n".join(lines) + "\n"
    print(report, f"ours/TRL tokens/s {o['tokens_per_s'] / t['tokens_per_s']:.2f}")
    write_section(args.out, report)


def render(s2: dict, mem: dict, pk: dict, args, threads: int, n_params: int) -> str:
    base = s2["trl_dpo"]["tokens_per_s"]
    sim, sim_mem = s2["trl_simpo"]["tokens_per_s"], mem["trl_simpo"]
    lines = [
        "# Training benchmarks (`benchmarks/bench_train.py`)",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} on this CPU ({os.cpu_count()} cores, torch threads {threads}, "
        f"load average {os.getloadavg()[0]:.1f} at the end: absolute numbers move with load, ratios come from steps "
        f"alternated in one process). "
        f"Model: random Qwen2, {n_params / 1e6:.1f}M params (width {WIDTH}, {LAYERS} layers), demo tokenizer, fp32. "
        f"{args.batch} pairs per step, {args.steps} measured steps per method (medians).",
        "",
        "## Stage 2: our REDI step vs TRL 1.16 DPOTrainer and CPOTrainer-SimPO (same model, same pairs)",
        "",
        "| method | tokens/s (median) | vs TRL DPO | vs TRL SimPO | tokens/step | peak RSS GB (steps) | vs TRL SimPO | "
        "RSS growth in steps GB | setup RSS GB | peak RSS of each run GB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    names = {"redi_packed": "ours: REDI, one padding-free row, SDPA per sequence (CPU default; no reference)",
             "redi_packed_rows": "ours: REDI, padding-free rows of 512 under SDPA's block mask (`sdpa`; no reference)",
             "redi_padded": "ours: REDI, padded batch (no reference)",
             "trl_dpo": "TRL DPOTrainer (sigmoid, reference copy, padded)",
             "trl_simpo": "TRL CPOTrainer, loss_type=simpo, cpo_alpha=0 (no reference, padded)"}
    for k, r in s2.items():
        lines.append(f"| {names[k]} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base:.2f}x | "
                     f"{r['tokens_per_s'] / sim:.2f}x | {r['tokens_per_step']:,.0f} | {mem[k]['peak_rss_gb']:.2f} | "
                     f"{mem[k]['peak_rss_gb'] / sim_mem['peak_rss_gb']:.2f}x | {mem[k]['growth_gb']:.3f} | "
                     f"{mem[k]['setup_gb']:.3f} | {', '.join(f'{x:.2f}' for x in mem[k]['peak_rss_runs_gb'])} |")
    lines += [
        "",
        "Tokens/step differ a little: TRL truncates/pads its own way and its sampler shuffles; rates are per real token.",
        "TRL's memory includes the reference copy; ours has none (REDI is reference-free). Peak RSS: the median of "
        f"{args.memory_reps} fresh subprocesses per method (4 steps each); ours with `lean_layers` (redi.lean_layers: "
        "RMSNorm outputs and the MLP's silu(gate) and product recomputed in backward), as the trainer runs on CPU.",
        "",
        f"## Padding-free packing vs padded batches, length-skewed data ({args.batch * 2} sequences per step, "
        "85% of 60-140 tokens, 15% of 600-1000)",
        "",
        "| layout | useful tokens/s (median) | vs padded |",
        "|---|---|---|",
    ]
    for k, v in pk.items():
        lines.append(f"| {k} | {v:,.0f} | {v / pk['padded']:.2f}x |")
    lines += ["", "`packed_one_row` shows why rows are bounded (`pack_tokens`) under SDPA's block-diagonal mask: it does "
              "not skip compute, so one long row pays O(T^2) attention. `packed_one_row_sdpa_per_sequence` is "
              "`attn_implementation: redi_packed_sdpa` (what `auto` gives on CPU): one row, SDPA per sequence.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
