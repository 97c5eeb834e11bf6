"""Strict typed recipes: precedence, field-naming errors, hash fields that exclude what cannot change results."""

from __future__ import annotations

import pytest

from redi.config import Recipe, RecipeError, load_recipe


def test_precedence_defaults_yaml_overrides(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("redi:\n  alpha: 0.5\n  lr: 2.0e-6\nsft:\n  epochs: 2\n")
    r = load_recipe(p, ["redi.alpha=1.0"])
    assert r.redi.alpha == 1.0  # override beats YAML
    assert r.redi.lr == 2e-6  # YAML beats default
    assert r.sft.epochs == 2
    assert r.sft.lr == Recipe().sft.lr  # default


def test_folder_means_recipe_yaml(tmp_path):
    (tmp_path / "recipe.yaml").write_text("run:\n  name: x\n")
    assert load_recipe(tmp_path).run.name == "x"


@pytest.mark.parametrize(
    "override, field",
    [
        ("redi.alphaa=0.5", "redi.alphaa"),
        ("sft.lr=-1", "sft.lr"),
        ("redi.alpha=1.5", "redi.alpha"),
        ("evaluate.n_samples=abc", "evaluate.n_samples"),
        ("nonsense.x=1", "nonsense"),
        ("data.source=local", "data"),  # local without a path
        ("model.base=' '", "model"),
        ("verify.label_rule=llama", "verify.label_rule"),
        ("redi.loss=ipo", "redi.loss"),
    ],
)
def test_bad_values_fail_naming_the_field(override, field):
    with pytest.raises(RecipeError) as e:
        load_recipe(None, [override])
    assert field in str(e.value)


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="section.field=value"):
        load_recipe(None, ["redi.alpha"])
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(tmp_path / "bad.yaml")


def test_list_and_null_overrides():
    r = load_recipe(None, ["evaluate.benchmarks=[math500, gsm8k]", "verify.max_prompt_tokens=null"])
    assert r.evaluate.benchmarks == ["math500", "gsm8k"]
    assert r.verify.max_prompt_tokens is None


def test_hash_fields_ignore_what_cannot_change_results():
    a, b = Recipe(), load_recipe(None, ["verify.workers=7", "evaluate.grade_workers=3", "sft.log_steps=5"])
    assert a.verify.hash_fields() == b.verify.hash_fields()
    assert a.evaluate.hash_fields() == b.evaluate.hash_fields()
    assert a.sft.hash_fields() == b.sft.hash_fields()
    c = load_recipe(None, ["evaluate.n_samples=4"])
    assert a.evaluate.hash_fields() != c.evaluate.hash_fields()


def test_stage2_hash_fields_follow_the_objective():
    redi_a = load_recipe(None, ["redi.beta=0.5"]).redi.hash_fields()
    redi_b = load_recipe(None, ["redi.beta=2"]).redi.hash_fields()
    assert redi_a == redi_b  # beta does not enter the REDI loss
    assert load_recipe(None, ["redi.alpha=1"]).redi.hash_fields() != Recipe().redi.hash_fields()
    dpo_a = load_recipe(None, ["redi.loss=dpo", "redi.alpha=0.1"]).redi.hash_fields()
    dpo_b = load_recipe(None, ["redi.loss=dpo", "redi.alpha=0.9"]).redi.hash_fields()
    assert dpo_a == dpo_b
    assert load_recipe(None, ["redi.loss=simpo", "redi.gamma=2"]).redi.hash_fields() != load_recipe(None, ["redi.loss=simpo"]).redi.hash_fields()


def test_every_field_has_help_text():
    def walk(model_cls, prefix=""):
        for name, f in model_cls.model_fields.items():
            assert f.description, f"{prefix}{name} has no description"
            ann = f.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann, f"{prefix}{name}.")

    walk(Recipe)


def test_paths_in_a_recipe_file_are_relative_to_the_file(tmp_path, monkeypatch):
    """A recipe runs the same from any folder: its relative paths resolve against its own folder, once, at load."""
    folder = tmp_path / "recipes" / "mine"
    (folder / "local-model").mkdir(parents=True)
    (folder / "recipe.yaml").write_text(
        "run: {artifact_root: ../../art, results_db: results, accelerate_config: acc.yaml}\n"
        "data: {source: local, local_path: data/traces.jsonl}\n"
        "model: {base: local-model}\n"
        "evaluate: {benchmark_dir: /abs/bench, benchmark_paths: {mine: b.jsonl}}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    r = load_recipe("../recipes/mine")
    assert r.run.artifact_root == str(tmp_path / "art")
    assert (r.run.results_db, r.run.accelerate_config) == (str(folder / "results"), str(folder / "acc.yaml"))
    assert r.data.local_path == str(folder / "data" / "traces.jsonl")
    assert r.model.base == str(folder / "local-model")
    assert r.evaluate.benchmark_dir == "/abs/bench"  # absolute: kept
    assert r.evaluate.benchmark_paths == {"mine": str(folder / "b.jsonl")}
    # Hub ids and `tiny` are not paths; command-line overrides are relative to the working directory
    (folder / "recipe.yaml").write_text("model: {base: Qwen/Qwen2.5-Math-1.5B}\n")
    assert load_recipe(folder / "recipe.yaml", ["run.artifact_root=here"]).model.base == "Qwen/Qwen2.5-Math-1.5B"
    assert load_recipe(folder / "recipe.yaml", ["run.artifact_root=here"]).run.artifact_root == "here"
    assert load_recipe(None, ["model.base=tiny"]).model.base == "tiny"


def test_registry_fields_list_the_registered_names():
    """verify.label_rule and data.source follow their registries (redi.label_rules, redi.sources): the schema (and so
    the recipe forms) lists exactly the registered names, and an unknown name fails naming them."""
    from redi.config import DataConfig, VerifyConfig
    from redi.label_rules import LABEL_RULES
    from redi.sources import SOURCES

    assert VerifyConfig.model_json_schema()["properties"]["label_rule"]["enum"] == list(LABEL_RULES)
    assert DataConfig.model_json_schema()["properties"]["source"]["enum"] == list(SOURCES)
    with pytest.raises(ValueError, match="unknown label rule 'llama'; registered: math_verify, dataset, landmv"):
        VerifyConfig(label_rule="llama")


def test_save_dtype_auto_is_the_evaluation_dtype_written_out():
    """The trained models are saved in the dtype they are served in; `auto` is resolved so the key hashes it."""
    r = Recipe()
    assert (r.sft.save_dtype, r.redi.save_dtype) == ("bfloat16", "bfloat16")  # evaluate.dtype defaults to bf16
    r = Recipe(evaluate={"dtype": "auto"}, redi={"save_dtype": "float16"})
    assert (r.sft.save_dtype, r.redi.save_dtype) == ("float32", "float16")  # explicit values are kept
    assert Recipe(evaluate={"dtype": "float32"}).sft.hash_fields()["save_dtype"] == "float32"
