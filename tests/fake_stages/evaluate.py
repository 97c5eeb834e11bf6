"""Fake redi.evaluate: metrics from a hash of the model folder (orchestration tests only)."""

import hashlib
import json

import pandas as pd


def evaluate_model(cfg, model_dir, out_dir, extra_paths, label):
    h = hashlib.sha256(str(sorted(p.name for p in model_dir.iterdir())).encode() + label.encode()).digest()
    metrics = {"benchmarks": {}}
    for b in cfg.benchmarks:
        metrics["benchmarks"][b] = {"pass@1": h[0] / 255, "pass@1_sem": 0.01, "n_problems": 10, "n_samples": cfg.n_samples}
    metrics["average"] = {"pass@1": h[0] / 255, "pass@1_sem": 0.01, "n_benchmarks": len(cfg.benchmarks)}
    pd.DataFrame([{"benchmark": b, "sample": i, "response": "x"} for b in cfg.benchmarks for i in range(cfg.n_samples)]
                 ).to_parquet(out_dir / "samples.parquet")
    (out_dir / "metrics.json").write_text(json.dumps(metrics))
    return metrics


def regrade(samples_path, cfg, out_dir):
    raise NotImplementedError
