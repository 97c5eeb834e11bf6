"""Stage-2 points of a study in parallel: up to ``study.workers`` child processes, one point each.

The study's points after the SFT start (the validation search, then the final seeds) are independent models.
The CPU recipe trains with one torch thread, because at this size a second thread does not pay (README of
deployments/study-cpu), so a 2-core machine ran the study on one core. Here every point runs in its own
process, ``python -m redi.study.parallel SPEC OUT``: the same :meth:`redi.study.Study.point` (so the same
store, keys and artifacts as ``workers: 1``), training in that process (``run.launcher`` is for the SFT
rounds), with ``run.threads`` torch threads or, unset, the cores divided by the workers.

Faults: a failed point lets the points already running finish (their artifacts are cached, so a rerun
resumes from them), starts no new one, and then raises naming the point and its exit status; a stop
(SIGTERM, Ctrl-C, Cancel in the UI: redi.interrupt) ends every child's process tree. A child writes its
result to a temporary name and renames it, so a result file is never half-written.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .. import interrupt
from ..artifacts import Artifact
from ..config import Recipe
from .config import PointJob, StudyConfig
from .results import PointResult

log = logging.getLogger(__name__)

POLL_S = 0.5


class PointFailed(RuntimeError):
    """A study point's child process exited with an error."""


def child_recipe(recipe: Recipe, workers: int) -> dict[str, Any]:
    """The recipe a child runs: training in the child itself, and ``run.threads`` set (cores / workers when unset)
    so that N children do not each start one thread per core."""
    tree = recipe.model_dump(mode="json", by_alias=True)
    tree["run"]["launcher"] = "inprocess"
    tree["run"]["threads"] = recipe.run.threads or max(1, (os.cpu_count() or 1) // workers)
    return tree


def label(job: PointJob) -> str:
    return f"{job.method}[{','.join(f'{k}={v:g}' for k, v in job.params.items())}]-s{job.seed}-{job.split}"


def run_points(recipe: Recipe, cfg: StudyConfig, jobs: list[PointJob], base: dict[str, Artifact], start: Artifact,
               log_dir: Path) -> list[PointResult]:
    """Every job's point, up to ``cfg.workers`` child processes at once; results in the order of ``jobs``.

    Each child's console goes to ``log_dir/<point>.log`` (two progress bars on one console are unreadable);
    this process logs each point's start and result, and a failed point's last lines.
    """
    import tempfile

    from ..launch import terminate_tree

    spec_common = {"recipe": child_recipe(recipe, cfg.workers), "study": cfg.model_dump(mode="json"),
                   "base": {k: a.to_dict() for k, a in base.items()}, "start": start.to_dict()}
    results: list[PointResult | None] = [None] * len(jobs)
    failed: list[str] = []
    running: dict[int, tuple[subprocess.Popen, Path, Path]] = {}
    todo = list(range(len(jobs)))
    log_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="redi-study-points-") as tmp:
        try:
            while todo or running:
                while todo and not failed and len(running) < cfg.workers:
                    i = todo.pop(0)
                    spec, out = Path(tmp, f"point{i}.json"), Path(tmp, f"point{i}.result.json")
                    spec.write_text(json.dumps({**spec_common, "job": jobs[i]._asdict()}))
                    logf = log_dir / f"{label(jobs[i])}.log"
                    log.info("study point %s: started (%d running; log %s)", label(jobs[i]), len(running) + 1, logf)
                    with open(logf, "wb") as fh:
                        proc = subprocess.Popen([sys.executable, "-m", "redi.study.parallel", str(spec), str(out)],
                                                stdout=fh, stderr=subprocess.STDOUT)
                    running[i] = (proc, out, logf)
                if failed and not running:
                    break
                time.sleep(POLL_S)
                interrupt.check("study points")
                for i, (proc, out, logf) in list(running.items()):
                    if proc.poll() is None:
                        continue
                    del running[i]
                    if proc.returncode or not out.exists():
                        failed.append(f"{label(jobs[i])} (exit {proc.returncode}, log {logf})")
                        tail = "\n".join(logf.read_text(errors="replace").splitlines()[-15:])
                        log.error("study point %s failed (exit %s); no new point starts. Last lines of %s:\n%s",
                                  label(jobs[i]), proc.returncode, logf, tail)
                    else:
                        results[i] = r = PointResult.from_dict(json.loads(out.read_text()))
                        log.info("study point %s: %s pass@1 %.3f (train %.0f s, eval %.0f s)%s", label(jobs[i]), r.eval.split,
                                 r.eval.pass1, r.train_seconds, r.eval.seconds, " [cached]" if r.train_cached else "")
        finally:
            for proc, _, _ in running.values():  # stopped, or an error here: no child trains on
                if proc.poll() is None:
                    terminate_tree(proc.pid)
    if failed:
        raise PointFailed(f"study points failed: {', '.join(failed)}; the points that finished are cached, rerun the "
                          "same command to resume")
    return [r for r in results if r is not None]


def main(argv: list[str] | None = None) -> int:
    """``python -m redi.study.parallel SPEC OUT``: one point (the child side of :func:`run_points`)."""
    from .runner import Study

    spec_path, out = (argv if argv is not None else sys.argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = json.loads(Path(spec_path).read_text())
    s = Study(Recipe.model_validate(spec["recipe"]), StudyConfig.model_validate(spec["study"]))
    job = PointJob(**spec["job"])
    res = s.point(s.method(job.method), job.params, job.seed, job.split,
                  {k: Artifact.from_dict(v) for k, v in spec["base"].items()}, Artifact.from_dict(spec["start"]))
    tmp = Path(out).with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(res), default=str))
    tmp.replace(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
