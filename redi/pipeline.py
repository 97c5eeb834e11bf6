"""The REDI DAG as plain Python: download -> model -> verify -> sft -> redi -> evaluate (-> grade) -> report.

The nodes (order, inputs, config section, builder method, label) are the table in ``redi.dag``; this
module builds them. ``Pipeline.run_until`` walks the table with ``redi.dag.walk`` (the one walker),
calling ``Pipeline.build_node`` per node.

Every stage is a content-addressed artifact (``redi.artifacts``): its key hashes the stage's own config
fields (``hash_fields``), the keys of its upstream artifacts and the code version of the modules it runs.
Keys are computed without running anything (``Pipeline.plan``), so ``redi status`` can say what is cached
and a changed evaluation parameter reruns only evaluation, a changed alpha only ``redi`` and its
evaluation. Asking for one stage builds (or takes from cache) exactly its upstream.

This module is what the Prefect tasks (``tasks/``), the flows and the CLI call. It never imports Prefect.
How training is launched (in process or under ``accelerate launch``) is :mod:`redi.launch`; the
``report`` node (results store, table, registration) is :mod:`redi.report`.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from . import dag, distributed, launch, tracking
from .artifacts import Artifact, ArtifactStore, code_version, hash_obj, stage_key
from .config import Recipe, RecipeError
from .launch import auto_device, go_offline

log = logging.getLogger(__name__)

# Entry modules of each stage. A stage's code version hashes these and every `redi` module they import,
# transitively (redi.artifacts.module_closure); configs are hashed by value, so redi.config is left out.
# Evaluation leaves out the grader: a grader change re-grades saved samples (`grade`) instead of regenerating.
STAGE_MODULES: dict[str, tuple[str, ...]] = {
    "download": ("redi.data",),
    "model": ("redi.tinymodel",),
    "verify": ("redi.verify",),
    "sft": ("redi.train",),
    "redi": ("redi.train",),
    "evaluate": ("redi.evaluate",),
    "grade": ("redi.grader", "redi.gradepool", "redi.metrics"),
    "curves": ("redi.curves",),
}
STAGE_EXCLUDE: dict[str, tuple[str, ...]] = {
    "evaluate": ("redi.config", "redi.grader", "redi.gradepool", "redi.metrics", "redi.results"),
}
DEFAULT_EXCLUDE = ("redi.config",)


def stage_code(*stages: str) -> str:
    """The code version that keys `stages` (one stage, or several built as one artifact, e.g. evaluate + grade).

    The one definition every key in the project uses (Pipeline, study, registry)."""
    mods = tuple(m for s in stages for m in STAGE_MODULES[s])
    exclude = STAGE_EXCLUDE.get(stages[0], DEFAULT_EXCLUDE) if len(stages) == 1 else DEFAULT_EXCLUDE
    return code_version(mods, exclude)
MODEL_LABELS = dag.MODEL_LABELS
LABEL_STAGE = dag.LABEL_STAGE  # which stage produces each evaluated model


def check_inputs(recipe: Recipe) -> None:
    """One-line errors, before any work, for inputs a run would otherwise trip over late: a missing
    ``data.local_path`` (found at download), an unknown benchmark name (found at evaluation, after training),
    a URL artifact root whose backend, endpoint, credentials or bucket is missing (found at the first stage)."""
    from . import benchmarks, sources
    from .storage import Remote, is_url

    if is_url(recipe.run.artifact_root):
        Remote(recipe.run.artifact_root).check()
    check_base_model(recipe.model.base)
    cfg = recipe.run.accelerate_config
    if recipe.run.launcher == "accelerate" and cfg and not Path(cfg).expanduser().is_file():
        raise RecipeError(f"run.accelerate_config {cfg!r}: no such file (the shipped ones: "
                          "deployments/accelerate/{ddp,fsdp,zero2,zero3}.yaml)")
    src = sources.get_source(recipe.data.source)
    if src.check is not None:
        src.check(recipe.data)
    extra = benchmarks.from_download(recipe.data.source)
    names = list(recipe.evaluate.benchmarks)
    if recipe.evaluate.checkpoints is not None:  # the curves stage's benchmarks
        names += [n for n in recipe.evaluate.checkpoints.benchmarks if n not in names]
    if recipe.verify.decontaminate not in (False, "off"):
        names += [n for n in recipe.verify.decontam_benchmarks if n not in names]
    benchmarks.check_names(names, recipe.evaluate, extra)


def check_base_model(base: str) -> None:
    """``model.base`` is ``tiny``, an existing transformers folder, or a Hub id (org/name): else one line now, not a
    Hub error after the download stage."""
    from .teacher import is_hub_id

    if base == "tiny":
        return
    p = Path(base).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise RecipeError(f"model.base {str(p)!r} is not a transformers model folder (no config.json)")
        return
    if not is_hub_id(base):
        raise RecipeError(f"model.base {base!r} does not exist: give a model folder, a Hub model id (org/name, e.g. "
                          "Qwen/Qwen2.5-Math-1.5B) or tiny")


@dataclass
class StagePlan:
    """One node of the DAG as planned: its key, where its artifact lives, whether a valid one is cached."""

    stage: str
    label: str | None
    key: str
    path: str
    cached: bool
    upstream: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.stage}[{self.label}]" if self.label else self.stage


class Pipeline:
    """Runs the stages of one recipe against one artifact store."""

    def __init__(self, recipe: Recipe, store: ArtifactStore | None = None):
        self.recipe = recipe
        self.store = store or ArtifactStore(recipe.run.artifact_root, recipe.run.cache_dir)
        self.timings: dict[str, float] = {}
        self.nodes: dict[str, Artifact] = {}  # every node this Pipeline built or took from cache, in order
        if recipe.run.offline:
            go_offline()
        if recipe.run.threads:
            import torch

            torch.set_num_threads(recipe.run.threads)
        if distributed.launched():  # one of N processes of `accelerate launch -m redi.cli ...`: join them first
            distributed.init(auto_device(recipe.run.device))
        self.tracking = tracking.Tracking.from_recipe(recipe, self.run_dir())  # None when run.report_to is empty

    # ------------------------------------------------------------------ keys (no work done)
    @cached_property
    def _code(self) -> dict[str, str]:
        return {s: stage_code(s) for s in STAGE_MODULES}

    def refreshing(self, stage: str) -> bool:
        """Whether ``run.refresh`` asks to rebuild ``stage`` (``grade`` follows ``evaluate``)."""
        return stage in self.recipe.run.refresh or (stage == "grade" and "evaluate" in self.recipe.run.refresh)

    def _upstream(self, stage: str, label: str | None = None) -> dict[str, Any]:
        r = self.recipe
        if stage == "download":
            from .sources import get_source

            key_inputs = get_source(r.data.source).key_inputs
            return key_inputs(r.data) if key_inputs else {}
        if stage == "model":
            if r.model.base == "tiny":
                return {"download": self.key("download")}
            local = Path(r.model.base).expanduser()
            return {"local_model": self._local_fingerprint(local)} if local.exists() else {}
        if stage == "verify":
            return {"download": self.key("download"), "model": self.key("model"), "decontam": self._decontam_fingerprints()}
        if stage == "sft":
            return {"verify": self.key("verify"), "model": self.key("model")}
        if stage == "redi":
            return {"verify": self.key("verify"), "sft": self.key("sft")}
        if stage == "evaluate":
            assert label in MODEL_LABELS, label
            return {"model": self._model_key(label), "benchmarks": self._benchmark_fingerprints()}
        if stage == "grade":
            return {"evaluate": self.key("evaluate", label)}
        if stage == "curves":  # the points are keyed by content when built (redi.curves); this keys the stage
            from .curves import eval_config

            return {**{s: self.key(s) for s in r.evaluate.checkpoints.stages},
                    "benchmarks": self._benchmark_fingerprints(eval_config(r.evaluate))}
        raise ValueError(f"unknown stage {stage!r}")

    @staticmethod
    def _local_fingerprint(path: str | Path) -> str:
        """Content fingerprint of a local model folder (a changed file is a new key; missing: a stable marker)."""
        from .sources import input_fingerprint

        return input_fingerprint(path)

    def _config(self, stage: str) -> Any:
        r = self.recipe
        if stage == "grade":
            return {"grade_timeout_s": r.evaluate.grade_timeout_s, "pass_k": r.evaluate.pass_k}
        if stage == "curves":
            from .curves import curve_config

            return curve_config(r)
        section = getattr(r, dag.NODE[stage].section)
        if stage in ("verify", "sft", "redi"):  # they render training prompts
            return {**section.hash_fields(), "prompt": r.prompt.hash_fields()}
        return section.hash_fields()

    def key(self, stage: str, label: str | None = None) -> str:
        cache = self.__dict__.setdefault("_keys", {})
        if (stage, label) not in cache:
            cache[(stage, label)] = stage_key(stage, self._config(stage), self._upstream(stage, label), self._code[stage])
        return cache[(stage, label)]

    def _model_key(self, label: str) -> str:
        return self.key(LABEL_STAGE[label])

    def extra_benchmark_paths(self, ev: Any = None) -> dict[str, Path]:
        """The benchmark files of the download artifact (``BenchmarkSpec.from_download``: the synthetic source's
        held-out splits) that the evaluation wants; the download is cheap and built on demand.
        ``ev``: the evaluation config whose benchmarks are wanted (default: the recipe's)."""
        from .benchmarks import from_download

        wanted = set((ev or self.recipe.evaluate).benchmarks) & set(from_download(self.recipe.data.source))
        if not wanted:
            return {}
        data = self.download()
        return {name: data.dir / "benchmarks" / f"{name}.jsonl" for name in sorted(wanted)}

    def _benchmark_fingerprints(self, ev: Any = None) -> dict[str, str]:
        from . import benchmarks

        ev = ev or self.recipe.evaluate
        provided, out = benchmarks.from_download(self.recipe.data.source), {}
        for name in ev.benchmarks:
            if name in provided:
                out[name] = f"download:{self.key('download')}"  # content fixed by the download key
                continue
            try:
                out[name] = benchmarks.fingerprint(name, ev, {})
            except Exception as e:  # unreachable Hub, missing file: evaluation reports it; key stays stable
                out[name] = f"unavailable:{type(e).__name__}"
        return out

    def _decontam_fingerprints(self) -> dict[str, str]:
        if self.recipe.verify.decontaminate == "off":
            return {}
        from . import benchmarks

        out = {}
        for name in self.recipe.verify.decontam_benchmarks:
            try:
                out[name] = benchmarks.fingerprint(name, self.recipe.evaluate, {})
            except Exception as e:
                out[name] = f"unavailable:{type(e).__name__}"
        return out

    def plan(self) -> list[StagePlan]:
        """Every node the recipe's full run touches, with its key and whether a valid artifact is cached."""
        off = dag.disabled(self.recipe)
        nodes: list[tuple[str, str | None]] = [(s, None) for s in dag.TRAIN_STAGES if s not in off]
        for label in self.recipe.evaluate.models:
            nodes += [(dag.EVAL_STAGE, label), ("grade", label)]
        out = []
        for stage, label in nodes:
            k = self.key(stage, label)
            out.append(StagePlan(stage, label, k, str(self.store.dir(stage, k)), self.store.has(stage, k),
                                 {n: v for n, v in self._upstream(stage, label).items() if isinstance(v, str)}))
        return out

    # ------------------------------------------------------------------ stages
    def _build(self, stage: str, fn: Callable[[Path, Path], dict], label: str | None = None,
               extra_inputs: dict[str, Any] | None = None, collective: bool = False) -> Artifact:
        k = self.key(stage, label)
        t0 = time.time()
        inputs = {**self._upstream(stage, label), **(extra_inputs or {})}
        name = dag.node_name(stage, label)
        tracker = self.tracking.tracker(name, k) if self.tracking else None
        try:
            with tracking.activate(tracker):  # redi.train logs each step's signals to it (rank 0)
                art = self.store.build(stage, k, fn, config=self._config(stage), inputs=inputs,
                                       refresh=self.refreshing(stage), collective=collective)
        except BaseException:
            if tracker:
                tracker.close(failed=True)
            raise
        if tracker:
            self.tracking.finish_node(tracker, art, time.time() - t0)
        self.timings[name] = time.time() - t0
        self.nodes[name] = art
        log.info("%s %s: %s (%.1fs)", name, "cache hit" if art.cached else "built", art.path, self.timings[name])
        return art

    def download(self) -> Artifact:
        memo = self.__dict__.setdefault("_memo", {})
        if "download" not in memo:
            from . import data

            memo["download"] = self._build("download", lambda out, work: data.download(self.recipe.data, out, work=work))
        return memo["download"]

    def base_model(self, data: Artifact | None = None) -> Artifact:
        from . import tinymodel

        traces = None
        if self.recipe.model.base == "tiny":
            data = data or self.download()
            traces = data.file("traces.parquet")
        return self._build("model", lambda out, work: tinymodel.build_base_model(self.recipe.model, out, traces))

    def decontam_problems(self) -> dict[str, list[str]]:
        from . import benchmarks

        out: dict[str, list[str]] = {}
        skipped: dict[str, str] = {}
        for name in self.recipe.verify.decontam_benchmarks if self.recipe.verify.decontaminate != "off" else []:
            try:
                out[name] = [row["problem"] for row in benchmarks.load_benchmark(name, self.recipe.evaluate, {})]
            except Exception as e:
                skipped[name] = f"{type(e).__name__}: {' '.join(str(e).split())}"
                log.debug("decontamination: benchmark %s not available (%s)", name, skipped[name])
        if skipped:  # one line: offline runs skip most of them by design (each reason at debug level)
            first = next(iter(skipped.values()))
            log.warning("decontamination: %d of %d benchmarks not available here, skipped: %s (checked: %s; a local "
                        "copy under evaluate.benchmark_dir, or the Hub, makes them count; first reason: %s)",
                        len(skipped), len(skipped) + len(out), ", ".join(skipped), ", ".join(out) or "none",
                        first if len(first) <= 200 else f"{first[:100]} ... {first[-95:]}")  # the cause is often last
        return out

    def verify(self, data: Artifact | None = None, model: Artifact | None = None) -> Artifact:
        from . import verify as verify_stage

        data = data or self.download()
        model = model or self.base_model(data)

        def fn(out: Path, work: Path) -> dict:
            return verify_stage.verify_and_split(self.recipe.verify, data.file("traces.parquet"), model.dir, out, self.decontam_problems(),
                                          prompt_protocol=self.recipe.prompt.train, source=data.summary)

        return self._build("verify", fn)

    def _train(self, which: str, model_dir: Path, data: Path, out: Path, work: Path) -> dict:
        """Run a training stage here or under `accelerate launch` (redi.launch.train_stage)."""
        return launch.train_stage(self.recipe, which, model_dir, data, out, work)

    def _training(self, stage: str, fn: Callable[[Path, Path], dict]) -> Artifact:
        """A training stage: under a multi-process launch every rank runs ``fn`` (a collective build)."""
        return self._build(stage, fn, collective=distributed.launched())

    def sft(self, verify: Artifact | None = None, model: Artifact | None = None) -> Artifact:
        model = model or self.base_model()
        verify = verify or self.verify(model=model)
        return self._training("sft", lambda out, work: self._train("sft", model.dir, verify.file("positives.parquet"), out, work))

    def stage2(self, verify: Artifact | None = None, sft: Artifact | None = None) -> Artifact:
        verify = verify or self.verify()
        sft = sft or self.sft(verify=verify)
        return self._training("redi", lambda out, work: self._train("stage2", sft.file("model"), verify.file("pairs.parquet"), out, work))

    def curves(self, sft: Artifact | None = None, redi: Artifact | None = None) -> Artifact:
        """Evaluate the models the training stages kept (``evaluate.checkpoints``) and draw the curves (redi.curves)."""
        from . import curves

        sft = sft or self.sft()
        redi = redi or self.stage2(sft=sft)
        rows, counts = [], {}
        if self.refreshing("curves") or self.store.lookup("curves", self.key("curves")) is None:
            rows, counts = curves.evaluate_curves(self, {"sft": sft, "redi": redi})  # every rank: top-level builds
        return self._build("curves", lambda out, work: curves.build_curves(self, rows, counts, out))

    def model_dir(self, label: str, art: Artifact) -> Path:
        return art.dir if label == "base" else art.file("model")

    def model_artifact(self, label: str) -> Artifact:
        """The artifact of the stage that produces the model evaluated under ``label`` (built or from cache)."""
        return getattr(self, dag.NODE[LABEL_STAGE[label]].builder)()

    def evaluate(self, label: str, model: Artifact | None = None) -> Artifact:
        """Generate and grade on every benchmark of the recipe; then ``grade`` re-grades if the grader changed."""
        from . import evaluate as ev

        model = model or self.model_artifact(label)
        extra = self.extra_benchmark_paths()
        gen = self._build("evaluate", lambda out, work: ev.evaluate_model(
            self.recipe.evaluate, self.model_dir(label, model), out, extra, label, work=work), label,
            extra_inputs={"grader_code": self._code["grade"], "model_dir": str(self.model_dir(label, model))})
        return self.grade(label, gen)

    def grade(self, label: str, gen: Artifact) -> Artifact:
        """Metrics under the current grader: copied when the evaluation already used it, else re-graded."""
        from . import evaluate as ev

        def fn(out: Path, work: Path) -> dict:
            if gen.manifest.get("inputs", {}).get("grader_code") == self._code["grade"]:
                shutil.copy(gen.file("metrics.json"), out / "metrics.json")
                return json.loads((out / "metrics.json").read_text())
            return ev.regrade(gen.file("samples.parquet"), self.recipe.evaluate, out)

        return self._build("grade", fn, label)

    # ------------------------------------------------------------------ whole run
    def build_node(self, node: dag.Node, upstream: list[Artifact], label: str | None = None) -> Artifact:
        """Build (or take from cache) one node of ``redi.dag.NODES`` from its upstream artifacts: the walker's step."""
        builder = getattr(self, node.builder)
        return builder(label, *upstream) if node.per_label else builder(*upstream)

    def run_until(self, until: str = "report", labels: list[str] | tuple[str, ...] | None = None,
                  register: bool = False) -> dict[str, Any]:
        """Run the DAG up to ``until`` (a stage, or ``report``) with ``redi.dag.walk``.

        ``evaluate`` and ``report`` also evaluate ``labels`` (default: the recipe's ``evaluate.models``)
        and report them; ``report`` always registers the run, ``evaluate`` only with ``register``.
        Returns ``{"stages": {stage: Artifact}, "grades": {label: Artifact}, "report": ... or None}``;
        ``self.nodes`` holds every node built or taken from cache, ``evaluate[*]`` included.
        """
        labels = list(labels or self.recipe.evaluate.models)
        stages, grades = dag.walk(until, labels, self.build_node, skip=dag.disabled(self.recipe))
        report = None
        if grades:
            report = self.report({lab: stages[LABEL_STAGE[lab]] for lab in grades}, grades,
                                 register=register or until == "report")
        return {"stages": stages, "grades": grades, "report": report}

    def run(self, labels: tuple[str, ...] | None = None) -> dict[str, Any]:
        """The full DAG, reported and registered. Returns {stage: Artifact, "grades": {label: Artifact}, "report": ...}."""
        check_inputs(self.recipe)
        t0 = time.time()
        out = self.run_until("report", labels)
        out["report"]["seconds"] = round(time.time() - t0, 1)
        return {**out["stages"], "grades": out["grades"], "report": out["report"]}

    # ------------------------------------------------------------------ report
    def run_dir(self) -> Path:
        return self.store.root / "runs" / self.recipe.run.name

    def results_path(self) -> Path:
        return Path(self.recipe.run.results_db) if self.recipe.run.results_db else self.store.root / "results"

    def result_label(self, label: str) -> str:
        """The name a model's results are reported under: the stage-2 model by its objective (``redi``, ``dpo``,
        ``simpo``, ...: what produced it), every other model by its DAG label (``base``, ``sft``)."""
        return self.recipe.redi.loss if LABEL_STAGE[label] == "redi" else label

    def recipe_hash(self) -> str:
        tree = self.recipe.model_dump(mode="json")
        tree["run"].pop("cache_dir", None)  # where this machine caches a URL root, not what the run is
        tree["run"].pop("max_parallel", None)  # how the flow schedules the nodes, not what the run is
        for where in ("report_to", "tracking_dir"):  # where the run is logged, not what it is
            tree["run"].pop(where, None)
        return hash_obj(tree)

    def report(self, models: dict[str, Artifact], grades: dict[str, Artifact], register: bool = False) -> dict[str, Any]:
        """Record the run's results and write its table and plot; ``register`` also registers it for nightly
        evaluation (redi.report.report)."""
        from .report import report

        return report(self, models, grades, register)
