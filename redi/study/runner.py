"""The study runner: :class:`Study` runs every step against one Pipeline (same store, same stage entry
points, keys chained on artifacts); :func:`run_study` and :func:`main` run it in this process."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..artifacts import Artifact, code_version, stage_key
from ..config import EvaluateConfig, Recipe, SFTConfig, Stage2Config
from ..pipeline import Pipeline, stage_code
from .config import CONTINUED_SFT, MethodSpec, PointJob, StudyConfig, load_study
from .logic import PlateauDecision, choose, collapse_check, param_str, plateau_decision, sft_summary
from .report import write_report
from .results import EvalResult, PointResult, StudyResult, build_seconds, read_signals

log = logging.getLogger(__name__)


class Study:
    """Runs the study against one Pipeline (same store, same stage entry points, keys chained on artifacts)."""

    def __init__(self, recipe: Recipe, cfg: StudyConfig, pipeline: Pipeline | None = None):
        self.recipe, self.cfg = recipe, cfg
        self.pipe = pipeline or Pipeline(recipe)
        self.store = self.pipe.store
        self.timings: dict[str, float] = {}
        # Code versions are read once: a source file edited mid-study must not split one method's models
        # over two keys (the Pipeline caches them the same way).
        self.codes = {s: stage_code(s) for s in ("sft", "redi")}
        self.codes["evaluate"] = stage_code("evaluate", "grade")

    # -------------------------------------------------------------- shared upstream
    def base(self) -> dict[str, Artifact]:
        data = self.pipe.download()
        model = self.pipe.base_model(data)
        verify = self.pipe.verify(data, model)
        return {"download": data, "model": model, "verify": verify}

    def on_policy(self, base: dict[str, Artifact], start: Artifact) -> dict[str, Artifact]:
        """``negatives: on_policy``: ``{"pairs": verify artifact, "pairs_download": its traces}``, sampled from the SFT
        start ``start``.

        The recipe's data section becomes the ``generate`` source (redi.teacher): ``on_policy_n`` samples per
        training problem (the synthetic source's problems, or the download's problems written to a parquet
        file for any other source) from ``start``'s model folder, with the evaluate section's sampling settings
        and backend; then the recipe's verify stage with the base model's tokenizer. Both are ordinary store
        artifacts, keyed by the model's content, so a rerun samples nothing again.
        """
        from ..config import DataConfig

        ev, d = self.recipe.evaluate, self.recipe.data
        problems = "synthetic" if d.source == "synthetic" else str(self._problems_file(base["download"]))
        gen = {"model": str(start.file("model")), "problems": problems, "n": self.cfg.on_policy_n,
               "temperature": ev.temperature, "top_p": ev.top_p, "max_new_tokens": ev.max_new_tokens, "seed": ev.seed,
               "backend": ev.backend, "prompt_protocol": ev.prompt_protocol or self.recipe.prompt.train, "dtype": ev.dtype,
               "hf_batch_size": ev.hf_batch_size, "kv_cache_gb": ev.kv_cache_gb, "grade_workers": ev.grade_workers,
               "grade_timeout_s": ev.grade_timeout_s}
        data_cfg = DataConfig.model_validate({**d.model_dump(mode="json", by_alias=True), "source": "generate", "generate": gen,
                                              "max_rows": None})
        pipe = Pipeline(self.recipe.model_copy(update={"data": data_cfg}))
        data = pipe.download()
        pairs = pipe.verify(data, base["model"])
        if not pairs.summary.get("pairs"):
            raise ValueError(f"study.negatives=on_policy: {self.cfg.on_policy_n} samples per problem from the SFT start gave no "
                             f"(correct, incorrect) pair on any of {pairs.summary.get('problems')} problems (labels "
                             f"{pairs.summary.get('labels')}): the start solves all or none of them; raise study.on_policy_n "
                             "or train the start further")
        log.info("on-policy pairs: %s pairs from %d samples per problem of the SFT start (%s)",
                 pairs.summary.get("pairs"), self.cfg.on_policy_n, pairs.key)
        return {"pairs": pairs, "pairs_download": data}

    def _problems_file(self, data: Artifact) -> Path:
        """The download's distinct (problem, answer) rows as a parquet file beside the run's reports (content-keyed
        by the generate source, so its location does not matter)."""
        import pyarrow.parquet as pq

        t = pq.read_table(data.file("traces.parquet"), columns=["problem_id", "problem", "answer"]).to_pandas()
        t = t.drop_duplicates("problem_id").rename(columns={"problem_id": "id"})
        path = self.pipe.run_dir() / "on_policy_problems" / f"{data.key}.parquet"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            t.to_parquet(path.with_suffix(".tmp"), index=False)
            path.with_suffix(".tmp").replace(path)
        return path

    @staticmethod
    def pairs_of(base: dict[str, Artifact]) -> Artifact:
        """The verify artifact stage 2's pair methods train on: the on-policy pairs when present, else the recipe's."""
        return base.get("pairs", base["verify"])

    def _extra(self, data: Artifact) -> dict[str, Path]:
        return {b: data.dir / "benchmarks" / f"{b}.jsonl" for b in (self.cfg.val_benchmark, self.cfg.test_benchmark)}

    # -------------------------------------------------------------- evaluation
    def eval_config(self, split: str) -> EvaluateConfig:
        c = self.cfg
        bench, n, mp = ((c.val_benchmark, c.val_n_samples, c.val_max_problems) if split == "val"
                        else (c.test_benchmark, c.test_n_samples, c.test_max_problems))
        return EvaluateConfig.model_validate({**self.recipe.evaluate.model_dump(mode="json"), "benchmarks": [bench],
                                              "n_samples": n, "max_problems": mp, "pass_k": []})

    def evaluate(self, model: Artifact, split: str, data: Artifact, label: str) -> EvalResult:
        """Evaluate a model artifact on one split: an ``evaluate`` artifact keyed by the model's key."""
        from .. import benchmarks
        from .. import evaluate as ev

        cfg = self.eval_config(split)
        extra = self._extra(data)
        fps = {b: benchmarks.fingerprint(b, cfg, extra) for b in cfg.benchmarks}
        model_dir = model.dir if model.stage == "model" else model.file("model")
        model_ref = f"{model.stage}:{model.key}"
        key = stage_key("evaluate", cfg.hash_fields(), {"model": model_ref, "benchmarks": fps}, self.codes["evaluate"])
        art = self.store.build("evaluate", key, lambda out, work: ev.evaluate_model(cfg, model_dir, out, extra, label, work=work),
                               config=cfg.hash_fields(), inputs={"model": model_ref, "model_dir": str(model_dir), "benchmarks": fps},
                               refresh="evaluate" in self.recipe.run.refresh)
        res = EvalResult.from_metrics(split, art, cfg.benchmarks[0])
        log.info("study eval %s on %s: pass@1 %.3f (se %.3f)%s", label, split, res.pass1, res.se, " [cached]" if art.cached else "")
        return res

    # -------------------------------------------------------------- training
    def _train(self, stage: str, cfg: SFTConfig | Stage2Config, start: Artifact, verify: Artifact) -> Artifact:
        """One ``sft`` or ``redi`` artifact trained from ``start`` (a base-model or SFT artifact) by the stage entry points.

        Keys follow the Pipeline's: SFT from the base model and stage 2 from an SFT artifact get exactly the key
        ``redi run`` would give them; SFT continued from an SFT model names that model as ``sft:<key>``.
        Training runs as the Pipeline's does (``redi.launch.train_stage``): in this process, or under ``accelerate
        launch`` with ``run.launcher=accelerate`` (on a 2-core CPU, ``run.num_processes=2`` trains each model on
        both cores; docs/study.md).
        """
        from .. import launch

        start_dir = start.dir if start.stage == "model" else start.file("model")
        if stage == "redi":
            upstream = {"verify": verify.key, "sft": start.key}
        else:
            upstream = {"verify": verify.key, "model": start.key if start.stage == "model" else f"{start.stage}:{start.key}"}
        config = {**cfg.hash_fields(), "prompt": self.recipe.prompt.hash_fields()}  # as Pipeline keys sft / redi
        key = stage_key(stage, config, upstream, self.codes[stage])
        section, which, data = (("sft", "sft", "positives.parquet") if stage == "sft" else ("redi", "stage2", "pairs.parquet"))
        recipe = self.recipe.model_copy(update={section: cfg})

        def fn(out: Path, work: Path) -> dict:
            return launch.train_stage(recipe, which, start_dir, verify.file(data), out, work)
        return self.store.build(stage, key, fn, config=config, inputs={**upstream, "start_dir": str(start_dir)},
                                refresh=stage in self.recipe.run.refresh)

    def sft_round_config(self, r: int) -> SFTConfig:
        base = self.recipe.sft.model_dump(mode="json")
        return SFTConfig.model_validate({**base, "epochs": self.cfg.sft_round_epochs, "max_steps": None, "seed": base["seed"] + r - 1})

    def sft_round(self, r: int, start: Artifact, verify: Artifact) -> Artifact:
        t0 = time.time()
        art = self._train("sft", self.sft_round_config(r), start, verify)
        self.timings[f"sft_round_{r}"] = time.time() - t0
        return art

    def sft_round_eval(self, r: int, start: Artifact, base: dict[str, Artifact]) -> tuple[Artifact, dict[str, Any]]:
        """Round ``r`` of SFT from ``start`` and its validation score: (artifact, curve row)."""
        art = self.sft_round(r, start, base["verify"])
        ev = self.evaluate(art, "val", base["download"], f"sft-round{r}")
        row = {"round": r, "key": art.key, "steps": int(art.summary.get("steps", 0) or 0), "pass@1": ev.pass1, "se": ev.se,
               "no_answer": ev.no_answer, "train_s": build_seconds(art), "eval_s": ev.seconds}
        return art, row

    def decide(self, curve: list[dict[str, Any]]) -> PlateauDecision:
        c = self.cfg
        return plateau_decision(curve, c.plateau_patience, c.plateau_z, c.plateau_min_delta, c.sft_max_rounds, c.plateau_floor)

    def sft_to_plateau(self, base: dict[str, Artifact]) -> dict[str, Any]:
        """Rounds of SFT, each evaluated on validation, until the plateau. Returns the curve and the start."""
        curve: list[dict[str, Any]] = []
        arts: list[Artifact] = []
        prev = base["model"]
        for r in range(1, self.cfg.sft_max_rounds + 1):
            art, row = self.sft_round_eval(r, prev, base)
            curve.append(row)
            arts.append(art)
            decision = self.decide(curve)
            log.info("SFT round %d: val pass@1 %.3f +- %.3f -> %s", r, row["pass@1"], row["se"], decision.reason)
            if decision.stop:
                break
            prev = art
        return sft_summary(curve, decision, arts[decision.best_round - 1])

    def stage2_steps(self, verify: Artifact) -> int:
        if self.cfg.stage2_steps:
            return self.cfg.stage2_steps
        import pyarrow.parquet as pq

        n_pairs = pq.ParquetFile(verify.file("pairs.parquet")).metadata.num_rows
        return max(1, math.ceil(self.recipe.redi.epochs * n_pairs / self.recipe.redi.global_batch))

    def point_config(self, method: MethodSpec, params: dict[str, float], seed: int, steps: int) -> SFTConfig | Stage2Config:
        """The stage config of one (method, setting, seed): the recipe's ``redi`` section with the point applied;
        for ``sft`` (the `none` row) the recipe's ``sft`` section with stage 2's steps, batch and schedule."""
        r2 = self.recipe.redi
        if method.loss == CONTINUED_SFT:
            sched = {k: getattr(r2, k) for k in ("global_batch", "micro_batch", "warmup_ratio", "schedule", "min_lr_ratio")}
            return SFTConfig.model_validate({**self.recipe.sft.model_dump(mode="json"), **sched, **params,
                                             "max_steps": steps, "seed": seed})
        return Stage2Config.model_validate({**r2.model_dump(mode="json"), "loss": method.loss, **params,
                                            "max_steps": steps, "seed": seed})

    def point(self, method: MethodSpec, params: dict[str, float], seed: int, split: str,
              base: dict[str, Artifact], start: Artifact) -> PointResult:
        """Train (or take from cache) one stage-2 model from ``start`` and evaluate it on ``split``."""
        cfg = self.point_config(method, params, seed, self.stage2_steps(self.pairs_of(base)))
        stage = "sft" if method.loss == CONTINUED_SFT else "redi"
        art = self._train(stage, cfg, start, base["verify"] if stage == "sft" else self.pairs_of(base))
        train_s = build_seconds(art)
        signals = read_signals(art.dir / "signals.jsonl")
        collapse = collapse_check(signals, self.recipe.redi.collapse_threshold)
        label = f"{method.name}[{','.join(f'{k}={v:g}' for k, v in params.items())}]-s{seed}"
        ev = self.evaluate(art, split, base["download"], label)
        if collapse["fired"]:
            log.warning("collapse warning: %s chosen log-prob/token %.3f -> %.3f, flagged from step %s", label,
                        collapse["start"], collapse["final"], collapse["first_step"])
        return PointResult(method.name, method.loss, params, seed, art.key, stage, art.path, art.cached, train_s,
                           collapse, ev, {k: v for k, v in art.summary.items() if not isinstance(v, (list, dict))})

    def search_jobs(self, method: MethodSpec) -> list[PointJob]:
        return [PointJob(method.name, p, self.cfg.search_seed, "val") for p in method.points()]

    def final_jobs(self, method: MethodSpec, params: dict[str, float]) -> list[PointJob]:
        return [PointJob(method.name, params, s, "test") for s in self.cfg.seeds]

    def method(self, name: str) -> MethodSpec:
        return next(m for m in self.cfg.methods if m.name == name)

    def points(self, jobs: list[PointJob], base: dict[str, Artifact], start: Artifact) -> list[PointResult]:
        """Every job's :meth:`point`, in order: here one after another (``study.workers`` 1), else up to
        ``workers`` at once, each in its own process (:func:`redi.study.parallel.run_points`)."""
        if self.cfg.workers == 1:
            return [self.point(self.method(j.method), j.params, j.seed, j.split, base, start) for j in jobs]
        from .parallel import run_points

        return run_points(self.recipe, self.cfg, jobs, base, start, self.pipe.run_dir() / "study_points")

    # -------------------------------------------------------------- whole study
    def run(self, out_dir: Path | None = None) -> dict[str, Any]:
        """The whole study in this process (the Prefect flow runs the same steps as tasks)."""
        t0 = time.time()
        base = self.base()
        sft = self.sft_to_plateau(base)
        start = sft["start"]
        sft_test = self.evaluate(start, "test", base["download"], "sft-plateau")
        if self.cfg.negatives == "on_policy":
            base = {**base, **self.on_policy(base, start)}
        search = _by_method(self.points([j for m in self.cfg.methods for j in self.search_jobs(m)], base, start))
        chosen = {m.name: choose(m, [p.row() for p in search[m.name]]) for m in self.cfg.methods}
        final = _by_method(self.points([j for m in self.cfg.methods if m.final for j in self.final_jobs(m, chosen[m.name])],
                                       base, start))
        result = self.assemble(base, sft, sft_test, search, final, wall_s=time.time() - t0)
        return self.report(result, out_dir)

    def assemble(self, base: dict[str, Artifact], sft: dict[str, Any], sft_test: EvalResult,
                 search: dict[str, list[PointResult]], final: dict[str, list[PointResult]], wall_s: float) -> StudyResult:
        points = [p for v in [*search.values(), *final.values()] for p in v]
        signals = {f"{p.method}|{param_str(p.params)}|{p.seed}": read_signals(Path(p.model_path) / "signals.jsonl") for p in points}
        build_s = {"sft_rounds_train": sum(c["train_s"] for c in sft["curve"]), "sft_rounds_eval": sum(c["eval_s"] for c in sft["curve"]),
                   "stage2_train": sum({p.model_key: p.train_seconds for p in points}.values()),
                   "stage2_eval": sum(p.eval.seconds for p in points) + sft_test.seconds}
        if "pairs" in base:  # negatives: on_policy: sampling from the start and verifying the samples
            build_s["on_policy_pairs"] = build_seconds(base["pairs_download"]) + build_seconds(base["pairs"])
        build_s["total_compute"] = sum(build_s.values())
        return StudyResult(
            sft_curve=sft["curve"], sft_best_round=sft["best_round"], sft_reason=sft["reason"], sft_plateaued=sft["plateaued"],
            sft_key=sft["start"].key, sft_test=asdict(sft_test),
            search={k: [p.row() for p in v] for k, v in search.items()},
            chosen={m.name: choose(m, [p.row() for p in search[m.name]]) for m in self.cfg.methods if m.name in search},
            final={k: [p.row() for p in v] for k, v in final.items()}, signals=signals,
            timings={"wall_this_invocation": round(wall_s, 1), **{k: round(v, 1) for k, v in build_s.items()}},
            stage2_steps=self.stage2_steps(self.pairs_of(base)), collapse_threshold=self.recipe.redi.collapse_threshold,
            negatives=self.cfg.negatives, pairs=_pairs_info(self.pairs_of(base)),
            collapse_drop=self.recipe.redi.collapse_drop,
            test_n_samples=self.cfg.test_n_samples, search_seed=self.cfg.search_seed)

    def report(self, result: StudyResult, out_dir: Path | None = None) -> dict[str, Any]:
        """The report as a ``study`` artifact of the store (keyed by every input key), mirrored to ``out_dir``
        (default ``<artifact_root>/runs/<run.name>/study``)."""
        import shutil

        d = asdict(result)
        key = stage_key("study", self.cfg.hash_fields(),
                        {"sft": result.sft_key, "points": sorted(r["model_key"] for v in [*d["search"].values(), *d["final"].values()] for r in v)},
                        code_version(["redi.study"]))
        art = self.store.build("study", key, lambda out, work: _summary(write_report(result, out)), config=self.cfg.model_dump(mode="json"),
                               inputs={"sft": result.sft_key})
        dest = Path(out_dir) if out_dir else self.pipe.run_dir() / "study"
        shutil.copytree(art.dir, dest, dirs_exist_ok=True)
        summary = json.loads((art.dir / "summary.json").read_text())
        return {**summary, "artifact": art.path, "out_dir": str(dest)}


def _by_method(points: list[PointResult]) -> dict[str, list[PointResult]]:
    out: dict[str, list[PointResult]] = {}
    for p in points:
        out.setdefault(p.method, []).append(p)
    return out


def _pairs_info(verify: Artifact) -> dict[str, Any]:
    """What stage 2 trained on: the verify artifact's key, its pairs, traces, problems and label counts."""
    s = verify.summary
    return {"verify_key": verify.key, "pairs": s.get("pairs"), "traces": s.get("traces"), "problems": s.get("problems"),
            "labels": s.get("labels")}


def _summary(rep: dict[str, Any]) -> dict[str, Any]:
    Path(rep["out_dir"], "summary.json").write_text(json.dumps(rep, indent=1, default=str))
    return {k: v for k, v in rep.items() if k != "table"}


# ---------------------------------------------------------------------------------------- direct entry
def run_study(path: str | Path, overrides: list[str] | None = None, out_dir: str | Path | None = None) -> dict[str, Any]:
    """Load ``path`` (folder with recipe.yaml + study.yaml) and run the whole study in this process."""
    recipe, cfg = load_study(path, overrides)
    return Study(recipe, cfg).run(Path(out_dir) if out_dir else None)


def main(argv: list[str] | None = None) -> int:
    """``python -m redi.study deployments/study-cpu [--set k=v ...]``: the study without Prefect."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m redi.study", description="The CPU-scale study without Prefect.")
    p.add_argument("recipe", help="Folder with recipe.yaml + study.yaml.")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="Recipe override (redi.lr=1e-4) or study override (study.seeds=[0]).")
    p.add_argument("--out", default=None, help="Report folder (default <artifact_root>/runs/<run.name>/study).")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rep = run_study(a.recipe, a.overrides, a.out)
    log.info("study report in %s\n%s", rep["out_dir"], rep["table_markdown"])
    return 0
