"""How a run's processes are set up and launched: offline mode, the device, and the training stages run in
this process or under ``accelerate launch`` (``run.launcher``)."""

from __future__ import annotations

import json
import logging
import os
from contextvars import ContextVar
from pathlib import Path

from . import distributed, interrupt, tracking
from .config import Recipe, recipe_to_yaml

log = logging.getLogger(__name__)

ASSIGNED_GPUS: ContextVar[tuple[str, ...] | None] = ContextVar("redi_assigned_gpus", default=None)
"""The GPUs a scheduler gave the node running in this context (the flow runs nodes side by side in threads, and
``CUDA_VISIBLE_DEVICES`` is per process): the vLLM engines and ``accelerate launch`` children it starts see only
these. None: every GPU the process sees."""


def gpu_env() -> dict[str, str]:
    """``CUDA_VISIBLE_DEVICES`` for a child process of the current node, if a scheduler assigned it GPUs."""
    gpus = ASSIGNED_GPUS.get()
    return {} if gpus is None else {"CUDA_VISIBLE_DEVICES": ",".join(gpus)}


def go_offline() -> None:
    """Make every Hugging Face call of this process fail at once instead of retrying the network."""
    import sys

    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    # Both libraries read these at import time: tell the already-imported ones too.
    if "huggingface_hub" in sys.modules:
        import huggingface_hub.constants as hc

        hc.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        import datasets.config as dc

        dc.HF_HUB_OFFLINE = True
        if hasattr(dc, "HF_DATASETS_OFFLINE"):
            dc.HF_DATASETS_OFFLINE = True


def auto_device(device: str) -> str:
    """``run.device``: ``auto`` -> cuda when available, else cpu (redi.train.resolve_device also picks the dtype)."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def train_stage(recipe: Recipe, which: str, model_dir: Path, data: Path, out: Path, work: Path) -> dict:
    """Run training stage `which` (``sft`` or ``stage2``) in this process, or under `accelerate launch` (run.launcher).

    Already one of N launched processes (``accelerate launch -m redi.cli ...``): every rank trains here,
    whatever run.launcher says. ``launcher=accelerate`` from a single process starts
    ``accelerate launch [--multi_gpu] --num_processes N -m redi.train``: ``--multi_gpu`` whenever N > 1
    and no accelerate config is given, because without it (and without a GPU) accelerate starts ONE
    process; with it accelerate goes through torchrun, which also works on CPU (gloo).
    """
    from . import train

    run = recipe.run
    device = auto_device(run.device)
    if run.launcher == "inprocess" or distributed.launched():
        if run.launcher == "accelerate":
            log.info("already launched as %d processes: training in them (run.launcher ignored)",
                     distributed.world_size())
        fn = train.train_sft if which == "sft" else train.train_stage2
        return fn(recipe.sft if which == "sft" else recipe.redi, model_dir, data, out, work, device,
                  recipe.prompt.train)
    import subprocess

    recipe_file = work / "recipe.yaml"
    recipe_file.write_text(recipe_to_yaml(recipe))
    cmd = accelerate_command(run, device) + [
        "-m", "redi.train", which, "--recipe", str(recipe_file), "--model-dir", str(model_dir),
        "--data", str(data), "--out", str(out), "--work", str(work), "--device", device]
    log.info("launching: %s", " ".join(cmd))
    proc = subprocess.Popen(cmd, env={**os.environ, **tracking.child_env(), **gpu_env()})  # the child logs to this node's run
    try:
        while proc.poll() is None:
            try:
                proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                interrupt.check(f"{which} launch")
    finally:
        if proc.poll() is None:  # stopped (or an error here): the launch and its ranks must not train on
            terminate_tree(proc.pid)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return json.loads((out / "summary.json").read_text())


def accelerate_command(run, device: str) -> list[str]:
    """``accelerate launch ...`` arguments (up to the module to run) for run.launcher=accelerate on one machine."""
    import sys

    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if run.accelerate_config:
        cmd += ["--config_file", run.accelerate_config]
    if run.num_processes:
        cmd += ["--num_processes", str(run.num_processes)]
        if run.num_processes > 1 and not run.accelerate_config:
            cmd += ["--multi_gpu", "--num_machines", "1", "--main_process_port", str(free_port())]
    if not run.accelerate_config:  # the trainer picks its precision itself (recipe dtype)
        cmd += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    return cmd


def free_port() -> int:
    """A free local TCP port for the launch's rendezvous (two launches at once must not share 29500)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def terminate_tree(pid: int, grace: float = 20.0) -> None:
    """SIGTERM a launch and every rank under it (accelerate's single-process launcher does not forward
    it to its child), SIGKILL what is left after ``grace`` seconds."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return
    interrupt.end_processes(procs, grace)
