"""The ranks of a multi-process launch (``accelerate launch`` / ``torchrun``) as the artifact store sees them.

Under a launch every process runs the same command (e.g. ``redi stage sft RECIPE --no-prefect``). Only global
rank 0 builds artifacts and takes their file locks; the other ranks meet it at :func:`barrier` /
:func:`broadcast` and read what it published (see ``redi.artifacts.ArtifactStore.build``). Training stages
run on every rank (``collective=True``), joined by accelerate.

The process group is the one accelerate would create (``PartialState``: NCCL on CUDA, gloo on CPU,
DeepSpeed's when the launch says DeepSpeed), joined before the first stage so that accelerate later
finds it initialised and uses it. The store's own waits go through a separate gloo group whose timeout
(``REDI_DIST_TIMEOUT_S``, default 48 h) covers rank 0 building a long upstream stage (verification of
millions of traces) while the other ranks wait: a CPU socket wait, not a spinning GPU kernel, and not
the 10-30 min default timeout of the training group.
"""

from __future__ import annotations

import atexit
import logging
import os
from datetime import timedelta
from typing import Any

log = logging.getLogger(__name__)

_WAIT_GROUP: Any = None


def world_size() -> int:
    """Processes of this launch (``WORLD_SIZE`` set by torchrun / accelerate launch; 1 otherwise)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """Global rank of this process (0 when not launched)."""
    return int(os.environ.get("RANK", "0"))


def launched() -> bool:
    """True when this process is one of several started by a launcher."""
    return world_size() > 1


def is_main() -> bool:
    return rank() == 0


def init(device: str = "auto") -> None:
    """Join the launch's process group the way accelerate will (no-op when not launched or already joined).

    ``device``: ``cpu`` joins over gloo; ``cuda`` / ``auto`` with a GPU lets accelerate pick NCCL (or DeepSpeed's
    backend). Also creates the store's gloo wait group; every rank must call this at the same point.
    """
    global _WAIT_GROUP
    if not launched() or _WAIT_GROUP is not None:
        return
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        from accelerate import PartialState

        cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
        PartialState(cpu=cpu)
    timeout = timedelta(seconds=float(os.environ.get("REDI_DIST_TIMEOUT_S", 48 * 3600)))
    _WAIT_GROUP = dist.new_group(backend="gloo", timeout=timeout)
    atexit.register(_shutdown)
    log.info("rank %d/%d (pid %d) joined the launch's process group (%s)", rank(), world_size(), os.getpid(),
             dist.get_backend())


def _shutdown() -> None:
    """Meet the other ranks (at most 30 s), then tear the process groups down before the interpreter exits.

    A gloo group left to the interpreter's teardown aborted a finished rank now and then ("terminate called
    without an active exception", exit -6), which the launcher reports as a failed run. The wait is short so
    that a rank that failed still exits soon and the launcher stops the others."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    try:
        dist.monitored_barrier(group=_WAIT_GROUP, timeout=timedelta(seconds=30))
    except Exception as e:  # noqa: BLE001 - a peer already gone; exit anyway
        log.debug("exit barrier: %s", e)
    finally:
        dist.destroy_process_group()


def _group():
    if _WAIT_GROUP is None:
        init()
    return _WAIT_GROUP


def barrier() -> None:
    """Wait until every rank of the launch gets here (no-op when not launched)."""
    if launched():
        import torch.distributed as dist

        dist.barrier(group=_group())


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` (picklable) on every rank (returns ``obj`` itself when not launched)."""
    if not launched():
        return obj
    import torch.distributed as dist

    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0, group=_group())
    return box[0]
