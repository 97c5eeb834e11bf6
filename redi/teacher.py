"""The ``generate`` data source: traces sampled from a model, graded with the project's grader, as download rows.

``data.source: generate`` with ``data.generate`` (redi.config.teacher.GenerateConfig) samples ``n`` traces per
problem from any model through the evaluation sampler (:mod:`redi.generate`: vLLM engines in child processes,
or the transformers fallback, chosen by ``backend`` as ``evaluate.backend``), grades every trace with
``redi.grader.grade`` in the grading pool while the engine generates, and yields one Open-R1-Math-220k-shaped
row per problem (``generations``, ``finish_reasons``, ``correctness_math_verify`` = our grade, None where the
grader timed out). The normaliser (:mod:`redi.data`) turns those rows into trace rows like every other source's,
so verify and everything after it run unchanged.

The model (``data.generate.model``):

- a local model folder (any store artifact's model folder too): keyed by its content
  (``redi.runs.model_fingerprint``: the manifest checksums of a store artifact, else a sha256 of its files);
- a registered run's folder ``<artifact_root>/runs/<name>`` (``latest.json``, written by the ``report`` node):
  its ``model_label`` model (``sft`` by default), keyed by that artifact's stage and key. This is how on-policy
  negatives are made: the run whose download samples from the student is a second run whose recipe points at the
  first run's SFT artifact, so the DAG stays acyclic (download never depends on a stage of its own run);
- a Hub model id: downloaded with ``huggingface_hub.snapshot_download`` (the HF cache) when the stage runs,
  keyed by ``hub:<id>@<revision>`` as configured (an unpinned id is keyed ``@main``: pin ``revision`` to be
  sure a rebuilt key means the same weights).

Problems (``data.generate.problems``): a registered benchmark (read as the evaluate stage reads it), a local
``.jsonl``/``.parquet`` file with ``problem`` and ``answer`` (``id`` optional), or ``synthetic`` (the synthetic
teacher's training problems for ``data.synth``). ``data.max_rows`` takes the first N problems before sampling.

Resume: each finished problem's samples are appended to ``generation.jsonl`` in the stage's work folder (kept
by ``ArtifactStore.build`` across a killed attempt; :class:`redi.evaluate.GenerationLog`); a rerun grades those
again and samples only the rest, drawing what an uninterrupted run would (per-problem seeds).

Departures: the paper distils offline traces from DeepSeek-R1 (OpenR1-Math-Raw) with the dataset's own
labels; here the teacher is any model, labels are our grader's, and with a run's SFT model as teacher the
negatives are on-policy (the student's own mistakes), an experiment the paper's offline setting leaves open.
A protocol's forced generation prefix (``<think>\\n``) is put back at the start of each trace, so a trace reads
as the model's whole answer (R1 style), as the Hub's traces do.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .schema import stable_id
from .sources import DataError, RowStream

if TYPE_CHECKING:
    from .config.data import DataConfig
    from .config.evaluate import EvaluateConfig
    from .config.teacher import GenerateConfig

log = logging.getLogger(__name__)

BENCHMARK = "generate"
"""The benchmark name of every request (it seeds each problem: stable_id(seed, BENCHMARK, problem id))."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(name: str) -> bool:
    """``name`` reads as a Hub model id (``org/name``), not as a path (``.``, ``/``, ``~``)."""
    return not name.startswith((".", "/", "~")) and bool(_HUB_ID.match(name))


@dataclass(frozen=True)
class ModelRef:
    """The teacher as resolved: ``kind`` (folder, run, hub), the folder or Hub id, and its identity (the key)."""

    kind: str
    where: str
    identity: str


def resolve_model(g: GenerateConfig) -> ModelRef:
    """Where the model is and what keys it, without loading it. DataError (one line) for a missing model."""
    name = g.model
    if not name:
        raise DataError("data.generate.model is not set: give a model folder, a registered run's folder "
                        "(<artifact_root>/runs/<name>) or a Hub model id")
    p = Path(name).expanduser()
    if (p / "latest.json").is_file():
        try:
            entry = json.loads((p / "latest.json").read_text())["models"][g.model_label]
        except (KeyError, TypeError, json.JSONDecodeError):
            raise DataError(f"run {p} has no registered {g.model_label!r} model ({p / 'latest.json'}): run its "
                            f"`{g.model_label}` stage and report, or set data.generate.model_label") from None
        folder = Path(entry["dir"])
        if not folder.is_dir():
            raise DataError(f"the {g.model_label} model registered by {p} is gone ({folder}): rerun that run, or point "
                            "data.generate.model at a model folder")
        return ModelRef("run", str(folder), f"artifact:{entry['stage']}:{entry['key']}")
    if p.exists():
        if not (p / "config.json").is_file():
            raise DataError(f"data.generate.model {str(p)!r} is not a transformers model folder (no config.json)")
        return ModelRef("folder", str(p.resolve()), folder_identity(p))
    if not is_hub_id(name):
        raise DataError(f"data.generate.model {name!r} does not exist: give a model folder, a registered run's folder "
                        "(<artifact_root>/runs/<name>) or a Hub model id (org/name)")
    return ModelRef("hub", name, f"hub:{name}@{g.revision or 'main'}")


def folder_identity(p: Path) -> str:
    """A model folder's content identity: the manifest checksums when it is (or is the ``model`` folder of) a store
    artifact, else a sha256 of its files (redi.fingerprint, cached by size and mtime). As ``redi.runs.model_fingerprint``
    (not imported: it would put the whole pipeline into this source's code version)."""
    from .fingerprint import fingerprint

    p = p.expanduser().resolve()
    for cand in (p, p.parent):  # a base-model artifact is the folder; sft/redi keep the model in <artifact>/model
        m = cand / "manifest.json"
        if m.is_file():
            try:
                files = json.loads(m.read_text()).get("files", {})
            except (json.JSONDecodeError, AttributeError):
                break
            rel = "" if cand == p else p.name + "/"
            sub = {k: v["sha256"] for k, v in sorted(files.items()) if k.startswith(rel) and isinstance(v, dict) and "sha256" in v}
            if sub:
                return "sha:" + stable_id(json.dumps(sub, sort_keys=True), n=32)
    return "sha:" + fingerprint(p).removeprefix("sha256:")[:32]


def model_dir(ref: ModelRef, g: GenerateConfig) -> Path:
    """A local folder holding the model (a Hub id is downloaded into the HF cache first)."""
    if ref.kind != "hub":
        return Path(ref.where)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref.where, revision=g.revision))
    except Exception as e:  # offline, unknown repo, gated: one line naming the id
        msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise DataError(f"cannot download the model {ref.where!r} from the Hugging Face Hub ({type(e).__name__}: {msg}); "
                        "offline? download it first and set data.generate.model to its folder") from None


# ----------------------------------------------------------------------------- problems


def _problem_rows(rows: list[dict], origin: str) -> list[dict]:
    from .benchmarks import BenchmarkError, validate_rows

    rows = [{**r, "id": r.get("id") if r.get("id") is not None else stable_id(r.get("problem"))} for r in rows]
    try:
        return validate_rows(rows, origin)
    except BenchmarkError as e:
        raise DataError(f"data.generate.problems: {e}") from None


def _problems_kind(problems: str) -> str:
    """``synthetic``, ``file`` or ``benchmark``."""
    if problems == "synthetic":
        return "synthetic"
    if problems.endswith((".jsonl", ".parquet")) or Path(problems).expanduser().exists():
        return "file"
    return "benchmark"


def _eval_view(g: GenerateConfig, max_problems: int | None = None) -> EvaluateConfig:
    """The evaluation sampler's config for this source's settings."""
    from .config.evaluate import EvaluateConfig

    return EvaluateConfig(
        benchmarks=[g.problems] if _problems_kind(g.problems) == "benchmark" else ["math500"], backend=g.backend,
        n_samples=g.n, temperature=g.temperature, top_p=g.top_p, max_new_tokens=g.max_new_tokens, seed=g.seed,
        prompt_protocol=g.prompt_protocol, dtype=g.dtype, max_model_len=g.max_model_len, hf_batch_size=g.hf_batch_size,
        data_parallel_size=g.data_parallel_size, tensor_parallel_size=g.tensor_parallel_size,
        gpu_memory_utilization=g.gpu_memory_utilization, kv_cache_gb=g.kv_cache_gb, grade_workers=g.grade_workers,
        grade_timeout_s=g.grade_timeout_s, max_problems=max_problems, keep_special_tokens=True)


def load_problems(cfg: DataConfig) -> tuple[list[dict], str]:
    """(rows ``{id, problem, answer}``, where they came from); the first ``data.max_rows`` only."""
    g = cfg.generate
    kind = _problems_kind(g.problems)
    if kind == "synthetic":
        from . import synth

        train, _, _ = synth.generate(cfg.synth)
        seen: dict[str, dict] = {}
        for r in train:
            seen.setdefault(r["problem"], {"id": stable_id(r["problem"]), "problem": r["problem"], "answer": r["answer"]})
        rows, origin = list(seen.values()), f"synthetic(seed={cfg.synth.seed}, style={cfg.synth.style})"
    elif kind == "file":
        from .benchmarks import BenchmarkError, read_local

        path = Path(g.problems).expanduser()
        if not path.is_file():
            raise DataError(f"data.generate.problems {str(path)!r} does not exist: give a .jsonl/.parquet file with "
                            "problem and answer columns, a benchmark name or `synthetic`")
        try:
            raw = read_local(path)
        except BenchmarkError as e:
            raise DataError(f"data.generate.problems: {e}") from None
        rows, origin = _problem_rows(raw, str(path)), str(path)
    else:
        from .benchmarks import BenchmarkError, load_benchmark

        try:
            rows = load_benchmark(g.problems, _eval_view(g))
        except BenchmarkError as e:
            raise DataError(f"data.generate.problems: {e}") from None
        origin = f"benchmark:{g.problems}"
    if cfg.max_rows:
        rows = rows[: cfg.max_rows]
    return rows, origin


# ----------------------------------------------------------------------------- the registry entry's parts


def check(cfg: DataConfig) -> None:
    """One-line DataError before any work: a missing model, unknown problems, a model folder without a chat
    template (its tokenizer is loaded: cheap, no weights)."""
    g = cfg.generate
    ref = resolve_model(g)
    kind = _problems_kind(g.problems)
    if kind == "file" and not Path(g.problems).expanduser().is_file():
        raise DataError(f"data.generate.problems {g.problems!r} does not exist: give a .jsonl/.parquet file with "
                        "problem and answer columns, a benchmark name or `synthetic`")
    if kind == "benchmark":
        from .benchmarks import BenchmarkError, check_names

        try:
            check_names([g.problems], _eval_view(g))
        except BenchmarkError as e:
            raise DataError(f"data.generate.problems: {e}") from None
    if ref.kind != "hub":
        from .generate import GenerationError, load_eval_tokenizer

        try:
            load_eval_tokenizer(Path(ref.where))
        except GenerationError as e:
            raise DataError(f"data.generate.model: {e}") from None


def key_inputs(cfg: DataConfig) -> dict[str, str]:
    """The model's identity (content or artifact key; the Hub id and revision), the problems' content and this
    source's code version (sampler and grader included; the download stage's own code version leaves them out)."""
    try:
        model = resolve_model(cfg.generate).identity
    except DataError:  # a missing model: planning (`redi status`) still works; the check and the stage name it
        model = f"unavailable:{cfg.generate.model}"
    out = {"generate_model": model, "generate_code": source_code_version()}
    if _problems_kind(cfg.generate.problems) == "file":
        from .sources import input_fingerprint

        out["generate_problems"] = input_fingerprint(cfg.generate.problems)
    elif _problems_kind(cfg.generate.problems) == "benchmark":
        from .benchmarks import fingerprint

        try:
            out["generate_problems"] = fingerprint(cfg.generate.problems, _eval_view(cfg.generate))
        except Exception as e:  # unknown / unreachable: the up-front check names it; the key stays stable
            out["generate_problems"] = f"unavailable:{type(e).__name__}"
    return out


_CODE: dict[tuple, str] = {}


def source_code_version() -> str:
    """``redi.keys.code_version`` of this module and what it imports (sampler, grader), recomputed only when a
    file of the package changed (size or mtime): parsing the package costs about a second per call."""
    from .keys import code_version

    pkg = Path(__file__).parent
    stamp = tuple((str(f), st.st_size, st.st_mtime_ns) for f in sorted(pkg.rglob("*.py")) for st in [f.stat()])
    if stamp not in _CODE:
        _CODE.clear()
        _CODE[stamp] = code_version(["redi.teacher"], ("redi.config",))
    return _CODE[stamp]


def rows(cfg: DataConfig, out_dir: Path, info: dict, work: Path | None = None) -> RowStream:
    """Sample, grade and yield one row per problem (the Open-R1-Math-220k layout); facts go into ``info``."""
    from . import evaluate as ev
    from . import generate as G
    from .gradepool import GradingPool
    from .prompts import get_protocol

    t0 = time.time()
    g = cfg.generate
    ref = resolve_model(g)
    problems, origin = load_problems(cfg)
    if not problems:
        raise DataError(f"data.generate.problems {g.problems!r} has no problems")
    mdir = model_dir(ref, g)
    ecfg = _eval_view(g)
    try:
        tok = G.load_eval_tokenizer(mdir)
    except G.GenerationError as e:
        raise DataError(f"data.generate.model: {e}") from None
    requests = G.build_requests(tok, BENCHMARK, problems, ecfg)
    golds = {(BENCHMARK, r["id"]): r["answer"] for r in problems}
    progress = ev.GenerationLog(work, ecfg, mdir)
    resumed = progress.load(requests)
    if resumed:
        log.info("generate: %d of %d problems reused from %s", len(resumed), len(requests), progress.path)

    def engine() -> Any:
        if len(resumed) == len(requests):
            return contextlib.nullcontext()
        return G.open_generator(ecfg, mdir, tok, log_path=Path(work or out_dir) / ev.ENGINE_LOG)

    t_start = time.time()
    with GradingPool(ecfg.grade_workers, ecfg.grade_timeout_s) as pool, engine() as gen:
        startup = time.time() - t_start
        try:
            samples, _, stats = ev._generate_and_grade(gen, pool, requests, resumed, golds, ecfg, "teacher", progress)
        finally:
            progress.close()
    prefix = get_protocol(g.prompt_protocol).prefix
    by_problem: dict[str, list[dict]] = {}
    for s in samples:
        by_problem.setdefault(s["problem_id"], []).append(s)
    verdicts = [s["verdict"] for s in samples]
    info.update({
        "generate": {
            "model": g.model, "model_kind": ref.kind, "model_dir": str(mdir), "model_identity": ref.identity,
            "problems": origin, "n_problems": len(problems), "n": g.n, "backend": g.backend,
            "sampling": ev.protocol(ecfg), "correct_share": round(sum(v is True for v in verdicts) / max(1, len(verdicts)), 4),
            "ungraded": sum(v is None for v in verdicts), "truncated": sum(s["finish_reason"] == "length" for s in samples),
            "completion_tokens_mean": round(sum(s["completion_tokens"] for s in samples) / max(1, len(samples)), 1),
            "resumed_problems": stats["resumed_problems"], "generated_problems": stats["generated_problems"],
            "grading": {k: stats[k] for k in ("done", "timeouts", "crashes")},
            "seconds": {"engine_startup": round(startup, 2), "total": round(time.time() - t0, 2)},
        }})
    if work is not None and (Path(work) / ev.ENGINE_LOG).exists():  # the work folder goes after success
        import shutil

        shutil.copy(Path(work) / ev.ENGINE_LOG, Path(out_dir) / ev.ENGINE_LOG)
    return _rows(problems, by_problem, prefix, origin)


def _rows(problems: list[dict], by_problem: dict[str, list[dict]], prefix: str, origin: str) -> RowStream:
    for p in problems:
        outs = sorted(by_problem[p["id"]], key=lambda s: s["sample_index"])
        yield f"{p['id']}", {
            "problem": p["problem"], "answer": p["answer"], "source": f"generate:{origin}", "uuid": p["id"],
            "generations": [prefix + s["text"] for s in outs], "finish_reasons": [s["finish_reason"] for s in outs],
            "correctness_math_verify": [None if s["verdict"] is None else bool(s["verdict"]) for s in outs],
        }
