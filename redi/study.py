"""The CPU-scale study: from one SFT checkpoint at its validation plateau, does REDI beat
continued SFT, DPO and SimPO?

Built on :class:`redi.pipeline.Pipeline` and the stage entry points, never around them:

1. ``download`` / ``model`` / ``verify`` come from the Pipeline (same keys as ``redi run``).
2. **SFT to plateau.** SFT runs in rounds of ``study.sft_round_epochs`` through ``redi.train.train_sft``;
   round 1 starts from the base model (its artifact *is* the Pipeline's ``sft`` artifact when
   ``sft.epochs`` equals the round length), round r from round r-1's model folder. Each round is its
   own ``sft`` artifact keyed on the previous round's key. After each round the model is evaluated on
   the validation split (``demo_val``); :func:`plateau_decision` stops when ``patience`` rounds in a
   row fail to beat the best round by more than noise. The best round is the stage-2 start.
3. **Search on validation.** Every method's grid (lr, and alpha / beta / gamma where they apply) is
   trained from that checkpoint with ``study.search_seed`` and scored on ``demo_val``. The best point
   by validation pass@1 is the method's setting; the test split is never looked at here.
4. **Final runs on test.** Each final method at its chosen setting, over ``study.seeds``, evaluated on
   ``demo_test`` with ``study.test_n_samples`` (16) samples per problem. The search's seed-0 model is
   the same artifact as the final seed-0 model (same key), so it trains once.
5. **Report.** Table 2-style results (mean pass@1 +- SEM over seeds, pass@16), the search table, the
   SFT curve, training-signal plots per method and where the collapse signal fired.

Every trained model is a ``sft`` or ``redi`` artifact and every evaluation an ``evaluate`` artifact of
the Pipeline's store, keyed by (config fields, upstream artifact keys, code version): a change to one
method's grid or to the DPO loss reruns only the points it determines.

Departures from the paper, all forced by scale and stated in docs/study.md:
- "none" (the paper's SFT-only row) is SFT continued from the same checkpoint for the same number of
  optimiser steps as stage 2, with stage 2's batch size and schedule, on the positive traces.
- SFT rounds restart the optimiser and the lr schedule (warm restarts): the trainer has no
  "continue from checkpoint with optimiser state" entry point; the round seed advances so each round
  sees a fresh shuffle.
- Stage-2 hyper-parameters are searched per method on validation (the paper reports tuned settings).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from .artifacts import Artifact, code_version, hash_obj, stage_key
from .config import EvaluateConfig, Recipe, RecipeError, SFTConfig, Stage2Config, apply_overrides, load_recipe
from .config.base import StrictModel
from .losses import OBJECTIVES
from .pipeline import Pipeline, auto_device, stage_code

log = logging.getLogger(__name__)

CONTINUED_SFT = "sft"  # the `none` row: SFT continued on the positives (not a stage-2 objective)


def method_fields() -> dict[str, set[str]]:
    """Fields a method may set or search, per loss: each objective's ``search`` (redi.losses.OBJECTIVES), and lr for continued SFT."""
    return {CONTINUED_SFT: {"lr"}, **{name: set(o.search) for name, o in OBJECTIVES.items()}}


# ---------------------------------------------------------------------------------------- config
class MethodSpec(StrictModel):
    """One stage-2 method of the study: an objective, fixed fields and a grid searched on validation."""

    name: str = Field(..., min_length=1, description="Row label, e.g. `redi`, `redi-sym`, `dpo`, `simpo`, `none`.")
    loss: str = Field(..., description="`sft` = continued SFT on positives (the `none` row); else a stage-2 objective of "
                      "redi.losses.OBJECTIVES (redi, dpo, simpo, ...).")
    fixed: dict[str, float] = Field(default_factory=dict, description="Fields set for every point, e.g. {alpha: 0.8}.")
    grid: dict[str, list[float]] = Field(default_factory=dict, description="Fields searched on validation (cartesian product), e.g. {lr: [1e-5, 1e-4]}.")
    final: bool = Field(True, description="Run on test over all seeds (false: a validation-only probe, e.g. an alpha sweep).")

    @model_validator(mode="after")
    def _fields(self) -> MethodSpec:
        allowed = method_fields()
        if self.loss not in allowed:
            raise ValueError(f"method {self.name!r}: unknown loss {self.loss!r}; valid: {', '.join(allowed)}")
        bad = (set(self.fixed) | set(self.grid)) - allowed[self.loss]
        if bad:
            raise ValueError(f"method {self.name!r} (loss {self.loss}): {sorted(bad)} not searchable; valid: {sorted(allowed[self.loss])}")
        if set(self.fixed) & set(self.grid):
            raise ValueError(f"method {self.name!r}: {sorted(set(self.fixed) & set(self.grid))} both fixed and searched")
        if any(not v for v in self.grid.values()):
            raise ValueError(f"method {self.name!r}: every grid list needs at least one value")
        return self

    def points(self) -> list[dict[str, float]]:
        """Every grid point (fixed fields included), in grid order."""
        keys = list(self.grid)
        return [{**self.fixed, **dict(zip(keys, vals, strict=True))} for vals in itertools.product(*(self.grid[k] for k in keys))]


def _default_methods() -> list[MethodSpec]:
    lrs = [1e-5, 1e-4, 1e-3]
    return [
        MethodSpec(name="none", loss="sft", grid={"lr": lrs}),
        MethodSpec(name="dpo", loss="dpo", fixed={"beta": 0.1}, grid={"lr": lrs}),
        MethodSpec(name="simpo", loss="simpo", fixed={"beta": 2.0, "gamma": 1.0}, grid={"lr": lrs}),
        MethodSpec(name="redi-sym", loss="redi", fixed={"alpha": 1.0}, grid={"lr": lrs}),
        MethodSpec(name="redi", loss="redi", fixed={"alpha": 0.8}, grid={"lr": lrs}),
    ]


class StudyConfig(StrictModel):
    """The study's own settings (``study.yaml`` beside the recipe); the recipe supplies every stage's defaults."""

    methods: list[MethodSpec] = Field(default_factory=_default_methods, description="Stage-2 methods with their validation grids.")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], description="Training seeds of the final runs (mean and SEM over them).")
    search_seed: int = Field(0, description="Training seed of the validation search.")
    sft_round_epochs: float = Field(1.0, gt=0, description="SFT epochs per round; validation after each round.")
    sft_max_rounds: int = Field(8, ge=1, description="Stop SFT after this many rounds even if still improving (reported).")
    plateau_patience: int = Field(1, ge=1, description="Rounds in a row without a significant gain before SFT stops.")
    plateau_z: float = Field(1.0, ge=0, description="A gain is significant when it exceeds z x the combined standard error of the two rounds.")
    plateau_min_delta: float = Field(0.0, ge=0, description="...and exceeds this absolute pass@1 gain.")
    plateau_floor: float = Field(0.0, ge=0, le=1, description="Rounds count towards the plateau only once val pass@1 has reached this: "
                                 "a curve flat at the floor is a model that has not started to solve problems, not a plateau.")
    val_benchmark: str = Field("demo_val", description="Validation split (plateau detection and the search).")
    test_benchmark: str = Field("demo_test", description="Held-out test split (final table only).")
    val_n_samples: int = Field(4, ge=1, description="Samples per validation problem.")
    test_n_samples: int = Field(16, ge=1, description="Samples per test problem (paper: 16).")
    val_max_problems: int | None = Field(None, ge=1, description="Evaluate only the first N validation problems.")
    test_max_problems: int | None = Field(None, ge=1, description="Evaluate only the first N test problems.")
    stage2_steps: int | None = Field(None, ge=1, description="Optimiser steps of every stage-2 run (and of `none`); None = redi.epochs over the pairs.")

    @model_validator(mode="after")
    def _names(self) -> StudyConfig:
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names):
            raise ValueError(f"study.methods: duplicate names {names}")
        if not self.seeds:
            raise ValueError("study.seeds must list at least one seed")
        return self


def load_study(path: str | Path, overrides: list[str] | None = None) -> tuple[Recipe, StudyConfig]:
    """``path``: a folder with ``recipe.yaml`` and ``study.yaml`` (or the recipe file, study.yaml beside it).

    ``study.x=v`` overrides go to the study config, every other override to the recipe.
    """
    p = Path(path)
    recipe_path = p / "recipe.yaml" if p.is_dir() else p
    study_path = recipe_path.parent / "study.yaml"
    ov = list(overrides or [])
    study_ov = [o[len("study."):] for o in ov if o.startswith("study.")]
    recipe = load_recipe(recipe_path, [o for o in ov if not o.startswith("study.")])
    tree = (yaml.safe_load(study_path.read_text()) or {}) if study_path.exists() else {}
    if study_ov:
        apply_overrides(tree, study_ov)
    try:
        return recipe, StudyConfig.model_validate(tree)
    except ValidationError as e:
        lines = [f"invalid study config ({study_path}):"]
        lines += [f"  study.{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise RecipeError("\n".join(lines)) from None


# ---------------------------------------------------------------------------------------- pure logic
def standard_error(pass1: float, sem: float, n_total: int) -> float:
    """Noise of a pass@1 estimate: the larger of the paper's sample-index SEM and the binomial SE.

    The sample-index SEM rests on only n (e.g. 4) scores and is itself noisy; the binomial SE over all
    P x n samples is a floor (it ignores that samples of one problem are correlated).
    """
    binom = math.sqrt(max(pass1 * (1 - pass1), 0.0) / n_total) if n_total else 0.0
    return max(sem, binom)


@dataclass
class PlateauDecision:
    stop: bool
    best_round: int  # 1-based
    reason: str


def plateau_decision(curve: list[dict[str, float]], patience: int = 1, z: float = 1.0, min_delta: float = 0.0,
                     max_rounds: int | None = None, floor: float = 0.0) -> PlateauDecision:
    """Should SFT stop after the rounds in ``curve`` (each ``{"pass@1": p, "se": s}``, round 1 first)?

    The reference is the last round that beat the previous reference by more than noise
    (``max(min_delta, z * sqrt(se_ref^2 + se_new^2))``). Stop once ``patience`` rounds in a row fail to
    do so, or at ``max_rounds``. Rounds before the first one at or above ``floor`` never count (the
    reference moves to the first round that reaches it). The returned best round is the argmax of pass@1 (earliest on ties):
    the checkpoint stage 2 starts from.
    """
    if not curve:
        raise ValueError("plateau_decision needs at least one evaluated round")
    ref, since = 0, 0
    for i in range(1, len(curve)):
        if curve[ref]["pass@1"] < floor:  # still at the floor: nothing is a plateau yet
            ref, since = i, 0
            continue
        gain = curve[i]["pass@1"] - curve[ref]["pass@1"]
        noise = max(min_delta, z * math.hypot(curve[ref]["se"], curve[i]["se"]))
        if gain > noise:
            ref, since = i, 0
        else:
            since += 1
    best = max(range(len(curve)), key=lambda i: (curve[i]["pass@1"], -i)) + 1
    if curve[ref]["pass@1"] < floor:
        if max_rounds is not None and len(curve) >= max_rounds:
            return PlateauDecision(True, best, f"max_rounds={max_rounds} reached below the floor {floor:g} (no plateau)")
        return PlateauDecision(False, best, f"val pass@1 below the floor {floor:g}; continuing")
    if since >= patience:
        return PlateauDecision(True, best, f"{since} round(s) without a gain above noise since round {ref + 1}")
    if max_rounds is not None and len(curve) >= max_rounds:
        return PlateauDecision(True, best, f"max_rounds={max_rounds} reached while still improving (no plateau)")
    return PlateauDecision(False, best, f"round {ref + 1} improved significantly; continuing")


def select_best(rows: list[dict[str, Any]], metric: str = "val_pass@1") -> dict[str, Any]:
    """The search row with the highest validation score (first in grid order on ties)."""
    if not rows:
        raise ValueError("select_best: no search rows")
    return max(enumerate(rows), key=lambda ir: (ir[1][metric], -ir[0]))[1]


def seed_stats(values: list[float]) -> tuple[float, float]:
    """(mean, SEM) over seeds; SEM = std(ddof=1) / sqrt(k), 0 for a single seed."""
    k = len(values)
    if k == 0:
        return float("nan"), float("nan")
    mean = sum(values) / k
    if k == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (k - 1)
    return mean, math.sqrt(var / k)


def collapse_check(signals: list[dict[str, Any]], threshold: float) -> dict[str, Any]:
    """Where the trainer's collapse warning fired (``collapsed`` in its signals: the chosen per-token log-prob
    below ``collapse_threshold`` from a start above it, or ``collapse_drop`` below its own start; see
    ``redi.signals``). Signals without the flag fall back to the absolute threshold from a start above it.
    Returns the first flagged step and the start / final / minimum chosen log-prob.
    """
    pts = [(s.get("step"), s["chosen_logp"], s.get("collapsed")) for s in signals if s.get("chosen_logp") is not None]
    if not pts:
        return {"fired": False, "first_step": None, "start_below": False, "start": None, "final": None, "min": None}
    vals = [v for _, v, _ in pts]
    start_below = vals[0] < threshold
    if any(f is not None for _, _, f in pts):
        first = next((st for st, _, f in pts if f), None)
    else:
        first = None if start_below else next((st for st, v, _ in pts if v < threshold), None)
    return {"fired": first is not None, "first_step": first, "start_below": start_below, "start": vals[0],
            "final": vals[-1], "min": min(vals)}


SIGNAL_FIELDS = ("chosen_logp", "rejected_logp", "update_norm", "loss", "lr", "collapsed")
"""The fields of the trainer's signals.jsonl records (redi.signals) the study reads."""


def read_signals(path: Path) -> list[dict[str, Any]]:
    """The step records of the trainer's ``signals.jsonl``, reduced to ``step`` and ``SIGNAL_FIELDS``."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{"step": row["step"], **{k: row.get(k) for k in SIGNAL_FIELDS}} for row in rows]


# ---------------------------------------------------------------------------------------- results
@dataclass
class EvalResult:
    """One evaluation of one model on one split."""

    split: str
    key: str
    path: str
    pass1: float
    se: float
    sem: float
    pass_n: float
    n_samples: int
    no_answer: float
    cached: bool
    seconds: float

    @classmethod
    def from_metrics(cls, split: str, art: Artifact, bench: str) -> EvalResult:
        m = json.loads(art.file("metrics.json").read_text())
        b = m.get(bench) or m.get("benchmarks", {}).get(bench)
        if b is None:
            raise KeyError(f"metrics.json of {art.path} has no benchmark {bench!r} (keys: {sorted(m)})")
        n = int(b["n_samples"])
        return cls(split, art.key, art.path, float(b["pass@1"]), standard_error(b["pass@1"], b["pass@1_sem"], b["n_total"]),
                   float(b["pass@1_sem"]), float(b.get(f"pass@{n}", b["pass@1"])), n,
                   float(b.get("no_answer_share", 0.0)), art.cached, _build_seconds(art))


@dataclass
class PointResult:
    """One trained stage-2 model (method, setting, seed) and its evaluation."""

    method: str
    loss: str
    params: dict[str, float]
    seed: int
    model_key: str
    model_stage: str
    model_path: str
    train_cached: bool
    train_seconds: float
    collapse: dict[str, Any]
    eval: EvalResult
    trainer_summary: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        return {"method": self.method, "loss": self.loss, **{k: v for k, v in self.params.items()}, "seed": self.seed,
                f"{self.eval.split}_pass@1": self.eval.pass1, f"{self.eval.split}_se": self.eval.se,
                f"{self.eval.split}_pass@{self.eval.n_samples}": self.eval.pass_n, "no_answer": self.eval.no_answer,
                "collapse": self.collapse["fired"], "collapse_step": self.collapse["first_step"],
                "chosen_logp_start": self.collapse["start"], "chosen_logp_final": self.collapse["final"],
                "train_s": self.train_seconds, "eval_s": self.eval.seconds, "model_key": self.model_key}


# ---------------------------------------------------------------------------------------- the runner
class Study:
    """Runs the study against one Pipeline (same store, same stage entry points, keys chained on artifacts)."""

    def __init__(self, recipe: Recipe, cfg: StudyConfig, pipeline: Pipeline | None = None):
        self.recipe, self.cfg = recipe, cfg
        self.pipe = pipeline or Pipeline(recipe)
        self.store = self.pipe.store
        self.device = auto_device(recipe.run.device)
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
        from . import benchmarks
        from . import evaluate as ev

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
        """
        from . import train

        start_dir = start.dir if start.stage == "model" else start.file("model")
        if stage == "redi":
            upstream = {"verify": verify.key, "sft": start.key}
        else:
            upstream = {"verify": verify.key, "model": start.key if start.stage == "model" else f"{start.stage}:{start.key}"}
        key = stage_key(stage, cfg.hash_fields(), upstream, self.codes[stage])
        if stage == "sft":
            def fn(out: Path, work: Path) -> dict:
                return train.train_sft(cfg, start_dir, verify.file("positives.parquet"), out, work, self.device)
        else:
            def fn(out: Path, work: Path) -> dict:
                return train.train_stage2(cfg, start_dir, verify.file("pairs.parquet"), out, work, self.device)
        return self.store.build(stage, key, fn, config=cfg.hash_fields(), inputs={**upstream, "start_dir": str(start_dir)},
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
               "no_answer": ev.no_answer, "train_s": _build_seconds(art), "eval_s": ev.seconds}
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
        cfg = self.point_config(method, params, seed, self.stage2_steps(base["verify"]))
        stage = "sft" if method.loss == CONTINUED_SFT else "redi"
        art = self._train(stage, cfg, start, base["verify"])
        train_s = _build_seconds(art)
        signals = read_signals(art.dir / "signals.jsonl")
        collapse = collapse_check(signals, self.recipe.redi.collapse_threshold)
        label = f"{method.name}[{','.join(f'{k}={v:g}' for k, v in params.items())}]-s{seed}"
        ev = self.evaluate(art, split, base["download"], label)
        if collapse["fired"]:
            log.warning("collapse warning: %s chosen log-prob/token %.3f -> %.3f, flagged from step %s", label,
                        collapse["start"], collapse["final"], collapse["first_step"])
        return PointResult(method.name, method.loss, params, seed, art.key, stage, art.path, art.cached, train_s,
                           collapse, ev, {k: v for k, v in art.summary.items() if not isinstance(v, (list, dict))})

    def search(self, method: MethodSpec, base: dict[str, Artifact], start: Artifact) -> list[PointResult]:
        return [self.point(method, p, self.cfg.search_seed, "val", base, start) for p in method.points()]

    def final(self, method: MethodSpec, params: dict[str, float], base: dict[str, Artifact], start: Artifact) -> list[PointResult]:
        return [self.point(method, params, s, "test", base, start) for s in self.cfg.seeds]

    # -------------------------------------------------------------- whole study
    def run(self, out_dir: Path | None = None) -> dict[str, Any]:
        """The whole study in this process (the Prefect flow runs the same steps as tasks)."""
        t0 = time.time()
        base = self.base()
        sft = self.sft_to_plateau(base)
        start = sft["start"]
        sft_test = self.evaluate(start, "test", base["download"], "sft-plateau")
        search = {m.name: self.search(m, base, start) for m in self.cfg.methods}
        chosen = {m.name: choose(m, [p.row() for p in search[m.name]]) for m in self.cfg.methods}
        final = {m.name: self.final(m, chosen[m.name], base, start) for m in self.cfg.methods if m.final}
        result = self.assemble(base, sft, sft_test, search, final, wall_s=time.time() - t0)
        return self.report(result, out_dir)

    def assemble(self, base: dict[str, Artifact], sft: dict[str, Any], sft_test: EvalResult,
                 search: dict[str, list[PointResult]], final: dict[str, list[PointResult]], wall_s: float) -> StudyResult:
        points = [p for v in [*search.values(), *final.values()] for p in v]
        signals = {f"{p.method}|{_pstr(p.params)}|{p.seed}": read_signals(Path(p.model_path) / "signals.jsonl") for p in points}
        build_s = {"sft_rounds_train": sum(c["train_s"] for c in sft["curve"]), "sft_rounds_eval": sum(c["eval_s"] for c in sft["curve"]),
                   "stage2_train": sum({p.model_key: p.train_seconds for p in points}.values()),
                   "stage2_eval": sum(p.eval.seconds for p in points) + sft_test.seconds}
        build_s["total_compute"] = sum(build_s.values())
        return StudyResult(
            sft_curve=sft["curve"], sft_best_round=sft["best_round"], sft_reason=sft["reason"], sft_plateaued=sft["plateaued"],
            sft_key=sft["start"].key, sft_test=asdict(sft_test),
            search={k: [p.row() for p in v] for k, v in search.items()},
            chosen={m.name: choose(m, [p.row() for p in search[m.name]]) for m in self.cfg.methods if m.name in search},
            final={k: [p.row() for p in v] for k, v in final.items()}, signals=signals,
            timings={"wall_this_invocation": round(wall_s, 1), **{k: round(v, 1) for k, v in build_s.items()}},
            stage2_steps=self.stage2_steps(base["verify"]), collapse_threshold=self.recipe.redi.collapse_threshold,
            collapse_drop=self.recipe.redi.collapse_drop,
            test_n_samples=self.cfg.test_n_samples, search_seed=self.cfg.search_seed)

    def report(self, result: StudyResult, out_dir: Path | None = None) -> dict[str, Any]:
        """The report as a ``study`` artifact of the store (keyed by every input key), mirrored to ``out_dir``
        (default ``<artifact_root>/runs/<run.name>/study``)."""
        import shutil

        d = asdict(result)
        key = stage_key("study", self.cfg.model_dump(mode="json"),
                        {"sft": result.sft_key, "points": sorted(r["model_key"] for v in [*d["search"].values(), *d["final"].values()] for r in v)},
                        code_version(["redi.study"]))
        art = self.store.build("study", key, lambda out, work: _summary(write_report(result, out)), config=self.cfg.model_dump(mode="json"),
                               inputs={"sft": result.sft_key})
        dest = Path(out_dir) if out_dir else self.pipe.run_dir() / "study"
        shutil.copytree(art.dir, dest, dirs_exist_ok=True)
        summary = json.loads((art.dir / "summary.json").read_text())
        return {**summary, "artifact": art.path, "out_dir": str(dest)}


def _summary(rep: dict[str, Any]) -> dict[str, Any]:
    Path(rep["out_dir"], "summary.json").write_text(json.dumps(rep, indent=1, default=str))
    return {k: v for k, v in rep.items() if k != "table"}


def _build_seconds(art: Artifact) -> float:
    """How long the artifact took to build (from its manifest, so a cache hit reports the original cost)."""
    return round(float(art.manifest.get("seconds", 0.0)), 1)


def sft_summary(curve: list[dict[str, Any]], decision: PlateauDecision, start: Artifact) -> dict[str, Any]:
    return {"curve": curve, "best_round": decision.best_round, "reason": decision.reason, "start": start,
            "plateaued": "max_rounds" not in decision.reason}


def choose(method: MethodSpec, rows: list[dict[str, Any]]) -> dict[str, float]:
    """The method's setting picked on validation (its grid point with the best val pass@1)."""
    best = select_best(rows, "val_pass@1")
    return {k: best[k] for k in method.points()[0]}


def _pstr(params: dict[str, float]) -> str:
    return ",".join(f"{k}={v:g}" for k, v in params.items())


@dataclass
class StudyResult:
    """Everything the report needs (JSON-able)."""

    sft_curve: list[dict[str, Any]]
    sft_best_round: int
    sft_reason: str
    sft_plateaued: bool
    sft_key: str
    sft_test: dict[str, Any]
    search: dict[str, list[dict[str, Any]]]
    chosen: dict[str, dict[str, float]]
    final: dict[str, list[dict[str, Any]]]
    signals: dict[str, list[dict[str, Any]]]
    timings: dict[str, float]
    stage2_steps: int
    collapse_threshold: float
    test_n_samples: int
    search_seed: int = 0
    collapse_drop: float | None = None


# ---------------------------------------------------------------------------------------- tables and plots
def final_table(final: dict[str, list[dict[str, Any]]], sft_test: dict[str, Any], n: int, chosen: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Table 2 rows: mean pass@1 and SEM over seeds, mean pass@n, no-answer share, collapse count."""
    rows = [{"method": "SFT start (plateau)", "setting": "", "seeds": 1, "pass@1": sft_test["pass1"], "sem": sft_test["sem"],
             f"pass@{n}": sft_test["pass_n"], "no_answer": sft_test["no_answer"], "collapsed": "", "per_seed": ""}]
    for name, runs in final.items():
        p1 = [r["test_pass@1"] for r in runs]
        mean, sem = seed_stats(p1)
        pn = seed_stats([r.get(f"test_pass@{n}", float("nan")) for r in runs])[0]
        rows.append({"method": name, "setting": _pstr(chosen.get(name, {})), "seeds": len(runs), "pass@1": mean, "sem": sem,
                     f"pass@{n}": pn, "no_answer": seed_stats([r["no_answer"] for r in runs])[0],
                     "collapsed": f"{sum(bool(r['collapse']) for r in runs)}/{len(runs)}",
                     "per_seed": " ".join(f"{100 * x:.1f}" for x in p1)})
    return rows


def markdown_table(rows: list[dict[str, Any]], pct: tuple[str, ...] = ()) -> str:
    if not rows:
        return "(no rows)\n"
    cols = list(dict.fromkeys(k for r in rows for k in r))

    def fmt(k: str, v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        if k in pct and isinstance(v, (int, float)) and not isinstance(v, bool):
            return f"{100 * v:.1f}"
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(c, r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _plot_signals(result: StudyResult, method: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5), sharex=True)
    panels = [("chosen_logp", "chosen log-prob / token"), ("rejected_logp", "rejected log-prob / token"), ("update_norm", "update norm")]
    chosen = _pstr(result.chosen.get(method, {}))
    settings = {_pstr({k: r[k] for k in result.chosen.get(method, {})}) for r in result.search.get(method, [])}
    keys = [k.split("|") for k in result.signals if k.split("|")[0] == method]
    final = method in result.final
    groups = [(0, f"validation search (seed {result.search_seed})", [k for k in keys if k[1] in settings and int(k[2]) == result.search_seed]),
              (1, f"final runs ({chosen})" if final else "no final runs (validation-only probe)", [k for k in keys if final and k[1] == chosen])]
    for row, title, keys in groups:
        for col, (sig, ylabel) in enumerate(panels):
            ax = axes[row, col]
            for _, setting, seed in keys:
                pts = [(s["step"], s[sig]) for s in result.signals["|".join((method, setting, seed))] if s.get(sig) is not None]
                if pts:
                    ax.plot(*zip(*pts, strict=True), label=(setting if row == 0 else f"seed {seed}"), lw=1)
            if sig == "chosen_logp":
                ax.axhline(result.collapse_threshold, color="red", ls="--", lw=0.8)
            ax.set_title(f"{ylabel} - {title}", fontsize=8)
            if sig != "update_norm":  # log-probs span -0.03 (confident) to -3 (collapsed): log scale, plain labels
                ax.set_yscale("symlog", linthresh=0.01)
                ax.set_yticks([-3, -1, -0.3, -0.1, -0.03, -0.01])
                ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
                ax.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            if col == 0 and ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6)
    for ax in axes[1]:
        ax.set_xlabel("step")
    fig.suptitle(f"{method}: training signals (red dashed: collapse threshold {result.collapse_threshold})")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_curve(result: StudyResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = [c["round"] for c in result.sft_curve]
    ax.errorbar(xs, [100 * c["pass@1"] for c in result.sft_curve], yerr=[100 * c["se"] for c in result.sft_curve], marker="o", capsize=3)
    ax.axvline(result.sft_best_round, color="green", ls="--", lw=0.8, label="stage-2 start")
    ax.set_xlabel("SFT round")
    ax.set_ylabel("val pass@1 (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _hp(r: dict[str, Any]) -> str:
    keys = dict.fromkeys(f for fields in method_fields().values() for f in sorted(fields))
    return _pstr({k: r[k] for k in keys if k in r and r[k] is not None and r[k] == r[k]})


def write_report(result: StudyResult, out: Path) -> dict[str, Any]:
    """results.md/.csv (Table 2), search.md/.csv, sft_curve.csv/.png, signals_<method>.png, study.json."""
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    n = result.test_n_samples
    table = final_table(result.final, result.sft_test, n, result.chosen)
    search_rows = [r for rows in result.search.values() for r in rows]
    pd.DataFrame(table).to_csv(out / "results.csv", index=False)
    pd.DataFrame(search_rows).to_csv(out / "search.csv", index=False)
    pd.DataFrame(result.sft_curve).to_csv(out / "sft_curve.csv", index=False)
    pct = ("pass@1", "sem", f"pass@{n}", "no_answer", "val_pass@1", "val_se",
           *{k for r in search_rows for k in r if k.startswith(("val_pass@", "test_pass@"))})
    collapses = [r for r in search_rows + [r for v in result.final.values() for r in v] if r["collapse"]]
    md = ["# CPU study results", "",
          f"Test split, {n} samples per problem; mean over seeds, SEM = std/sqrt(seeds). Stage 2: {result.stage2_steps} steps.", "",
          markdown_table(table, ("pass@1", "sem", f"pass@{n}", "no_answer")),
          "## SFT to plateau (validation)", "", f"Start = round {result.sft_best_round}: {result.sft_reason}.", "",
          markdown_table(result.sft_curve, ("pass@1", "se", "no_answer")),
          "## Validation search", "", markdown_table(search_rows, pct),
          "## Chosen settings", "", *[f"- {m}: {_pstr(p)}" for m, p in result.chosen.items()], "",
          f"## Collapse warning (the trainer's: chosen log-prob/token < {result.collapse_threshold} from a start above it, "
          f"or {result.collapse_drop} below the run's start)", ""]
    md += [f"- {r['method']} {_hp(r)} seed {r['seed']}: step {r['collapse_step']}, final {r['chosen_logp_final']:.3g}"
           for r in collapses] or ["- never fired"]
    md += ["", "## Timings (s)", "", *[f"- {k}: {v}" for k, v in result.timings.items()], ""]
    (out / "results.md").write_text("\n".join(md))
    (out / "study.json").write_text(json.dumps(asdict(result), indent=1, default=str))
    _plot_curve(result, out / "sft_curve.png")
    plots = []
    for m in result.search:
        p = out / f"signals_{m}.png"
        _plot_signals(result, m, p)
        plots.append(str(p))
    return {"out_dir": str(out), "table": table, "table_markdown": markdown_table(table, ("pass@1", "sem", f"pass@{n}", "no_answer")),
            "chosen": result.chosen, "timings": result.timings, "plots": plots, "collapses": len(collapses),
            "key": hash_obj(asdict(result)["final"])}


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


if __name__ == "__main__":
    raise SystemExit(main())
