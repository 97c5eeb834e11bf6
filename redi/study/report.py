"""The study's report: Table 2-style results, the search table, the SFT curve and the training-signal
plots. Tables are pure; ``write_report`` writes them with the plots to a folder."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..artifacts import hash_obj
from .config import method_fields
from .logic import param_str, seed_stats
from .results import StudyResult


def final_table(final: dict[str, list[dict[str, Any]]], sft_test: dict[str, Any], n: int, chosen: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Table 2 rows: mean pass@1 and SEM over seeds, mean pass@n, no-answer share, collapse count."""
    rows = [{"method": "SFT start (plateau)", "setting": "", "seeds": 1, "pass@1": sft_test["pass1"], "sem": sft_test["sem"],
             f"pass@{n}": sft_test["pass_n"], "no_answer": sft_test["no_answer"], "collapsed": "", "per_seed": ""}]
    for name, runs in final.items():
        p1 = [r["test_pass@1"] for r in runs]
        mean, sem = seed_stats(p1)
        pn = seed_stats([r.get(f"test_pass@{n}", float("nan")) for r in runs])[0]
        rows.append({"method": name, "setting": param_str(chosen.get(name, {})), "seeds": len(runs), "pass@1": mean, "sem": sem,
                     f"pass@{n}": pn, "no_answer": seed_stats([r["no_answer"] for r in runs])[0],
                     "collapsed": f"{sum(bool(r['collapse']) for r in runs)}/{len(runs)}",
                     "per_seed": " ".join(f"{100 * x:.1f}" for x in p1)})
    return rows


def markdown_table(rows: list[dict[str, Any]], pct: tuple[str, ...] = ()) -> str:
    if not rows:
        return "(no rows)\n"
    cols = list(dict.fromkeys(k for r in rows for k in r))

    def fmt(k: str, v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        if k in pct and isinstance(v, (int, float)) and not isinstance(v, bool):
            return f"{100 * v:.1f}"
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(c, r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _plot_signals(result: StudyResult, method: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5), sharex=True)
    panels = [("chosen_logp", "chosen log-prob / token"), ("rejected_logp", "rejected log-prob / token"), ("update_norm", "update norm")]
    chosen = param_str(result.chosen.get(method, {}))
    settings = {param_str({k: r[k] for k in result.chosen.get(method, {})}) for r in result.search.get(method, [])}
    keys = [k.split("|") for k in result.signals if k.split("|")[0] == method]
    final = method in result.final
    groups = [(0, f"validation search (seed {result.search_seed})", [k for k in keys if k[1] in settings and int(k[2]) == result.search_seed]),
              (1, f"final runs ({chosen})" if final else "no final runs (validation-only probe)", [k for k in keys if final and k[1] == chosen])]
    for row, title, keys in groups:
        for col, (sig, ylabel) in enumerate(panels):
            ax = axes[row, col]
            for _, setting, seed in keys:
                pts = [(s["step"], s[sig]) for s in result.signals["|".join((method, setting, seed))] if s.get(sig) is not None]
                if pts:
                    ax.plot(*zip(*pts, strict=True), label=(setting if row == 0 else f"seed {seed}"), lw=1)
            if sig == "chosen_logp":
                ax.axhline(result.collapse_threshold, color="red", ls="--", lw=0.8)
            ax.set_title(f"{ylabel} - {title}", fontsize=8)
            if sig != "update_norm":  # log-probs span -0.03 (confident) to -3 (collapsed): log scale, plain labels
                ax.set_yscale("symlog", linthresh=0.01)
                ax.set_yticks([-3, -1, -0.3, -0.1, -0.03, -0.01])
                ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
                ax.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            if col == 0 and ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6)
    for ax in axes[1]:
        ax.set_xlabel("step")
    fig.suptitle(f"{method}: training signals (red dashed: collapse threshold {result.collapse_threshold})")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_curve(result: StudyResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = [c["round"] for c in result.sft_curve]
    ax.errorbar(xs, [100 * c["pass@1"] for c in result.sft_curve], yerr=[100 * c["se"] for c in result.sft_curve], marker="o", capsize=3)
    ax.axvline(result.sft_best_round, color="green", ls="--", lw=0.8, label="stage-2 start")
    ax.set_xlabel("SFT round")
    ax.set_ylabel("val pass@1 (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _hp(r: dict[str, Any]) -> str:
    keys = dict.fromkeys(f for fields in method_fields().values() for f in sorted(fields))
    return param_str({k: r[k] for k in keys if k in r and r[k] is not None and r[k] == r[k]})


def _negatives_line(result: StudyResult) -> str:
    p = result.pairs or {}
    where = ("on-policy: sampled from the SFT start itself (the student's own correct and wrong answers)"
             if result.negatives == "on_policy" else "the teacher's traces (the recipe's verify stage)")
    labels = ", ".join(f"{k}: {v:,}" for k, v in (p.get("labels") or {}).items())
    return (f"Pairs for the pair methods: {where}; {p.get('pairs', '?'):,} pairs from {p.get('traces', '?'):,} traces of "
            f"{p.get('problems', '?'):,} problems (labels {labels or '?'}). `none` continues SFT on the recipe's positives."
            if p else f"Pairs for the pair methods: {where}.")


def write_report(result: StudyResult, out: Path) -> dict[str, Any]:
    """results.md/.csv (Table 2), search.md/.csv, sft_curve.csv/.png, signals_<method>.png, study.json."""
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    n = result.test_n_samples
    table = final_table(result.final, result.sft_test, n, result.chosen)
    search_rows = [r for rows in result.search.values() for r in rows]
    pd.DataFrame(table).to_csv(out / "results.csv", index=False)
    pd.DataFrame(search_rows).to_csv(out / "search.csv", index=False)
    pd.DataFrame(result.sft_curve).to_csv(out / "sft_curve.csv", index=False)
    pct = ("pass@1", "sem", f"pass@{n}", "no_answer", "val_pass@1", "val_se",
           *{k for r in search_rows for k in r if k.startswith(("val_pass@", "test_pass@"))})
    collapses = [r for r in search_rows + [r for v in result.final.values() for r in v] if r["collapse"]]
    md = ["# CPU study results", "",
          f"Test split, {n} samples per problem; mean over seeds, SEM = std/sqrt(seeds). Stage 2: {result.stage2_steps} steps.", "",
          _negatives_line(result), "",
          markdown_table(table, ("pass@1", "sem", f"pass@{n}", "no_answer")),
          "## SFT to plateau (validation)", "", f"Start = round {result.sft_best_round}: {result.sft_reason}.", "",
          markdown_table(result.sft_curve, ("pass@1", "se", "no_answer")),
          "## Validation search", "", markdown_table(search_rows, pct),
          "## Chosen settings", "", *[f"- {m}: {param_str(p)}" for m, p in result.chosen.items()], "",
          f"## Collapse warning (the trainer's: chosen log-prob/token < {result.collapse_threshold} from a start above it, "
          f"or {result.collapse_drop} below the run's start)", ""]
    md += [f"- {r['method']} {_hp(r)} seed {r['seed']}: step {r['collapse_step']}, final {r['chosen_logp_final']:.3g}"
           for r in collapses] or ["- never fired"]
    md += ["", "## Timings (s)", "", *[f"- {k}: {v}" for k, v in result.timings.items()], ""]
    (out / "results.md").write_text("\n".join(md))
    (out / "study.json").write_text(json.dumps(asdict(result), indent=1, default=str))
    _plot_curve(result, out / "sft_curve.png")
    plots = []
    for m in result.search:
        p = out / f"signals_{m}.png"
        _plot_signals(result, m, p)
        plots.append(str(p))
    return {"out_dir": str(out), "table": table, "table_markdown": markdown_table(table, ("pass@1", "sem", f"pass@{n}", "no_answer")),
            "chosen": result.chosen, "timings": result.timings, "plots": plots, "collapses": len(collapses),
            "key": hash_obj(asdict(result)["final"])}

