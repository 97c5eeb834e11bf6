"""The ``redi`` command: run the pipeline, one stage, any model's evaluation, status, deployments.

    redi demo                                  the whole offline demo (redi/recipes/demo.yaml, shipped with the package)
    redi run RECIPE.yaml [--set k=v ...]       the whole DAG of a recipe
    redi stage STAGE RECIPE.yaml [--set ...]   one stage; upstream from cache (or computed)
    redi eval --model PATH_OR_HUB_ID --benchmarks math500,aime24 --samples N [--set evaluate.x=y]
    redi status RECIPE.yaml                    which stages are cached, their keys and folders
    redi nightly [--artifact-root DIR]         evaluate every registered run's latest models now
    redi serve                                 serve every deployment (incl. the nightly cron)
    redi study deployments/study-cpu [--set ...]  the CPU-scale study (redi.study; docs/study.md)
    redi push RUN --model redi --repo NS/NAME [--dry-run]  a run's model, data and evaluation details to the Hub

By default the commands run the Prefect flows (so runs appear in the UI when PREFECT_API_URL points
at a server; otherwise Prefect starts a temporary local server, with its database under
``<artifact_root>/.prefect``). ``--no-prefect`` calls the library directly. A bad recipe fails before
any work with exit code 2, naming the field. This module imports Prefect only inside the commands
that run flows.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .config import Recipe, RecipeError, load_recipe
from .dag import NODE, NODES, STAGES, node_rows
from .dag import disabled as dag_disabled
from .storage import normalize_root

REPO = Path(__file__).resolve().parents[1]
DEMO_RECIPE = Path(__file__).resolve().parent / "recipes" / "demo.yaml"  # package data: `redi demo` runs from any folder
EXIT_BAD_INPUT = 2


# ------------------------------------------------------------------------------------------ parsing
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="redi", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    p.add_argument("--debug", action="store_true", help="Show the traceback of an error (by default one line says what to fix).")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp: argparse.ArgumentParser, prefect: bool = True) -> None:
        sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="Override a recipe field, e.g. --set redi.alpha=1.0 (repeatable; YAML values).")
        if prefect:
            sp.add_argument("--refresh", action="append", default=[], choices=STAGES,
                            help="Recompute this stage even if cached (repeatable).")
            sp.add_argument("--no-prefect", action="store_true", help="Call the library directly, without Prefect.")

    sp = sub.add_parser("demo", help="Run the whole offline demo recipe (redi/recipes/demo.yaml; artifacts in ./artifacts).")
    common(sp)
    sp = sub.add_parser("run", help="Run the whole DAG of a recipe.")
    sp.add_argument("recipe", help="Recipe YAML (or its folder).")
    common(sp)
    sp = sub.add_parser("stage", help="Run one stage; its upstream comes from cache or is computed.",
                        description="Run one stage; its upstream comes from cache or is computed. Stages: "
                                    + "; ".join(f"{n.name}: {n.summary}" for n in NODES))
    sp.add_argument("stage", choices=STAGES)
    sp.add_argument("recipe", help="Recipe YAML (or its folder).")
    sp.add_argument("--labels", default=None, help="stage=evaluate: models to evaluate, e.g. base,redi (default: the recipe's).")
    sp.add_argument("--register", action="store_true",
                    help="stage=evaluate: register the result for nightly evaluation (rewrites runs/<name>/latest.json); "
                         "by default a stage rerun is recorded on its own.")
    common(sp)
    from .benchmarks import REGISTRY

    known = "; ".join(f"{s.name} ({s.description})" if s.description else s.name for s in REGISTRY.values())
    sp = sub.add_parser("eval", help="Evaluate any model folder or Hub id; the result goes to the results store.",
                        description="Evaluate any model folder or Hub id; the result goes to the results store. "
                                    f"Registered benchmarks (redi.benchmarks.REGISTRY): {known}.")
    sp.add_argument("--model", required=True, help="A model folder (e.g. an sft artifact's model/) or a Hub id.")
    sp.add_argument("--benchmarks", default=None, help="Comma-separated benchmark names (default: the recipe's); registered: "
                    f"{', '.join(REGISTRY)}; or any name given a file in evaluate.benchmark_paths.<name>.")
    sp.add_argument("--samples", type=int, default=None, help="Samples per problem (evaluate.n_samples).")
    sp.add_argument("--recipe", default=None, help="Recipe whose data, evaluate and run sections to start from (default: built-in "
                    "defaults); demo_test is the test split of its synthetic data, so a model from `redi demo` takes "
                    "--recipe deployments/demo.")
    sp.add_argument("--name", default=None, help="Label of this model in the results store (default: the folder name).")
    common(sp)
    sp = sub.add_parser("status", help="Which stages of a recipe are cached, their keys and folders.")
    sp.add_argument("recipe", help="Recipe YAML (or its folder).")
    sp.add_argument("--json", action="store_true", help="Machine-readable output.")
    common(sp, prefect=False)
    sp = sub.add_parser("nightly", help="Evaluate the latest models of every registered run now (what the cron does).")
    sp.add_argument("--artifact-root", default=os.environ.get("REDI_ARTIFACT_ROOT", "artifacts"))
    sp.add_argument("--runs", default=None, help="Comma-separated run names (default: all registered).")
    sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="evaluate.KEY=VALUE",
                    help="Override the evaluation protocol, e.g. --set evaluate.n_samples=4.")
    sp.add_argument("--no-prefect", action="store_true", help="Call the library directly, without Prefect.")
    sp = sub.add_parser("serve", help="Serve every deployment (pipeline, stages, nightly cron) from this process.")
    sp.add_argument("--limit", type=int, default=None, help="Most flow runs at once.")
    sp = sub.add_parser("study", help="The CPU-scale study: SFT to its val plateau, val search, final seeds on test (redi.study).")
    sp.add_argument("recipe", help="Folder with recipe.yaml + study.yaml, e.g. deployments/study-cpu.")
    sp.add_argument("--out", default=None, help="Report folder (default <artifact_root>/runs/<run.name>/study).")
    common(sp, prefect=False)
    sp.add_argument("--no-prefect", action="store_true", help="Call the library directly, without Prefect.")
    add_push_parser(sub)
    return p


def add_push_parser(sub: Any) -> None:
    """`redi push`: a registered run's model, training data and evaluation details to the Hub (redi.publish)."""
    from .publish import KINDS

    sp = sub.add_parser("push", help="Publish a registered run to the Hugging Face Hub: a model with its card, the positives "
                        "and pairs as a dataset, the evaluation samples as a details dataset (docs/publishing.md).")
    sp.add_argument("run", help="A registered run name (runs/<name>/latest.json under --artifact-root, written by a full run).")
    sp.add_argument("--model", required=True, help="Which model of the run: base, sft, redi, or the stage-2 objective's name (dpo, simpo, ...).")
    sp.add_argument("--repo", required=True, help="Model repo id NAMESPACE/NAME; the dataset and details go to NAME-data and NAME-details.")
    sp.add_argument("--dataset-repo", default=None, help="Dataset repo id (default: REPO-data).")
    sp.add_argument("--details-repo", default=None, help="Evaluation details repo id (default: REPO-details).")
    sp.add_argument("--only", default=None, help=f"Comma-separated parts to publish (default: all of {','.join(KINDS)}).")
    sp.add_argument("--artifact-root", default=os.environ.get("REDI_ARTIFACT_ROOT", "artifacts"), help="The store the run is registered in.")
    sp.add_argument("--out", default=None, help="Where the folders are written, one per repository (default: "
                    "<artifact-root>/runs/RUN/publish/MODEL); must be empty or an earlier push folder.")
    sp.add_argument("--dry-run", action="store_true", help="Write the folders that would be pushed and push nothing.")
    sp.add_argument("--license", default=None, help="Hub license id of every repo (default: known for the tiny/synthetic "
                    "demo and the paper's Qwen/Open-R1 sources; required otherwise).")
    sp.add_argument("--notes", default=None, help="Markdown with a '## ... departs from the paper' section for the model card "
                    "(default: deployments/RUN/README.md when it exists).")
    sp.add_argument("--private", action="store_true", help="Create the repositories private.")
    sp.add_argument("--no-prefect", action="store_true", help="Call the library directly, without Prefect.")


def _csv(s: str | None) -> list[str] | None:
    return [x.strip() for x in s.split(",") if x.strip()] if s else None


# ------------------------------------------------------------------------------------------ helpers
_SESSION = contextlib.ExitStack()  # prefect_env's client settings; closed when main returns


def prefect_env(artifact_root: str | Path) -> None:
    """Without a server (no PREFECT_API_URL), keep Prefect's database beside the artifacts and start a
    temporary server in its own session (flows/server.py: a Ctrl-C to the terminal's process group must
    not stop it before the interrupted run has reported its state); it is stopped at exit."""
    if not os.environ.get("PREFECT_API_URL") and not os.environ.get("PREFECT_HOME"):
        from .storage import local_root  # a URL root: beside its local cache

        os.environ["PREFECT_HOME"] = str(local_root(artifact_root) / ".prefect")
    if os.environ.get("PREFECT_HOME"):  # Prefect's SQLite cannot create a database in a missing folder
        Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect's default 20 s wait for its temporary server is too short on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    if not os.environ.get("PREFECT_API_URL"):
        from flows.server import api, temporary_server

        _SESSION.enter_context(api(temporary_server()))


def recipe_for(args: argparse.Namespace, path: str | Path | None) -> Recipe:
    r = load_recipe(path, list(args.overrides) or None)
    if getattr(args, "refresh", None):
        r.run.refresh = sorted(set(r.run.refresh) | set(args.refresh), key=STAGES.index)
    return r


def table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    out = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(out)


def funnel_headline(md: str) -> str:
    """The first section of the verify stage's funnel.md: this run's positives and pairs beside the official ones."""
    parts = md.split("\n## ")
    return ("## " + parts[1]).strip() if len(parts) > 1 else md.strip()


def print_run(result: dict[str, Any], root: str, seconds: float) -> None:
    rows = result["dag"]
    print(table([{**r, "seconds": f"{r['seconds']:.1f}"} for r in rows], ["stage", "status", "seconds", "key", "path"]))
    hits = sum(r["status"] == "cache hit" for r in rows)
    built = sum(r["seconds"] for r in rows if r["status"] == "built")
    print(f"\n{hits}/{len(rows)} nodes from cache; {built:.1f}s building, {seconds:.1f}s wall. Artifacts: {normalize_root(root)}")
    for r in rows:  # what the verify stage selected, beside the official figures (its funnel.md)
        if r["stage"] == "verify" and (Path(r["path"]) / "funnel.md").exists():
            print("\n" + funnel_headline((Path(r["path"]) / "funnel.md").read_text()))
        if r["stage"] == "curves" and (Path(r["path"]) / "curves.json").exists():  # evaluation over training
            from .curves import markdown

            print(f"\nEvaluation over training ({Path(r['path']) / 'curves.png'}):\n"
                  + markdown(json.loads((Path(r["path"]) / "curves.json").read_text())))
    rep = result.get("report")
    if rep:
        reg = ("registered for nightly evaluation: latest.json, results.md, results.png" if rep.get("registered", True)
               else "a stage rerun, not registered (pass --register to make it what nightly evaluates): results.md, results.png")
        if rep.get("read_only"):
            reg = "not written: the artifact root is read-only, so the run is not recorded or registered"
        print(f"\n{rep['table_markdown']}\n\nRun folder: {rep['run_dir']} ({reg})")


# ------------------------------------------------------------------------------------------ commands
def run_library(r: Recipe, until: str, labels: list[str] | None, register: bool = False) -> dict[str, Any]:
    """The DAG up to ``until`` without Prefect (``Pipeline.run_until``); the same result shape as the flows."""
    from .pipeline import Pipeline

    p = Pipeline(r)
    report = p.run_until(until, labels, register)["report"]
    arts = {k: v.to_dict() for k, v in p.nodes.items()}  # every node built or taken from cache, evaluate[*] included
    return {"dag": node_rows(arts, p.timings), "report": report, "artifacts": arts}


def check_labels(labels: list[str] | None) -> list[str] | None:
    from .pipeline import MODEL_LABELS

    bad = [lab for lab in labels or [] if lab not in MODEL_LABELS]
    if bad:
        raise RecipeError(f"--labels: unknown model label{'s' if len(bad) > 1 else ''} {', '.join(map(repr, bad))}; "
                          f"use a comma-separated subset of {','.join(MODEL_LABELS)}")
    return labels


def preflight(check, *args) -> None:
    """Run a pre-flight check of the inputs; what it finds is a bad recipe (exit 2, one line), like a bad key."""
    try:
        check(*args)
    except RecipeError:
        raise
    except Exception as e:
        line = user_error(e)
        if line is None:
            raise
        raise RecipeError(line) from e


def cmd_run(args: argparse.Namespace, r: Recipe, until: str, labels: list[str] | None = None) -> int:
    from .pipeline import check_inputs

    preflight(check_inputs, r)  # a missing data file, model or benchmark fails here, not after training
    if until in dag_disabled(r):
        raise RecipeError(f"stage {until} is off in this recipe: set {NODE[until].enabled_by} to turn it on "
                          "(docs/evaluation.md)")
    from . import distributed

    t0 = time.time()
    if distributed.launched() and not args.no_prefect:
        raise RecipeError(f"launched as {distributed.world_size()} processes (accelerate launch / torchrun): add "
                          "--no-prefect (every process would start its own Prefect run), or run `redi` once with "
                          "--set run.launcher=accelerate")
    if args.no_prefect:
        result = run_library(r, until, labels, bool(getattr(args, "register", False)))
        if not distributed.is_main():  # rank 0 prints the table
            return 0
    else:
        prefect_env(r.run.artifact_root)
        rd = r.model_dump(mode="json", by_alias=True)
        if until == "report":
            from flows.pipeline import redi_pipeline

            result = redi_pipeline(recipe=rd)
        else:
            from flows.pipeline import redi_stage

            result = redi_stage(stage=until, recipe=rd, labels=labels, register_run=bool(getattr(args, "register", False)))
    print_run(result, r.run.artifact_root, time.time() - t0)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from .pipeline import Pipeline

    r = recipe_for(args, args.recipe)
    pipe = Pipeline(r)
    plan = pipe.plan()
    if args.json:
        print(json.dumps([{"stage": n.name, "key": n.key, "cached": n.cached, "path": n.path, "upstream": n.upstream} for n in plan], indent=2))
        return 0
    rows = [{"stage": n.name, "cached": "yes" if n.cached else "no", "key": n.key, "path": n.path} for n in plan]
    print(table(rows, ["stage", "cached", "key", "path"]))
    print(f"\n{sum(n.cached for n in plan)}/{len(plan)} stages cached. Artifacts: {pipe.store.location}")
    run_dir = pipe.run_dir()
    pipe.store.pull_tree(run_dir, names=("latest.json", "results.md"))
    if (run_dir / "latest.json").exists():
        print(f"Registered run: {run_dir} (latest.json, results.md)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    extra = []
    if args.benchmarks:
        extra.append(f"evaluate.benchmarks={json.dumps(_csv(args.benchmarks))}")
    if args.samples is not None:
        extra.append(f"evaluate.n_samples={args.samples}")
    args.overrides = extra + list(args.overrides)
    r = recipe_for(args, args.recipe)
    if args.model.startswith(("/", ".", "~")) and not Path(args.model).expanduser().exists():
        raise RecipeError(f"--model {args.model}: no such folder (give a model folder or a Hub id such as Qwen/Qwen2.5-Math-1.5B)")
    from .benchmarks import check_names, from_download

    preflight(check_names, r.evaluate.benchmarks, r.evaluate, from_download(r.data.source))
    if args.recipe is None and r.data.source == "synthetic" and any(b.startswith("demo_") for b in r.evaluate.benchmarks):
        print("redi eval: demo_test is the test split of the built-in defaults' synthetic data, not the demo's "
              "(pass --recipe deployments/demo for a model trained by `redi demo`)", file=sys.stderr)
    t0 = time.time()
    if args.no_prefect:
        from . import runs as run_registry

        res = run_registry.evaluate_external(args.model, r, args.name)
    else:
        prefect_env(r.run.artifact_root)
        from flows.nightly import redi_eval

        ov = _overrides_dict(args.overrides) | ({"run.refresh": list(args.refresh)} if args.refresh else {})
        res = redi_eval(model=args.model, recipe_path=args.recipe, overrides=ov, name=args.name)
    from .runs import metrics_rows

    rows = [{k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()} for row in metrics_rows(res["metrics"])]
    cols = list(dict.fromkeys(c for row in rows for c in row))
    print(table(rows, cols))
    print(f"\n{'cache hit' if res['cached'] else 'evaluated'} in {time.time() - t0:.1f}s. "
          f"Samples and metrics: {res['artifact']['path']}\nResults store: {res['results']}")
    return 0


def _overrides_dict(items: list[str]) -> dict[str, Any]:
    from .config.recipe import split_override

    return dict(split_override(o) for o in items)


def cmd_nightly(args: argparse.Namespace) -> int:
    ov = {}
    for k, v in _overrides_dict(args.overrides).items():
        if not k.startswith("evaluate."):
            raise RecipeError(f"nightly: only evaluate.* fields can be set, got {k!r}")
        ov[k.removeprefix("evaluate.")] = v
    runs = _csv(args.runs)
    from .storage import is_url

    if not is_url(args.artifact_root) and not Path(args.artifact_root).expanduser().is_dir():
        raise RecipeError(f"--artifact-root {args.artifact_root}: no such folder (the run.artifact_root your runs wrote to; "
                          "default ./artifacts)")
    if args.no_prefect:
        from dataclasses import asdict

        from . import runs as run_registry

        tonight = [asdict(x) for x in run_registry.evaluate_registered(args.artifact_root, None, ov, runs)]
        hist = run_registry.nightly_history(args.artifact_root)
    else:
        prefect_env(args.artifact_root)
        from flows.nightly import nightly_eval

        out = nightly_eval(artifact_root=args.artifact_root, evaluate_overrides=ov, runs=runs)
        tonight, hist = out["tonight"], out["history"]
    print(table(tonight, ["run", "label", "status", "model_key", "path"]) if tonight else "no registered runs")
    print(f"\n{hist['markdown']}\n\nResults store: {hist['results']}  History plot: {hist.get('plot')}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import runpy

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    mod = runpy.run_path(str(REPO / "deployments" / "serve.py"))
    mod["main"](limit=args.limit)
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    """`redi study RECIPE`: the `redi-study` flow (or redi.study directly with --no-prefect)."""
    from . import distributed
    from .study import load_study, run_study

    if distributed.launched():  # its training runs inside single-process stage builds: it would wait forever
        raise RecipeError(f"redi study runs in one process, not under a launcher (WORLD_SIZE={distributed.world_size()}): "
                          "run `redi study` directly")
    recipe, _ = load_study(args.recipe, list(args.overrides))  # a bad recipe fails here, before any work
    if args.no_prefect:
        rep = run_study(args.recipe, list(args.overrides), args.out)
    else:
        prefect_env(recipe.run.artifact_root)
        from flows.study import redi_study

        rep = redi_study(str(args.recipe), list(args.overrides), args.out)
    print(f"{rep['table_markdown']}\nReport: {rep['out_dir']}/results.md")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    """`redi push RUN --model LABEL --repo NS/NAME`: the `redi-push` flow (or redi.publish directly with --no-prefect)."""
    from .publish import PublishError, publish

    kw = dict(artifact_root=args.artifact_root, run=args.run, model=args.model, repo=args.repo, out=args.out,
              dry_run=args.dry_run, only=_csv(args.only), dataset_repo=args.dataset_repo, details_repo=args.details_repo,
              license=args.license, notes=args.notes, private=args.private)
    try:
        if args.no_prefect:
            plan = publish(**kw)
        else:
            from .publish import repo_ids
            from .publish_source import find_run

            repo_ids(args.repo, _csv(args.only), args.dataset_repo, args.details_repo)  # before Prefect starts
            find_run(args.artifact_root, args.run)
            prefect_env(args.artifact_root)
            from flows.publish import redi_push

            plan = redi_push(**kw)
    except PublishError as e:
        raise RecipeError(str(e)) from None
    rows = [{"part": k, "repo": p["repo_id"], "type": p["repo_type"], "files": len(p["files"]),
             "uploaded": plan["uploaded"].get(k, "no (dry run)" if plan["dry_run"] else "?"), "folder": p["folder"]}
            for k, p in plan["parts"].items()]
    print(table(rows, ["part", "repo", "type", "files", "uploaded", "folder"]))
    print(f"\n{'Dry run: nothing pushed. ' if plan['dry_run'] else ''}Folders: {plan['out']} (push.json says which goes where)")
    return 0


USER_ERRORS = {  # module -> exception classes whose message already names the thing and the fix
    "redi.data": ("DataError",), "redi.sources": ("DataError",), "redi.generate": ("GenerationError",),
    "redi.benchmarks": ("BenchmarkError",),
    "redi.verify": ("LabelRuleError",), "redi.train": ("TrainingError",), "redi.train_backend": ("TrainingSetupError",), "redi.artifacts": ("StageFailed", "CorruptArtifact", "StorageError"),
    "redi.storage": ("RemoteError",),
}
_ERRNO_FIX = {
    errno.ENOSPC: "free space on that disk, or set run.artifact_root to a folder on another disk",
    errno.EROFS: "the file system is read-only: set run.artifact_root to a writable folder",
    errno.EACCES: "no permission: fix the folder's permissions or set run.artifact_root to a folder you own",
    errno.ENOENT: "no such file or folder: check the path in the recipe or on the command line",
}


def user_error(e: BaseException) -> str | None:
    """One line for an error the user can fix (a known error class, an OSError, a failed launch), else None."""
    for mod, names in USER_ERRORS.items():
        m = sys.modules.get(mod)  # not imported: its errors cannot have been raised
        if m is not None and isinstance(e, tuple(getattr(m, n) for n in names if hasattr(m, n))):
            return " ".join(str(e).split())
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) and e.filename:
        from .artifacts import storage_error  # the folder, the space free, the fix

        return str(storage_error(e, Path(e.filename).parent))
    if isinstance(e, OSError):
        where = f" {e.filename}" if e.filename else ""
        fix = _ERRNO_FIX.get(e.errno, "check the path and its permissions")
        return f"{e.strerror or e}:{where} ({fix})"
    if isinstance(e, subprocess.CalledProcessError):
        return f"{' '.join(map(str, e.cmd[:6]))} ... exited with status {e.returncode} (its own error is printed above)"
    return None


def _drop_traceback(record: logging.LogRecord) -> bool:
    """Log filter: keep the record, without its traceback (an error that is a bug is re-raised by main)."""
    record.exc_info, record.exc_text = None, None
    return True


_handled: list[int] = []


def _interrupt(signum, frame) -> None:
    """SIGTERM / SIGINT: stop every stage thread (redi.interrupt), bound the wait, unwind the main thread.

    Later signals only say that the run is stopping: raising again would cut short the clean-up that
    the first one started (Prefect's own SIGTERM handler re-sends the signal once its flow has unwound;
    that is the first this handler sees of a SIGTERM during a flow)."""
    from . import interrupt

    status = 128 + signum
    interrupt.begin(status)
    if _handled:
        interrupt.say(f"redi: already stopping (forced {interrupt.grace_s():g} s after the first signal)")
        return
    _handled.append(signum)
    raise KeyboardInterrupt("SIGTERM" if signum == signal.SIGTERM else "")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Prefect API call otherwise
    if not args.debug:  # Prefect logs a failed task's traceback twice; the one line below says what to do
        for name in ("prefect.flow_runs", "prefect.task_runs"):
            logging.getLogger(name).addFilter(_drop_traceback)
    for name in ("accelerate.accelerator", "accelerate.checkpointing"):  # 5 lines per checkpoint otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    # SIGTERM (kill, a scheduler's timeout) and Ctrl-C stop the stage wherever it runs (redi.interrupt) and
    # unwind: Prefect's temporary server, vLLM engines and grading workers are shut down by their context
    # managers instead of being orphaned.
    from . import interrupt

    interrupt.clear()
    _handled.clear()
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {s: signal.signal(s, _interrupt) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with _SESSION:
            return _dispatch(args)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def _dispatch(args: argparse.Namespace) -> int:
    try:
        if args.command == "demo":
            return cmd_run(args, recipe_for(args, DEMO_RECIPE), "report")
        if args.command == "run":
            return cmd_run(args, recipe_for(args, args.recipe), "report")
        if args.command == "stage":
            return cmd_run(args, recipe_for(args, args.recipe), args.stage, check_labels(_csv(args.labels)))
        if args.command == "eval":
            return cmd_eval(args)
        if args.command == "status":
            return cmd_status(args)
        if args.command == "nightly":
            return cmd_nightly(args)
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "study":
            return cmd_study(args)
        if args.command == "push":
            return cmd_push(args)
    except RecipeError as e:
        if args.debug:
            raise
        print(f"redi: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as e:
        line = user_error(e)
        if line is None or args.debug:
            raise
        print(f"redi: {line}", file=sys.stderr)
        return 1
    except BaseException as e:  # KeyboardInterrupt, or Prefect's TerminationSignal (SIGTERM during a flow)
        from . import interrupt

        if not isinstance(e, KeyboardInterrupt) and not interrupt.stopping():
            raise
        status = interrupt.status_of(e)
        print(f"redi: interrupted{' (SIGTERM)' if status == 143 else ''}", file=sys.stderr)
        return status
    return 1


if __name__ == "__main__":
    sys.exit(main())
