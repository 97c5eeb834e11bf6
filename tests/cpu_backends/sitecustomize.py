"""Test shim (on PYTHONPATH only in tests/test_distributed.py's CPU backend tests): let accelerate 1.15 run an
FSDP or DeepSpeed launch config on CPU processes over gloo.

accelerate turns ``ACCELERATE_USE_FSDP`` / ``ACCELERATE_USE_DEEPSPEED`` into FSDP / DeepSpeed only on
accelerators (``redi.train_backend.check_backend`` refuses the silent DDP fallback). torch's FSDP2 and
DeepSpeed's CPU accelerator both run over gloo, so with this shim the trainer's real FSDP / DeepSpeed code
paths (prepare, the sharded reference, update norms from sharded optimiser state, sharded checkpoints,
resume, the gathered final save) run here, 2 processes on CPU. Only the state's distributed type is
changed; nothing of the trainer is replaced.

With ``REDI_TEST_KILL_AT_STEP=N`` it also registers a ``redi.train.CHECKPOINT_HOOKS`` hook that raises right
after checkpoint N in every process (a kill at a known point, for the resume checks).
"""

import os

if os.environ.get("REDI_TEST_CPU_BACKEND") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
    import accelerate.state as _st
    from accelerate.utils import DistributedType

    _orig = _st.AcceleratorState.__init__

    def _init(self, *args, **kwargs):
        _orig(self, *args, **kwargs)
        if self.distributed_type != DistributedType.MULTI_CPU:
            return
        if os.environ.get("ACCELERATE_USE_FSDP", "false") == "true" and kwargs.get("fsdp_plugin") is not None:
            self.distributed_type = _st.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.fsdp_plugin = kwargs["fsdp_plugin"]
        elif os.environ.get("ACCELERATE_USE_DEEPSPEED", "false") == "true" and kwargs.get("deepspeed_plugin") is not None:
            plugin = kwargs["deepspeed_plugin"]
            self.distributed_type = _st.PartialState._shared_state["distributed_type"] = DistributedType.DEEPSPEED
            plugin.set_mixed_precision(self._mixed_precision)
            plugin.select(_from_accelerator_state=True)
            self.deepspeed_plugins = plugin

    _st.AcceleratorState.__init__ = _init

if os.environ.get("REDI_TEST_KILL_AT_STEP"):  # stop every process of a launch right after this step's checkpoint
    _kill_at = int(os.environ["REDI_TEST_KILL_AT_STEP"])

    def _kill_hook(step: int) -> None:
        if step == _kill_at:
            raise RuntimeError(f"simulated kill after step {step}")

    import redi.train as _train

    _train.CHECKPOINT_HOOKS.append(_kill_hook)
