"""Fake redi.split (orchestration tests only)."""

import pandas as pd

from redi.schema import PAIR_COLUMNS, POSITIVE_COLUMNS, stable_id


def verify_and_split(cfg, traces_path, tokenizer_dir, out_dir, decontam_problems):
    df = pd.read_parquet(traces_path)
    df["label"] = df["gen_index"] % 2 == 0
    df.to_parquet(out_dir / "labelled.parquet")
    pos, pairs = [], []
    for pid, g in df.groupby("problem_id", sort=True):
        good, bad = g[g.label].iloc[0], g[~g.label].iloc[0]
        pos.append({"id": stable_id(pid, int(good.gen_index)), "problem_id": pid, "problem": good.problem,
                    "completion": good.trace, "answer": good.answer})
        pairs.append({"id": stable_id(pid, int(good.gen_index), int(bad.gen_index)), "problem_id": pid,
                      "problem": good.problem, "chosen": good.trace, "rejected": bad.trace, "answer": good.answer,
                      "chosen_index": int(good.gen_index), "rejected_index": int(bad.gen_index)})
    pd.DataFrame(pos, columns=list(POSITIVE_COLUMNS)).to_parquet(out_dir / "positives.parquet")
    pd.DataFrame(pairs, columns=list(PAIR_COLUMNS)).to_parquet(out_dir / "pairs.parquet")
    (out_dir / "agreement.md").write_text("fake\n")
    return {"traces": len(df), "positives": len(pos), "pairs": len(pairs)}
