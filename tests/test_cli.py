"""The `redi` command: parsing, bad recipes (exit 2, the field named, no traceback), status, eval."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest_orchestration import REPO, redi_argv, subprocess_env, write_recipe

from redi.cli import build_parser, main, prefect_env  # noqa: E402


def test_parser_run_stage_eval_status():
    a = build_parser().parse_args(["run", "r.yaml", "--set", "redi.alpha=1.0", "--set", "sft.lr=1e-5",
                                   "--refresh", "sft", "--no-prefect"])
    assert (a.command, a.recipe, a.overrides, a.refresh, a.no_prefect) == ("run", "r.yaml", ["redi.alpha=1.0", "sft.lr=1e-5"], ["sft"], True)
    a = build_parser().parse_args(["stage", "evaluate", "r.yaml", "--labels", "base,redi"])
    assert (a.stage, a.labels, a.no_prefect) == ("evaluate", "base,redi", False)
    a = build_parser().parse_args(["eval", "--model", "Qwen/Qwen2.5-Math-1.5B", "--benchmarks", "math500,aime24", "--samples", "4"])
    assert (a.model, a.benchmarks, a.samples) == ("Qwen/Qwen2.5-Math-1.5B", "math500,aime24", 4)
    assert build_parser().parse_args(["status", "r.yaml", "--json"]).json
    with pytest.raises(SystemExit):
        build_parser().parse_args(["stage", "train", "r.yaml"])  # not a stage


@pytest.mark.parametrize("override, field", [
    ("redi.alfa=0.5", "redi.alfa"),            # unknown key
    ("sft.max_steps=many", "sft.max_steps"),   # wrong type
    ("redi.alpha=3.0", "redi.alpha"),          # impossible value
    ("run.refresh=[train]", "run.refresh"),    # not a stage
])
def test_bad_recipe_exits_2_naming_the_field_before_any_work(tmp_path, capsys, override, field):
    recipe = write_recipe(tmp_path)
    assert main(["run", str(recipe), "--set", override, "--no-prefect"]) == 2
    err = capsys.readouterr().err
    assert field in err and "Traceback" not in err
    assert not (tmp_path / "artifacts").exists()  # nothing was started


def test_bad_recipe_file_in_a_subprocess_has_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  name: x\nevaluate:\n  n_samples: 0\n  colour: blue\n")
    p = subprocess.run(redi_argv("run", str(bad)), capture_output=True, text=True, env=subprocess_env(), timeout=60)
    assert p.returncode == 2
    assert "evaluate.n_samples" in p.stderr and "evaluate.colour" in p.stderr and "Traceback" not in p.stderr


def test_status_then_stage_then_eval(tmp_path, capsys):
    recipe = write_recipe(tmp_path)
    assert main(["status", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "0/11 stages cached" in out and "grade[redi]" in out and str(tmp_path / "artifacts") in out

    assert main(["stage", "model", str(recipe), "--no-prefect"]) == 0
    out = capsys.readouterr().out
    assert "model" in out and "built" in out and str(tmp_path / "artifacts") in out

    assert main(["status", str(recipe), "--json"]) == 0
    plan = {n["stage"]: n for n in json.loads(capsys.readouterr().out)}
    assert plan["download"]["cached"] and plan["model"]["cached"] and not plan["sft"]["cached"]

    model_dir = plan["model"]["path"]
    argv = ["eval", "--model", model_dir, "--benchmarks", "demo_test", "--samples", "1", "--recipe", str(recipe),
            "--set", "evaluate.max_problems=3", "--no-prefect"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "demo_test" in out and "evaluated" in out and "Results store" in out
    assert main(argv) == 0
    assert "cache hit" in capsys.readouterr().out


def test_prefect_home_is_project_local_without_a_server(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("PREFECT_HOME", raising=False)
    prefect_env(tmp_path / "art")
    import os

    assert os.environ["PREFECT_HOME"] == str(tmp_path / "art" / ".prefect")
    assert os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    monkeypatch.setenv("PREFECT_HOME", "/somewhere/else")
    prefect_env(tmp_path / "art")
    assert os.environ["PREFECT_HOME"] == "/somewhere/else"  # the user's choice wins


def test_library_never_imports_prefect():
    code = ("import sys, pkgutil, importlib, redi\n"
            "for m in pkgutil.iter_modules(redi.__path__):\n"
            "    importlib.import_module('redi.' + m.name)\n"
            "import redi.config\n"
            "bad = [m for m in sys.modules if m.split('.')[0] == 'prefect']\n"
            "assert not bad, bad[:5]\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=subprocess_env(), timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]


def test_stage_verify_prints_the_selection_beside_the_official_figures(tmp_path, capsys):
    recipe = write_recipe(tmp_path)
    assert main(["stage", "verify", str(recipe), "--no-prefect"]) == 0
    out = capsys.readouterr().out
    assert "## Selected vs the official figures" in out and "| 77,629 |" in out and "| 53,175 |" in out
    assert "apply only to the full open-r1/OpenR1-Math-Raw" in out and "synthetic" in out  # this run's data is not Raw


def test_eval_help_and_an_unknown_benchmark_list_the_registered_benchmarks(tmp_path, capsys):
    from redi.benchmarks import REGISTRY

    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert all(name in out for name in REGISTRY), out
    recipe = write_recipe(tmp_path)
    assert main(["eval", "--model", "Qwen/Qwen2.5-Math-1.5B", "--benchmarks", "mathh500", "--recipe", str(recipe), "--no-prefect"]) == 2
    err = capsys.readouterr().err
    assert "unknown benchmark 'mathh500'" in err and all(name in err for name in REGISTRY) and "Traceback" not in err


def test_the_demo_recipe_ships_inside_the_package_and_loads_from_any_folder(tmp_path, monkeypatch):
    import redi
    from redi.cli import DEMO_RECIPE
    from redi.config import load_recipe

    assert DEMO_RECIPE.is_file() and DEMO_RECIPE.parent.parent == Path(redi.__file__).resolve().parent
    assert (REPO / "deployments" / "demo" / "recipe.yaml").resolve() == DEMO_RECIPE  # the deployment is the same file
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("REDI_ARTIFACT_ROOT", raising=False)
    r = load_recipe(DEMO_RECIPE)
    assert r.run.name == "demo" and r.run.artifact_root == "artifacts"  # the working directory's, as documented
    tomls = (REPO / "pyproject.toml").read_text()
    assert '"recipes/*.yaml"' in tomls and (Path(redi.__file__).parent / "py.typed").exists()
