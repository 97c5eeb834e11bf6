"""Fixtures of the orchestration layer (flows, CLI, deployments, faults): a tiny recipe that runs every real
stage in seconds, the Prefect test harness, and a `redi` launcher for subprocesses."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

TINY = {
    "run": {"name": "tiny", "device": "cpu", "threads": 1},
    "data": {"source": "synthetic", "synth": {"n_train": 60, "traces_per_problem": 4, "n_test": 10, "n_val": 0}},
    "model": {"base": "tiny", "tiny": {"hidden_size": 32, "num_layers": 2, "num_heads": 1, "num_kv_heads": 1,
                                       "intermediate_size": 64, "vocab_size": 300, "tokenizer_samples": 200}},
    "verify": {"decontaminate": False, "workers": 1},
    "sft": {"max_steps": 3, "global_batch": 4, "micro_batch": 4, "max_length": 512, "save_steps": 1},
    "redi": {"max_steps": 2, "global_batch": 4, "micro_batch": 4, "max_length": 512, "save_steps": 1},
    "evaluate": {"backend": "hf", "n_samples": 2, "max_new_tokens": 32, "benchmarks": ["demo_test"],
                 "grade_workers": 1, "max_problems": 5},
}
"""A recipe that runs every stage in seconds on one CPU core (synthetic data, 2-layer width-32 model)."""



def write_recipe(folder: Path, overrides: dict | None = None, name: str = "recipe.yaml") -> Path:
    import copy

    tree = copy.deepcopy(TINY)
    tree["run"]["artifact_root"] = str(folder / "artifacts")
    for k, v in (overrides or {}).items():
        node = tree
        *parents, leaf = k.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


@pytest.fixture
def tiny_recipe(tmp_path) -> Path:
    """Path of a tiny recipe YAML whose artifact_root is inside tmp_path."""
    return write_recipe(tmp_path)


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API (SQLite in a temp folder) for the whole session (~7 s once)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def redi_argv(*args: str) -> list[str]:
    """argv that runs `redi ARGS` in a subprocess with this interpreter."""
    return [sys.executable, "-m", "redi.cli", *args]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env

