"""Checkpoints of a training run: save, verify, choose the one to resume from.

A checkpoint is ``work_dir/checkpoint-<step>``: accelerate's ``save_state`` (model, optimiser, scheduler,
RNG), ``trainer_state.json`` (step, fingerprint, signals, counts) and ``checksums.json``, written last.
It is written as ``checkpoint-<step>.tmp`` and renamed, so a folder without the ``.tmp`` suffix and with
``checksums.json`` is complete. :data:`KEEP_CHECKPOINTS` are kept, so a corrupt newest one falls back to
the one before. A full disk is one line (:class:`redi.artifacts.StorageError`) and leaves no ``.tmp``.
With a URL artifact root rank 0 mirrors each saved checkpoint to the store (:func:`redi.storage.sync_checkpoint`,
``checksums.json`` uploaded last) and the store pulls the newest one into a fresh work folder, so a preempted
job resumes on another machine.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from .artifacts import file_table, folder_bytes, sha256_file, storage_error
from .storage import pull_checkpoint, sync_checkpoint

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = ["CHECKSUMS", "KEEP_CHECKPOINTS", "TRAINER_STATE", "checkpoints", "choose_checkpoint", "good_checkpoint",
           "latest_checkpoint", "save_checkpoint", "tied_head_notice", "verify_checkpoint", "write_checksums"]

log = logging.getLogger(__name__)


def tied_head_notice(record: logging.LogRecord) -> bool:
    """False for accelerate's "Removed shared tensor {'lm.lm_head.weight'}" at every checkpoint: the head is tied
    to the embeddings (``tie_word_embeddings``), stored once and tied again on load (resume is tested), so
    the warning says nothing; any other shared tensor is still reported. accelerate's logger puts
    ``[RANK n] `` in front of the message."""
    msg = re.sub(r"^\[RANK \d+\] ", "", record.getMessage())
    return not (msg.startswith("Removed shared tensor {") and set(re.findall(r"'([^']+)'", msg.split("}")[0]))
                <= {"lm.lm_head.weight", "lm_head.weight"})


logging.getLogger("accelerate.utils.other").addFilter(tied_head_notice)

CHECKSUMS = "checksums.json"
"""Written last into a checkpoint (size and sha256 of every other file): a folder without it is no checkpoint."""
TRAINER_STATE = "trainer_state.json"
"""The trainer's own state in a checkpoint (step, fingerprint, signal records, counts)."""
KEEP_CHECKPOINTS = 2
"""Checkpoints kept: the newest and the one before it, the fallback when the newest fails verification."""


def checkpoints(work_dir: Path) -> list[Path]:
    """Renamed (complete) checkpoint folders, newest first; ``checkpoint-N.tmp`` is never one."""
    cks = [p for p in work_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-", 1)[1].isdigit()]
    return sorted(cks, key=lambda p: int(p.name.split("-", 1)[1]), reverse=True)


def latest_checkpoint(work_dir: Path) -> Path | None:
    """The newest checkpoint that has its ``checksums.json`` (not verified)."""
    return next((p for p in checkpoints(work_dir) if (p / CHECKSUMS).exists()), None)


def write_checksums(folder: Path) -> None:
    """``checksums.json``: size and sha256 of every other file of ``folder``."""
    (folder / CHECKSUMS).write_text(json.dumps(file_table(folder, skip=CHECKSUMS), indent=1))


def verify_checkpoint(folder: Path) -> str | None:
    """None when every file ``checksums.json`` lists has its size and sha256, else why not (naming the file)."""
    path = folder / CHECKSUMS
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return f"{path} is missing or unreadable ({type(e).__name__})"
    for rel, meta in table.items():
        f = folder / rel
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size != meta["size"]:
            return f"{f} has {f.stat().st_size} bytes, {CHECKSUMS} says {meta['size']}"
        if sha256_file(f) != meta["sha256"]:
            return f"{f} does not match its sha256 in {CHECKSUMS}"
    return None


def _checkpoint_bytes(acc: Accelerator, work_dir: Path) -> int:
    """Space a checkpoint needs: the newest one's size, else weights + two Adam moments of the local model."""
    ck = latest_checkpoint(work_dir)
    if ck is not None:
        return folder_bytes(ck)
    return 3 * sum(p.numel() * p.element_size() for m in acc._models for p in m.parameters())


def _save_failed(e: Exception, acc: Accelerator, work_dir: Path, tmp: Path) -> NoReturn:
    """Raise a one-line StorageError for a full disk / read-only work_dir (else ``e``); remove ``tmp`` first."""
    err = storage_error(e, work_dir, _checkpoint_bytes(acc, work_dir))
    shutil.rmtree(tmp, ignore_errors=True)  # never trusted (not renamed), but it holds the space
    if err is None:
        raise e
    raise err from e


def save_checkpoint(acc: Accelerator, work_dir: Path, step: int, state: dict[str, Any]) -> Path:
    """Save into ``checkpoint-N.tmp`` (every rank), then (rank 0) ``trainer_state.json`` = ``state``, then
    ``checksums.json`` last, then rename to ``checkpoint-N`` and keep the newest :data:`KEEP_CHECKPOINTS`."""
    final = work_dir / f"checkpoint-{step}"
    tmp = work_dir / f"checkpoint-{step}.tmp"
    if acc.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    acc.wait_for_everyone()
    try:
        acc.save_state(str(tmp))
    except Exception as e:
        _save_failed(e, acc, work_dir, tmp)
    acc.wait_for_everyone()  # every rank's shard is written before rank 0 hashes and renames the folder
    if acc.is_main_process:
        try:
            (tmp / TRAINER_STATE).write_text(json.dumps(state))
            write_checksums(tmp)
        except Exception as e:
            _save_failed(e, acc, work_dir, tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in checkpoints(work_dir)[KEEP_CHECKPOINTS:]:
            shutil.rmtree(old, ignore_errors=True)
        sync_checkpoint(work_dir, final)  # a URL artifact root: mirrored for a resume elsewhere (else a no-op)
    acc.wait_for_everyone()
    return final


def good_checkpoint(work_dir: Path) -> Path | None:
    """The newest checkpoint whose files match ``checksums.json``; each one that does not is removed with a
    warning naming the file (a flipped bit must not resume into a different model under the same key)."""
    bad = []
    for ck in checkpoints(work_dir):
        why = verify_checkpoint(ck)
        if why is None:
            if bad:
                log.warning("resuming from the previous good checkpoint %s", ck)
            return ck
        log.warning("checkpoint %s failed verification: %s; it is removed", ck, why)
        shutil.rmtree(ck, ignore_errors=True)
        bad.append(ck)
    if bad:
        log.warning("no good checkpoint left in %s: training starts over", work_dir)
    return None


def choose_checkpoint(acc: Accelerator, work_dir: Path) -> Path | None:
    """:func:`good_checkpoint` verified by rank 0 (every file hashed once), the choice broadcast to the other ranks."""
    if acc.is_main_process:
        pull_checkpoint(work_dir)  # a URL artifact root: the store's newest checkpoint, when newer (else a no-op)
    ck = good_checkpoint(work_dir) if acc.is_main_process else None
    if acc.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        ck = broadcast_object_list([ck])[0]
    return ck
