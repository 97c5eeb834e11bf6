"""Models kept during training (``sft/redi.keep_checkpoints``): exported at their step, published in the artifact.

At each kept step the model is written as the stage's final ``model/`` is (``save_dtype``, tokenizer, the
tiny-model marker: loadable by the evaluate stage and vLLM) into ``work_dir/kept/step-<n>`` (a ``.tmp``
folder renamed when complete). The work folder survives a kill, so a resumed run keeps the steps exported
before it; a step trained again after resuming from an earlier checkpoint is exported again (same weights).
The export happens before that step's resume checkpoint, so a kill between the two never loses it. At the
end the kept folders are linked (hard links where the file system allows) into the artifact's
``checkpoints/step-<n>/``, so the manifest lists and checksums them. Resume checkpoints
(``redi.train_checkpoints``) are untouched: what they hold and how many are kept do not change.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

    from .config.train import OptimConfig

log = logging.getLogger(__name__)

KEPT_DIR = "checkpoints"
"""Folder of the artifact with the kept models: ``checkpoints/step-<n>/`` (``redi.curves`` reads it)."""
WORK_DIR = "kept"


def kept_steps(cfg: OptimConfig, total: int) -> list[int]:
    """The steps (before the last, which is ``model/``) whose model is kept; listed steps past the end are warned about."""
    late = [s for s in (cfg.keep_checkpoints if isinstance(cfg.keep_checkpoints, list) else []) if s > total]
    if late:
        log.warning("keep_checkpoints: steps %s are past the run's last step %d and are not kept (the last step is model/)",
                    late, total)
    return cfg.kept_steps(total)


def export_step(job: Any, acc: Accelerator, model: torch.nn.Module, step: int) -> Path:
    """Export the model at ``step`` into ``work_dir/kept/step-<n>`` (``.tmp`` first, renamed when complete)."""
    from .artifacts import storage_error
    from .train_report import export_model

    final = job.work_dir / WORK_DIR / f"step-{step}"
    tmp = final.with_name(final.name + ".tmp")
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        export_model(job, acc, model, tmp)
    except Exception as e:
        err = storage_error(e, job.work_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        if err is None:
            raise
        raise err from e
    if acc.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    acc.wait_for_everyone()
    return final


def _link_tree(src: Path, dst: Path) -> None:
    """``dst`` as a copy of ``src`` made of hard links where possible (no second copy of the weights)."""
    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dst, copy_function=link)


def publish(job: Any, acc: Accelerator, steps: list[int]) -> None:
    """Link every kept step's export into ``out_dir/checkpoints/step-<n>`` (main process). Linked, not moved:
    a rerun after a failed publish still finds them in the work folder."""
    if acc.is_main_process:
        for step in steps:
            src = job.work_dir / WORK_DIR / f"step-{step}"
            if not src.is_dir():
                from .train import TrainingError

                raise TrainingError(f"the model kept at step {step} is missing from {src.parent}: delete {job.work_dir} "
                                    "and train again")
            dst = job.out_dir / KEPT_DIR / f"step-{step}"
            shutil.rmtree(dst, ignore_errors=True)
            _link_tree(src, dst)
    acc.wait_for_everyone()
