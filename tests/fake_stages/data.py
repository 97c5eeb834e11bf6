"""Fake redi.data: a few arithmetic problems in the trace schema (orchestration tests only)."""

import json

import pandas as pd

from redi.schema import TRACE_COLUMNS, stable_id


def download(cfg, out_dir):
    s = cfg.synth
    rows = []
    for i in range(s.n_train):
        a, b = i % 17 + 1, i % 5 + 2
        problem = f"What is {a} + {b}?"
        pid = stable_id(problem, i)
        for g in range(s.traces_per_problem):
            ans = a + b if g % 2 == 0 else a + b + 1
            rows.append({"problem_id": pid, "row_id": stable_id(pid, g), "gen_index": g, "problem": problem,
                         "answer": str(a + b), "source": "synthetic", "problem_is_valid": "yes",
                         "trace": f"<think>{a} plus {b} is {ans}.</think> The answer is \\boxed{{{ans}}}.",
                         "finish_reason": "stop", "reasoning_complete": True, "label_math_verify": None,
                         "label_llama": None, "source_uuid": None})
    pd.DataFrame(rows, columns=list(TRACE_COLUMNS)).to_parquet(out_dir / "traces.parquet")
    (out_dir / "benchmarks").mkdir()
    for name, n in (("demo_test", max(s.n_test, 1)), ("demo_val", max(s.n_val, 1))):
        with open(out_dir / "benchmarks" / f"{name}.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps({"id": f"{name}-{i}", "problem": f"What is {i} + 3?", "answer": str(i + 3)}) + "\n")
    return {"traces": len(rows), "fake": True}
