"""benchmarks/bench_gpu.py: the CUDA benchmark's code path, run on CPU at a tiny size (no GPU here)."""

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the script measures instead")
def test_without_cuda_it_says_so_and_exits_zero(bench, capsys):
    assert bench.main(["--steps", "1"]) == 0
    assert "needs a CUDA GPU" in capsys.readouterr().out


def test_cpu_smoke_runs_every_setting_through_the_library(bench, tmp_path):
    out = tmp_path / "gpu.md"
    assert bench.main(["--cpu-smoke", "--steps", "1", "--out", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith(("| sft", "| redi"))]
    assert len(rows) == 4  # {sft, redi} x sdpa x {chunked, full}
    assert not any("error" in r or "skipped" in r or "memory" in r for r in rows)
    assert {r.split("|")[4].strip() for r in rows} == {"chunked", "full"}
