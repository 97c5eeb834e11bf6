"""The transformers backend of :mod:`redi.generate`: batched ``model.generate`` with left padding,
``num_return_sequences=n``; same sample schema as vLLM. Slower (docs/benchmarks/eval.md); for machines where
vLLM cannot run. One process, one device (``data_parallel_size`` > 1 is refused by ``open_generator``). A
batch of ``hf_batch_size`` problems samples from one torch seed (its first problem's), so samples depend on
the batching: a resumed run regenerates any batch not fully saved, whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import interrupt
from .config.evaluate import EvaluateConfig
from .generate import Generator, Request

__all__ = ["HFGenerator"]


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class HFGenerator(Generator):
    """transformers ``generate``: batched, left padding, ``num_return_sequences=n``."""

    backend = "hf"

    def __init__(self, cfg: EvaluateConfig, model_dir: Path, tokenizer: Any):
        import torch
        from transformers import AutoModelForCausalLM

        super().__init__(cfg, model_dir, tokenizer)
        self.chunk = cfg.hf_batch_size
        self.device = _device()
        dtype = {"auto": "auto", "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[cfg.dtype]
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(self.device).eval()
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def _generate(self, requests: list[Request], params: dict) -> list[list[tuple[list[int], str]]]:
        import torch

        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.full((len(requests), width), self.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(requests):  # left padding: every prompt ends at the same column
            ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids) :] = 1
        max_new = max(1, min(params["max_tokens"], self.ctx - width))
        torch.manual_seed(requests[0].seed)
        sample = params["temperature"] > 0
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device), max_new_tokens=max_new,
                do_sample=sample, temperature=params["temperature"] if sample else None, top_p=params["top_p"] if sample else None,
                top_k=0 if sample else None, num_return_sequences=params["n"], eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.pad, stopping_criteria=_stop_criteria(),
            )
        interrupt.check("generation")  # a stop cut this batch short: its samples must not be kept
        gen = out[:, width:].tolist()  # (B*n, T) rows grouped by prompt
        n, eos = params["n"], self.tokenizer.eos_token_id
        return [[self._cut(gen[i * n + j], eos) for j in range(n)] for i in range(len(requests))]

    @staticmethod
    def _cut(ids: list[int], eos: int) -> tuple[list[int], str]:
        if eos in ids:
            return ids[: ids.index(eos) + 1], "stop"
        return ids, "length"

    def close(self) -> None:
        self.model = None


def _stop_criteria() -> Any:
    """Ends ``generate`` at the next token once a stop is requested (redi.interrupt): a batch of long
    samples on a CPU can take minutes."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _OnStop(StoppingCriteria):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
            return torch.full((input_ids.shape[0],), interrupt.stopping(), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([_OnStop()])
