"""redi.results: append/load round trip, latest-only, table values, plots."""

from __future__ import annotations

import pandas as pd
import pytest

from redi import results as R


def _metrics(p_math: float, p_aime: float, n: int = 4) -> dict:
    def bench(p: float) -> dict:
        return {"pass@1": p, "pass@1_sem": 0.01, f"pass@{n}": min(1.0, p + 0.2), f"maj@{n}": p, "no_answer_share": 0.1,
                "truncated_share": 0.05, "ungraded_share": 0.0, "n_problems": 10, "n_samples": n, "pass@1_per_index": [p] * n}

    per = {"math500": bench(p_math), "aime24": bench(p_aime)}
    return {"benchmarks": per, "average": {"pass@1": (p_math + p_aime) / 2, "pass@1_sem": 0.02, "n_benchmarks": 2},
            "protocol": {"n_samples": n, "temperature": 0.6, "top_p": 0.95, "max_new_tokens": 512}}


def _store(tmp_path) -> R.ResultsStore:
    s = R.ResultsStore(tmp_path / "results")
    s.append_metrics(run="r1", label="sft", model_key="m1", recipe_hash="h", eval_key="e1", metrics=_metrics(0.5, 0.1), when=1000.0)
    s.append_metrics(run="r1", label="redi", model_key="m2", recipe_hash="h", eval_key="e2", metrics=_metrics(0.6, 0.2), when=1001.0)
    s.append_metrics(run="r1", label="redi", model_key="m2", recipe_hash="h", eval_key="e3", metrics=_metrics(0.65, 0.25), when=2000.0, kind="nightly")
    return s


def test_append_load_round_trip(tmp_path):
    s = _store(tmp_path)
    df = s.load()
    assert len(df) == 3 * 3  # 2 benchmarks + average per evaluation
    assert len(list((tmp_path / "results").glob("part-*.parquet"))) == 3
    assert not list((tmp_path / "results").glob(".tmp-*"))
    assert set(R.COLUMNS) <= set(df.columns)
    row = df[(df.eval_key == "e1") & (df.benchmark == "math500")].iloc[0]
    assert row["pass@1"] == 0.5 and row["pass@n"] == pytest.approx(0.7) and row["temperature"] == 0.6 and row["n_samples"] == 4
    assert "pass@1_per_index" not in row["metrics_json"]
    assert len(s.load(kind="nightly")) == 3 and len(s.load(run="nope")) == 0


def test_latest_only_and_table(tmp_path):
    s = _store(tmp_path)
    latest = s.load(run="r1", latest_only=True)
    assert set(latest.eval_key) == {"e1", "e3"}
    t = R.comparison_table(latest)
    assert t.markdown.splitlines()[0] == "| Model (pass@1, %) | math500 | aime24 | Avg |"
    assert "| redi | 65.0 ± 1.0 | 25.0 ± 1.0 | 45.0 ± 2.0 |" in t.markdown
    assert t.frame.loc["sft", "math500"] == 50.0 and t.frame.loc["sft", "math500 sem"] == 1.0
    assert {r["label"] for r in t.rows} == {"sft", "redi"} and t.rows[0]["run"] == "r1"
    assert R.table_rows(latest) == t.rows
    csv = tmp_path / "t.csv"
    t.frame.to_csv(csv)
    assert "math500 sem" in csv.read_text()


def test_table_of_several_runs_names_models_by_run(tmp_path):
    s = _store(tmp_path)
    s.append_metrics(run="r2", label="sft", model_key="m9", recipe_hash="h2", eval_key="e9", metrics=_metrics(0.4, 0.0))
    t = R.comparison_table(s.load(latest_only=True))
    assert {r["model"] for r in t.rows} == {"r1/sft", "r1/redi", "r2/sft"}


def test_empty_store(tmp_path):
    s = R.ResultsStore(tmp_path / "none")
    assert s.load().empty
    assert R.comparison_table(s.load()).rows == []
    assert R.bar_chart(s.load(), tmp_path / "e.png").exists()


def test_plots_are_pngs(tmp_path):
    df = _store(tmp_path).load()
    for p in (R.bar_chart(df, tmp_path / "bar.png"), R.history_plot(df, tmp_path / "hist.png")):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    assert R.history_plot(df, tmp_path / "avg.png", benchmarks=["average"]).exists()


def test_real_summary_shape(tmp_path):
    """The rows accept evaluate_model's summary as written to metrics.json."""
    from redi.metrics import benchmark_metrics, macro_average

    b = benchmark_metrics([[True, False]], [["1", "2"]], [["stop", "length"]])
    summary = {"benchmarks": {"toy": b}, "average": macro_average({"toy": b}), "protocol": {"n_samples": 2, "temperature": 0.6}}
    rows = R.rows_from_metrics(summary, run="r", label="base")
    assert [r["benchmark"] for r in rows] == ["toy", "average"]
    assert rows[0]["pass@n"] == 1.0 and rows[0]["truncated_share"] == 0.5
    assert isinstance(pd.DataFrame(rows), pd.DataFrame)


def _paper_metrics(p: dict[str, float], n: int = 16) -> dict:
    per = {b: {"pass@1": v, "pass@1_sem": 0.01, "n_problems": 10, "n_samples": n} for b, v in p.items()}
    return {"benchmarks": per, "average": {"pass@1": sum(p.values()) / len(p), "pass@1_sem": 0.0}, "protocol": {"n_samples": n}}


def test_paper_table_follows_the_papers_columns_and_shows_its_numbers(tmp_path):
    s = R.ResultsStore(tmp_path / "results")
    ours = {"gsm8k": 0.7, "olympiadbench": 0.4, "aime25": 0.2, "minerva_math": 0.3, "amc": 0.6, "aime24": 0.25, "math500": 0.8}
    s.append_metrics(run="r", label="redi", model_key="m", recipe_hash="h", eval_key="e", metrics=_paper_metrics(ours), when=1.0)
    t = R.comparison_table(s.load(), paper=True)
    head = t.markdown.splitlines()[0]
    assert head == ("| Model (pass@1, %) | math500 | aime24 | amc | minerva_math | olympiadbench | Avg (paper's 5) "
                    "| aime25 | gsm8k | Avg |")
    lines = t.markdown.splitlines()
    assert lines[2].startswith("| redi | 80.0 ± 1.0 | 25.0 ± 1.0 | 60.0 ± 1.0 | 30.0 ± 1.0 | 40.0 ± 1.0 | 47.0 | 20.0 ± 1.0 |")
    assert lines[3] == "| paper: Qwen-REDI-1.5B | 83.1 | 28.1 | 62.4 | 28.8 | 45.2 | 49.5 | – | – | – |"
    assert t.frame.loc["redi", "avg5"] == 47.0 and t.frame.loc["paper: Qwen-REDI-1.5B", "amc"] == 62.4
    assert [r["model"] for r in t.rows] == ["redi", "paper: Qwen-REDI-1.5B"]
    # without paper=True no paper row; the paper's Avg column still appears when all five are evaluated
    plain = R.comparison_table(s.load())
    assert "paper:" not in plain.markdown and "Avg (paper's 5)" in plain.markdown.splitlines()[0]


@pytest.mark.parametrize("spacing_s, pattern", [(86400, r"^\d{4}-\d{2}-\d{2}$"), (60, r"^\d{2}-\d{2} \d{2}:\d{2}$"),
                                                 (0, r"^\d{4}-\d{2}-\d{2}$")])
def test_history_plot_time_axis_shows_dates(spacing_s, pattern):
    """Nightly runs a day apart, minutes apart, or a single one: readable date ticks, never sub-second ones."""
    import re

    from redi import results as R

    t0 = 1_795_000_000.0
    rows = [{"time": t0 + k * spacing_s, "run": "demo", "label": "sft", "benchmark": b, "pass@1": 0.3 + 0.01 * k,
             "pass@1_sem": 0.01, "kind": "nightly"} for k in range(4 if spacing_s else 1) for b in ("demo_test", "average")]
    fig = R.history_figure(pd.DataFrame(rows))
    for ax in fig.axes:
        labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
        assert len(labels) >= 2 and all(re.match(pattern, x) for x in labels), labels
    R._plt().close(fig)


def test_response_lengths_in_the_table_and_csv(tmp_path):
    m = _metrics(0.5, 0.1)
    m["benchmarks"]["math500"].update(completion_tokens_mean=812.4, completion_tokens_p50=700.0, completion_tokens_p90=1530.0)
    m["benchmarks"]["aime24"].update(completion_tokens_mean=2100.0, completion_tokens_p50=2000.0, completion_tokens_p90=3900.0)
    m["average"].update(completion_tokens_mean=1456.2, truncated_share=0.05)
    s = R.ResultsStore(tmp_path / "results")
    s.append_metrics(run="r", label="sft", model_key="m", recipe_hash="h", eval_key="e", metrics=m)
    old = R.ResultsStore(tmp_path / "old")  # rows recorded before lengths were measured: no length table
    old.append_metrics(run="r", label="sft", model_key="m", recipe_hash="h", eval_key="e", metrics=_metrics(0.5, 0.1))
    assert "response tokens" not in R.comparison_table(old.load()).markdown
    t = R.comparison_table(s.load())
    assert "| Model (response tokens: mean / p90 (truncated)) | math500 | aime24 | Avg |" in t.markdown
    assert "| sft | 812 / 1530 (5%) | 2100 / 3900 (5%) | 1456 (5%) |" in t.markdown
    assert t.frame.loc["sft", "math500 tokens p90"] == 1530.0 and t.frame.loc["sft", "aime24 truncated %"] == 5.0
    assert t.frame.loc["sft", "math500"] == 50.0  # pass@1 columns unchanged
