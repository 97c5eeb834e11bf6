"""Fake redi.train: copies the model, one 'checkpoint' per step in work_dir (orchestration tests only)."""

import json
import os
import shutil
import time


def _train(cfg, model_dir, out_dir, work_dir, what):
    steps = cfg.max_steps or 2
    sleep = float(os.environ.get("REDI_FAKE_STAGE_SLEEP", "0"))
    done = len(list(work_dir.glob("checkpoint-*")))  # resume after a kill
    for step in range(done + 1, steps + 1):
        time.sleep(sleep)
        (work_dir / f"checkpoint-{step}").write_text(str(step))
    shutil.copytree(model_dir, out_dir / "model", ignore=shutil.ignore_patterns("manifest.json"))
    with open(out_dir / "signals.jsonl", "w") as f:
        for step in range(1, steps + 1):
            f.write(json.dumps({"step": step, "loss": 1.0 / step}) + "\n")
    (out_dir / "signals.png").write_bytes(b"\x89PNG fake")
    return {"steps": steps, "resumed_from_step": done, "stage": what}


def train_sft(cfg, model_dir, positives_path, out_dir, work_dir, device):
    return _train(cfg, model_dir, out_dir, work_dir, "sft")


def train_stage2(cfg, sft_model_dir, pairs_path, out_dir, work_dir, device):
    return _train(cfg, sft_model_dir, out_dir, work_dir, "redi")
