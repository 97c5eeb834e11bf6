"""Hub publishing (redi.publish, redi.cards, `redi push`, the redi-push flow).

Cards are tested on literals; the folders on a real tiny run (every stage, ~15-35 s once per module); the
real push with huggingface_hub's own HfApi pointed at a local HTTP stand-in of the Hub's endpoints
(tests/_hub_standin.py): the Hub cannot be reached from here.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest_orchestration import write_recipe

from redi import cards, publish, publish_parts, publish_source

RUN = "tiny"


# ---------------------------------------------------------------------------------------- cards (pure)
def test_departures_section_is_the_readme_section_up_to_the_next_heading():
    md = "# R\n\nintro\n\n## Where it departs from the paper (and why)\n| a | b |\n\nmore\n\n## Next\nnot this\n"
    assert cards.departures_section(md) == "| a | b |\n\nmore"
    assert cards.departures_section("## Deviations from the paper\n- x\n") == "- x"
    assert cards.departures_section("# R\n## Usage\ntext\n") is None
    demo = (publish_parts.RECIPES_DIR / "demo" / "README.md").read_text()
    assert "synthetic" in cards.departures_section(demo)  # the demo recipe documents its departures


def test_recipe_differences_name_field_paper_and_ours():
    paper = {"sft": {"lr": 5e-5, "epochs": 5}, "redi": {"alpha": 0.8}, "evaluate": {"n_samples": 16}}
    ours = {"sft": {"lr": 3e-3, "epochs": 5}, "redi": {"alpha": 0.8}, "evaluate": {"n_samples": 4}}
    diffs = cards.recipe_differences(ours, paper, ["sft.lr", "sft.epochs", "redi.alpha", "evaluate.n_samples", "x.y"])
    assert diffs == [("sft.lr", 5e-5, 3e-3), ("evaluate.n_samples", 16, 4)]
    table = cards.differences_table(diffs)
    assert "| `sft.lr` | 5e-05 | 0.003 |" in table and "| `evaluate.n_samples` | 16 | 4 |" in table
    assert cards.differences_table([]).startswith("Every compared field")


def test_front_matter_round_trips_and_drops_empty_values():
    text = cards.front_matter({"license": "mit", "base_model": None, "datasets": [], "tags": ["a", "b"]}) + "# body\n"
    meta, body = cards.split_card(text)
    assert meta == {"license": "mit", "tags": ["a", "b"]} and body == "# body\n"
    assert cards.demote("# A\n## B\ntext # not\n") == "## A\n### B\ntext # not\n"
    assert [cards.size_category(n) for n in (0, 999, 1000, 250_000, 5_000_000)] == ["n<1K", "n<1K", "1K<n<10K", "100K<n<1M", "1M<n<10M"]
    assert cards.config_name("redi", "math/500 v2") == "redi_math_500_v2"


def test_citation_is_xu_et_al_2025():
    bib = cards.CITATION
    assert bib.startswith("@misc{") and "eprint={2505.24850}" in bib and "Shuyao Xu" in bib and "Yuan Qi" in bib
    assert cards.PAPER_TITLE in bib


@pytest.mark.parametrize("bad", ["me", "me/", "/x", "a/b/c", "me/re po", "me/x--y", "me/x..y", "me/x.git", "-me/x", ""])
def test_malformed_repo_ids_are_refused(bad):
    with pytest.raises(publish.PublishError, match="not a Hub repo id"):
        publish.check_repo_id(bad)


def test_repo_ids_follow_the_model_repo_and_refuse_collisions():
    assert publish.repo_ids("me/redi") == {"model": "me/redi", "dataset": "me/redi-data", "details": "me/redi-details"}
    assert publish.repo_ids("me/redi", ["details"], details_repo="org/evals") == {"details": "org/evals"}
    with pytest.raises(publish.PublishError, match="same repository"):
        publish.repo_ids("me/redi", None, dataset_repo="me/d", details_repo="me/d")
    with pytest.raises(publish.PublishError, match="--only: unknown part weights"):
        publish.repo_ids("me/redi", ["weights"])


# ---------------------------------------------------------------------------------------- a real tiny run
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """The artifact root of a full tiny run (every stage built, registered as run `tiny`)."""
    from redi.config import load_recipe
    from redi.pipeline import Pipeline

    folder = tmp_path_factory.mktemp("publish")
    recipe = write_recipe(folder, {"data.synth.n_train": 24, "data.synth.n_test": 4, "sft.max_steps": 1, "redi.max_steps": 1,
                                   "evaluate.max_problems": 3, "evaluate.max_new_tokens": 16})
    Pipeline(load_recipe(recipe)).run()
    return folder / "artifacts"


@pytest.fixture(scope="module")
def staged(tiny_run, tmp_path_factory) -> dict:
    return publish.stage(tiny_run, RUN, "redi", "me/redi-tiny", tmp_path_factory.mktemp("out") / "push")


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_dry_run_writes_one_folder_per_repo_with_the_artifacts_files(tiny_run, staged):
    out = Path(staged["out"])
    assert sorted(p.name for p in out.iterdir()) == ["dataset", "details", "model", "push.json"]
    assert json.loads((out / "push.json").read_text())["parts"] == staged["parts"]
    src = publish_source.load_run(tiny_run, RUN, "redi")
    model = _tree(out / "model")
    weights = _tree(src.model_dir())
    assert set(model) == set(weights) | {"README.md", "recipe.yaml"} and "model.safetensors" in model
    assert all(model[f] == b for f, b in weights.items())  # the artifact's files, unchanged
    assert model["recipe.yaml"] == (src.run_dir / "recipe.yaml").read_bytes()
    data = _tree(out / "dataset")
    assert set(data) == {"README.md", "positives.parquet", "pairs.parquet"}
    assert data["pairs.parquet"] == src.verify.file("pairs.parquet").read_bytes()
    assert staged["parts"]["dataset"]["counts"] == {"positives": len(pd.read_parquet(src.verify.file("positives.parquet"))),
                                                   "pairs": len(pd.read_parquet(src.verify.file("pairs.parquet")))}


def test_details_are_per_model_and_benchmark_parquet_with_every_sample(tiny_run, staged):
    from redi.evaluate import SAMPLE_FILE_COLUMNS

    src = publish_source.load_run(tiny_run, RUN, "redi")
    folder = Path(staged["parts"]["details"]["folder"])
    assert set(src.grades) == {"base", "sft", "redi"}
    for lab in src.grades:
        samples = publish_source.evaluation_samples(src, lab)
        for bench, part in samples.groupby("benchmark"):
            got = pd.read_parquet(folder / "details" / lab / f"{bench}.parquet")
            assert list(got.columns) == list(SAMPLE_FILE_COLUMNS)
            pd.testing.assert_frame_equal(got, part.reset_index(drop=True))
        assert json.loads((folder / "results" / f"{lab}.json").read_text()) == json.loads(src.grades[lab].file("metrics.json").read_text())
    meta, _ = cards.split_card((folder / "README.md").read_text())
    assert {c["config_name"] for c in meta["configs"]} == {f"{lab}_demo_test" for lab in src.grades}
    assert all((folder / c["data_files"][0]["path"]).is_file() for c in meta["configs"])


def test_model_card_metadata_and_sections(staged):
    from huggingface_hub import ModelCard

    text = (Path(staged["parts"]["model"]["folder"]) / "README.md").read_text()
    card = ModelCard(text)  # huggingface_hub parses the metadata as the Hub does
    meta = card.data.to_dict()
    assert meta["license"] == "apache-2.0"  # tiny model + synthetic data: the project's own license
    assert "base_model" not in meta  # a model built from scratch has no Hub base model
    assert meta["datasets"] == ["me/redi-tiny-data"] and "redi" in meta["tags"]
    for section in ("## Data funnel", "## Evaluation", "## Deviations from the paper", "## Recipe", "## Citation"):
        assert section in text
    assert "| `model.base` | Qwen/Qwen2.5-Math-1.5B | tiny |" in text  # the recipe's departures from the paper's
    assert "**Not comparable**" in text  # not the paper's protocol: said so beside the paper rows
    assert "| after incomplete |" in text  # the verify stage's funnel
    assert "eprint={2505.24850}" in text


def test_model_card_metrics_table_matches_the_results_store(tiny_run, staged):
    from redi import results

    text = (Path(staged["parts"]["model"]["folder"]) / "README.md").read_text()
    src = publish_source.load_run(tiny_run, RUN, "redi")
    for lab, g in src.grades.items():
        m = json.loads(g.file("metrics.json").read_text())["benchmarks"]["demo_test"]
        cell = f"{100 * m['pass@1']:.1f} ± {100 * m['pass@1_sem']:.1f}"
        assert f"| {lab} | – | {cell} |" in text  # "Avg (paper's 5)" is empty for us, then demo_test
    df = results.ResultsStore(tiny_run / "results").load(run=RUN)  # what the pipeline recorded
    ours = [r for r in results.comparison_table(df, paper=True).rows if r["run"] == RUN]
    avg5 = "Avg (paper's 5)"
    for r in ours:
        assert f"| {r['model']} | {r[avg5]} | {r['demo_test']} | {r['Avg']} |" in text
    for name, nums in results.PAPER_RESULTS.values():
        assert f"| paper: {name} | {nums[-1]:.1f} |" in text  # the paper's Avg beside ours


def test_dataset_card_schema_counts_and_rule(staged):
    text = (Path(staged["parts"]["dataset"]["folder"]) / "README.md").read_text()
    meta, body = cards.split_card(text)
    assert [c["config_name"] for c in meta["configs"]] == ["positives", "pairs"] and meta["license"] == "apache-2.0"
    counts = staged["parts"]["dataset"]["counts"]
    assert f"| positives | {counts['positives']} |" in body and f"| pairs | {counts['pairs']} |" in body
    assert "`math_verify`:" in body and re.search(r"\| `chosen` \| (large_)?string \| a correct trace \(y_w\) \|", body)
    assert "redi/synth.py" in body and "| input |" in body


# ---------------------------------------------------------------------------------------- bad input
def _no_token(monkeypatch, tmp_path):
    from huggingface_hub import constants

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_bad_input_fails_with_one_line_before_anything_is_written(tiny_run, tmp_path, monkeypatch):
    out = tmp_path / "never"
    cases = [
        (dict(run="nope"), "run 'nope' is not registered .* \\(registered: tiny\\)"),
        (dict(model="dpo"), "--model 'dpo': this run has no such model; choose one of base, sft, redi"),
        (dict(repo="redi-tiny"), "--repo 'redi-tiny' is not a Hub repo id"),
        (dict(license=None, notes=str(tmp_path / "missing.md")), "--notes .*missing.md: no such file"),
    ]
    for kw, msg in cases:
        args = dict(artifact_root=tiny_run, run=RUN, model="redi", repo="me/x", out=out, dry_run=True) | kw
        with pytest.raises(publish.PublishError, match=msg) as e:
            publish.publish(**args)
        assert "\n" not in str(e.value)
    _no_token(monkeypatch, tmp_path)
    with pytest.raises(publish.PublishError, match="no Hugging Face token: set HF_TOKEN or run `hf auth login`"):
        publish.publish(tiny_run, RUN, "redi", "me/x", out)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    with pytest.raises(publish.PublishError, match="HF_HUB_OFFLINE is set"):
        publish.publish(tiny_run, RUN, "redi", "me/x", out)
    assert not out.exists()


def test_a_missing_artifact_names_itself_and_the_fix(tiny_run, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(tiny_run, root, symlinks=True)
    latest = root / "runs" / RUN / "latest.json"
    reg = json.loads(latest.read_text())
    shutil.rmtree(root / "verify" / reg_verify_key(root, reg))
    with pytest.raises(publish.PublishError, match=r"the training data of run 'tiny' \(verify artifact \w+ .*\) is missing or corrupt: rerun"):
        publish.stage(root, RUN, "redi", "me/x", tmp_path / "out")
    plan = publish.stage(root, RUN, "redi", "me/x", tmp_path / "out2", only=["details"])  # what needs no verify still goes
    assert list(plan["parts"]) == ["details"]
    with pytest.raises(publish.PublishError, match="is not empty and is not an earlier push folder"):
        publish.stage(root, RUN, "redi", "me/x", root / "runs", only=["details"])


def reg_verify_key(root: Path, reg: dict) -> str:
    return json.loads((root / "sft" / reg["models"]["sft"]["key"] / "manifest.json").read_text())["inputs"]["verify"]


# ---------------------------------------------------------------------------------------- a real push (stand-in Hub)
def test_real_push_uploads_exactly_the_dry_run_folders(tiny_run, staged, tmp_path, monkeypatch):
    from _hub_standin import HubStandIn
    from huggingface_hub import HfApi, constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_standin_token")
    with HubStandIn() as hub:
        plan = publish.publish(tiny_run, RUN, "redi", "me/redi-tiny", tmp_path / "push", private=True,
                               api=HfApi(endpoint=hub.url))
        again = publish.publish(tiny_run, RUN, "redi", "me/redi-tiny", tmp_path / "push", api=HfApi(endpoint=hub.url))
    assert hub.tokens == {"hf_standin_token"}  # the token came from HF_TOKEN, as huggingface_hub reads it
    assert set(hub.repos) == {("model", "me/redi-tiny"), ("dataset", "me/redi-tiny-data"), ("dataset", "me/redi-tiny-details")}
    assert all(hub.private.values())
    assert set(plan["uploaded"]) == {"model", "dataset", "details"} and again["uploaded"]  # a second push: repos exist (409), commits again
    for kind, part in staged["parts"].items():  # the dry run's folders, byte for byte
        assert hub.repos[(part["repo_type"], part["repo_id"])] == _tree(Path(part["folder"])), kind
    assert hub.validated == ["model", "dataset", "dataset"] * 2  # every card's metadata went through validate-yaml


# ---------------------------------------------------------------------------------------- CLI and flow
def test_cli_push_dry_run_and_bad_input(tiny_run, staged, tmp_path, capsys):
    from redi.cli import main

    out = tmp_path / "cli"
    assert main(["push", RUN, "--model", "redi", "--repo", "me/redi-tiny", "--artifact-root", str(tiny_run),
                 "--out", str(out), "--dry-run", "--no-prefect"]) == 0
    printed = capsys.readouterr().out
    assert "me/redi-tiny-details" in printed and "Dry run: nothing pushed" in printed
    for kind, part in staged["parts"].items():
        assert _tree(out / kind) == _tree(Path(part["folder"])), kind
    assert main(["push", RUN, "--model", "simpo", "--repo", "me/x", "--artifact-root", str(tiny_run), "--dry-run", "--no-prefect"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("redi: --model 'simpo'") and "\n" not in err
    # docs/publishing.md's `--only model`: the default folder is runs/<run>/publish/<model>
    assert main(["push", RUN, "--model", "sft", "--repo", "me/redi-tiny-sft", "--only", "model", "--artifact-root", str(tiny_run),
                 "--dry-run", "--no-prefect"]) == 0
    default = tiny_run / "runs" / RUN / "publish" / "sft"
    assert sorted(p.name for p in default.iterdir()) == ["model", "push.json"] and (default / "model" / "README.md").is_file()


def test_cli_push_of_an_unregistered_run_fails_before_prefect(tmp_path, capsys, monkeypatch):
    """Without --no-prefect, an unknown run (or a malformed repo id) is one line before Prefect's server starts."""
    import redi.cli as cli

    started = []
    monkeypatch.setattr(cli, "prefect_env", lambda *a: started.append(a))
    assert cli.main(["push", "nope", "--model", "redi", "--repo", "me/x", "--artifact-root", str(tmp_path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("redi: run 'nope' is not registered") and "\n" not in err and not started
    assert cli.main(["push", "nope", "--model", "redi", "--repo", "bad id", "--artifact-root", str(tmp_path), "--dry-run"]) == 2
    assert "not a Hub repo id" in capsys.readouterr().err and not started


def test_cli_nightly_on_a_missing_root_is_one_line(tmp_path, capsys):
    from redi.cli import main

    assert main(["nightly", "--artifact-root", str(tmp_path / "gone"), "--no-prefect"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"redi: --artifact-root {tmp_path / 'gone'}: no such folder") and "\n" not in err


def test_cli_real_push_goes_to_the_hub_endpoint(tiny_run, staged, tmp_path, monkeypatch, capsys):
    """`redi push RUN --model redi --repo NS/NAME` as documented: HfApi() at huggingface_hub's endpoint (the stand-in)."""
    from _hub_standin import HubStandIn
    from huggingface_hub import constants

    from redi.cli import main

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_cli_token")
    with HubStandIn() as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        assert main(["push", RUN, "--model", "redi", "--repo", "me/redi-tiny", "--artifact-root", str(tiny_run),
                     "--out", str(tmp_path / "cli"), "--no-prefect"]) == 0
    assert f"{hub.url}/me/redi-tiny/commit/" in capsys.readouterr().out and hub.tokens == {"hf_cli_token"}
    for part in staged["parts"].values():
        assert hub.repos[(part["repo_type"], part["repo_id"])] == _tree(Path(part["folder"]))


def test_flow_dry_run_and_push(tiny_run, staged, tmp_path, prefect_harness, monkeypatch):
    from _hub_standin import HubStandIn
    from huggingface_hub import constants

    from flows.publish import redi_push

    plan = redi_push(run=RUN, model="redi", repo="me/redi-tiny", artifact_root=str(tiny_run), dry_run=True,
                     out=str(tmp_path / "flow"))
    assert plan["dry_run"] and plan["uploaded"] == {}
    for kind, part in staged["parts"].items():
        assert _tree(tmp_path / "flow" / kind) == _tree(Path(part["folder"])), kind
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_flow_token")
    with HubStandIn() as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        plan = redi_push(run=RUN, model="redi", repo="me/redi-tiny", artifact_root=str(tiny_run), only=["dataset"],
                         out=str(tmp_path / "flow-push"))
    assert set(plan["uploaded"]) == {"dataset"} and set(hub.repos) == {("dataset", "me/redi-tiny-data")}
    assert hub.repos[("dataset", "me/redi-tiny-data")] == _tree(tmp_path / "flow-push" / "dataset")  # the folder it staged
