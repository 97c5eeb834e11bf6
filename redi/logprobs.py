"""Completion log-probs (per token or summed per sequence) without materialising (N, V) logits.

:class:`LogProbLM` wraps a transformers causal LM. Its ``forward`` runs the backbone (the decoder
without its LM head), gathers exactly the N hidden states that predict completion tokens (packed or
padded rows alike: prompts and padding never reach the head) and turns them into log-probs chunk by
chunk, so the largest temporary is one chunk's (rows, V) logits instead of (N, V):

- CUDA with ``liger-kernel`` >= 0.8.5 installed: Liger's fused linear cross-entropy with
  ``reduction="none"`` (per-token -log p; Liger recomputes the chunk's logits in backward and
  folds in the per-token gradient; earlier releases computed wrong weight gradients for "none").
- everywhere else, our own autograd Functions. What the trainer asks for (``sequence_logps``) are
  per-sequence sums, whose upstream gradient is one number per sequence: :class:`ChunkedLinearSeqLogp`
  forms ``onehot - softmax`` per chunk in forward and keeps per-sequence weight gradients (S, V, H)
  in fp32 plus the (N, H) hidden-state gradient, so backward only scales them (three head matmuls,
  as full logits). When that buffer would exceed :data:`SEQ_GRAD_BYTES` (1 GiB: more than one sequence
  at Qwen's head), or per-token log-probs are asked for, :class:`ChunkedLinearLogp` runs: its first
  chunks keep ``onehot - softmax`` in the compute dtype up to :data:`KEEP_BYTES` (three head matmuls;
  a short pair at Qwen's head fits whole), the rest keep only the (N,) log-sum-exp and recompute their
  logits in backward (four head matmuls), so a long sequence's memory stays bounded.

Under autocast the head runs in the autocast dtype with fp32 log-softmax, as ``F.linear`` + ``.float()``
does in the plain path; the weight gradient is accumulated in fp32 (the plain path rounds it to bf16).

Why a wrapper module: FSDP and DeepSpeed ZeRO-3 gather sharded parameters only inside the forward of
the module they wrap. The trainer prepares the wrapper, so the backbone and the head weight are used
inside the wrapped forward. ZeRO-3 gathers parameters per submodule, and the head's own forward never
runs here, so the head weight is registered as an external parameter of the wrapper
(``deepspeed.zero.register_external_parameter``) when DeepSpeed is installed.

Departure from the paper's code: the official REDI code uses Liger's kernels through TRL on CUDA;
we do too where available and keep a pure-PyTorch twin that is tested against full logits on CPU.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from .train_backend import TrainingSetupError

log = logging.getLogger(__name__)

CHUNK_BYTES = 512 * 2**20
"""Budget of one chunk's fp32 logits: 512 MiB = 883 rows at Qwen's 151,936-token vocabulary."""

KEEP_BYTES = 2**30
"""Budget of the ``onehot - softmax`` chunks :class:`ChunkedLinearLogp` keeps from forward to backward (in
the compute dtype): 1 GiB = 3,533 rows at Qwen's vocabulary in bf16. Within it a chunk costs three head
matmuls, as full logits do, instead of four (its logits recomputed in backward). Kept chunks are freed
one by one at the start of backward, before any recomputation, so the budget adds less than itself to
the peak of a long sequence (figures in docs/benchmarks/train.md)."""

_UNSUPPORTED = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling")


def chunk_rows(vocab: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk so that a chunk's fp32 logits stay within ``chunk_bytes`` (at least 16)."""
    return max(16, chunk_bytes // (4 * vocab))


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    dev = t.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else t.dtype


class ChunkedLinearLogp(torch.autograd.Function):
    """log softmax(h W^T + b)[target] per row, one chunk of rows at a time.

    Inputs: h (N, H), weight (V, H), bias (V,) or None, targets (N,), rows per chunk, ``keep_bytes``.
    Output: (N,) fp32. Saved for backward: h, the head weight in the compute dtype (as autocast's
    matmul saves it), the (N,) log-sum-exp. When gradients are needed, the first chunks keep their
    ``onehot - softmax`` (rows, V) in the compute dtype while they fit ``keep_bytes`` (see
    :data:`KEEP_BYTES`): backward scales them by the upstream gradient (applied to h's rows, so no
    (rows, V) temporary) and frees each after use. The other chunks recompute their logits in backward
    (one more head matmul). The weight gradient is summed in fp32 over chunks, block by block of the
    vocabulary. A second backward through the same graph (``retain_graph=True``) raises once a kept
    chunk was consumed.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, rows, keep_bytes):
        dt = _compute_dtype(h)
        n, v = h.shape[0], weight.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=h.device)
        lse = torch.empty_like(out)
        grad = any(ctx.needs_input_grad[:3])
        bounds = _chunks(n, rows)
        row_bytes = v * torch.empty((), dtype=dt).element_size()
        kept: list[torch.Tensor] = []
        with torch.autocast(h.device.type, enabled=False), torch.no_grad():
            w, b = weight.to(dt), None if bias is None else bias.to(dt)
            for s, e in bounds:
                t = targets[s:e, None]
                z = F.linear(h[s:e].to(dt), w, b).float()  # (rows, V)
                if grad and e * row_bytes <= keep_bytes:  # chunks [0, e) all fit: keep this one
                    zt = z.gather(1, t)
                    m = z.amax(1, keepdim=True)
                    p = z.sub_(m).exp_()  # exp(z - max), one pass instead of logsumexp's plus softmax's
                    tot = p.sum(1, keepdim=True)
                    lse[s:e] = (m + tot.log()).squeeze(1)
                    out[s:e] = zt.squeeze(1) - lse[s:e]
                    dz = p.div_(tot).neg_().scatter_add_(1, t, torch.ones_like(t, dtype=p.dtype))  # onehot - p
                    kept.append(dz.to(dt))
                else:
                    lse[s:e] = torch.logsumexp(z, dim=-1)
                    out[s:e] = z.gather(1, t).squeeze(1) - lse[s:e]
        ctx.save_for_backward(h, w, b, targets, lse)
        ctx.kept, ctx.bounds, ctx.dt, ctx.w_dtype = kept, bounds, dt, weight.dtype
        ctx.b_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, g):
        h, w, b, targets, lse = ctx.saved_tensors
        dt, kept = ctx.dt, ctx.kept
        if any(k is None for k in kept):
            raise RuntimeError("ChunkedLinearLogp: backward ran twice through kept chunks (retain_graph=True); "
                               "call it with keep_bytes=0 to recompute every chunk instead")
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        gh = torch.empty_like(h) if need_h else None
        gw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
        gb = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device) if need_b else None
        g = g.float()
        with torch.autocast(h.device.type, enabled=False), torch.no_grad():
            for i, (s, e) in enumerate(ctx.bounds):
                gc = g[s:e]
                if i < len(kept):  # d logp_t / d z = onehot(t) - softmax(z), kept from forward; scale rows by g
                    dz, kept[i] = kept[i], None
                    if need_b:
                        gb += gc @ dz.float()
                    if need_h:
                        gh[s:e] = ((dz @ w).float() * gc[:, None]).to(h.dtype)
                    if need_w:
                        _accumulate_weight_grad(gw, dz, (h[s:e].float() * gc[:, None]).to(dt))
                    del dz
                    continue
                hc = h[s:e].to(dt)
                # d logp_t / d z = onehot(t) - softmax(z): scaled by the upstream gradient, (rows, V)
                dz = F.linear(hc, w, b).float().sub_(lse[s:e, None]).exp_().mul_(-gc[:, None])
                dz.scatter_add_(1, targets[s:e, None], gc[:, None])
                if need_b:
                    gb += dz.sum(0)
                dz = dz.to(dt)
                if need_h:
                    gh[s:e] = (dz @ w).to(h.dtype)
                if need_w:
                    _accumulate_weight_grad(gw, dz, hc)
        gw = None if gw is None else gw.to(ctx.w_dtype)
        return gh, gw, None if gb is None else gb.to(ctx.b_dtype), None, None, None


def _chunks(n: int, rows: int) -> list[tuple[int, int]]:
    """[start, end) of ceil(n / rows) chunks whose sizes differ by at most one (so at most ``rows``): 1,024 rows
    at 883 per chunk are two chunks of 512, not 883 + 141 (a small chunk costs a head pass for little work)."""
    k = -(-n // rows)
    if k == 0:
        return []
    cuts = [i * n // k for i in range(k + 1)]
    return list(zip(cuts[:-1], cuts[1:], strict=True))


_VOCAB_BLOCK = 16384


def _accumulate_weight_grad(gw: torch.Tensor, dz: torch.Tensor, hc: torch.Tensor) -> None:
    """gw (V, H) fp32 += dz^T (V, rows) @ hc (rows, H); low-precision products a vocabulary block at a time."""
    if dz.dtype == torch.float32:
        gw.addmm_(dz.t(), hc)
        return
    for v in range(0, gw.shape[0], _VOCAB_BLOCK):
        gw[v:v + _VOCAB_BLOCK] += dz[:, v:v + _VOCAB_BLOCK].t() @ hc


def chunked_token_logps(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                        rows: int | None = None, keep_bytes: int | None = None) -> torch.Tensor:
    """(N,) fp32 log-probs of ``targets`` under ``h @ weight.T + bias`` without (N, V) logits."""
    return ChunkedLinearLogp.apply(h, weight, bias, targets, rows or chunk_rows(weight.shape[0]),
                                   KEEP_BYTES if keep_bytes is None else keep_bytes)


SEQ_GRAD_BYTES = 2**30
"""Largest (S, V, H) fp32 per-sequence weight-gradient buffer of :class:`ChunkedLinearSeqLogp` (1 GiB: one
sequence at Qwen2.5-1.5B's head, 0.93 GB); above it the per-token function recomputes logits in backward.
A pair at that head (1.87 GB) measured +1.5 GB of peak at 4k tokens for no clear speed-up on CPU."""


class ChunkedLinearSeqLogp(torch.autograd.Function):
    """Per-sequence sums (S,) of log softmax(h W^T + b)[target], with the gradients formed in forward.

    The upstream gradient of a sequence's sum is one number g_s for all its tokens, so the weight
    gradient is sum_s g_s G_s with G_s = sum_{i in s} (onehot_i - p_i)^T h_i, and the hidden-state
    gradient is g_s A_i with A_i = (onehot_i - p_i) W. Forward forms G (S, V, H) fp32 and A (N, H) one
    chunk at a time; backward only scales and sums them: three matmuls over the head, as with full
    logits, instead of four with recomputation, for S x V x H x 4 bytes of memory held until backward.
    Inputs: h (N, H), weight (V, H), bias or None, targets (N,), seg (N,) sequence of each token, S, rows.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, seg, n_seqs, rows):
        dt = _compute_dtype(h)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n, v = h.shape[0], weight.shape[0]
        f32 = dict(dtype=torch.float32, device=h.device)
        sums = torch.zeros(n_seqs, **f32)
        a = torch.empty_like(h) if need_h else None
        g_w = torch.zeros(n_seqs, *weight.shape, **f32) if need_w else None
        g_b = torch.zeros(n_seqs, v, **f32) if need_b else None
        with torch.autocast(h.device.type, enabled=False), torch.no_grad():
            w, b = weight.to(dt), None if bias is None else bias.to(dt)
            for s in range(0, n, rows):
                hc, t, sg = h[s:s + rows].to(dt), targets[s:s + rows, None], seg[s:s + rows]
                z = F.linear(hc, w, b).float()  # (rows, V)
                lse = torch.logsumexp(z, dim=-1, keepdim=True)
                sums.index_add_(0, sg, (z.gather(1, t) - lse).squeeze(1))
                dz = z.sub_(lse).exp_().neg_().scatter_add_(1, t, torch.ones_like(t, dtype=z.dtype))  # onehot - p
                if need_b:
                    g_b.index_add_(0, sg, dz)
                dz = dz.to(dt)
                if need_h:
                    a[s:s + rows] = (dz @ w).to(h.dtype)
                if need_w:
                    cuts = [0, *(torch.nonzero(sg[1:] != sg[:-1]).flatten() + 1).tolist(), len(sg)]
                    for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):  # runs of one sequence
                        _accumulate_weight_grad(g_w[int(sg[lo])], dz[lo:hi], hc[lo:hi])
        ctx.save_for_backward(a, g_w, g_b, seg)
        ctx.w_dtype, ctx.b_dtype = weight.dtype, None if bias is None else bias.dtype
        return sums

    @staticmethod
    def backward(ctx, gs):
        a, g_w, g_b, seg = ctx.saved_tensors
        gs = gs.float()
        gh = None if a is None else (a.float() * gs[seg, None]).to(a.dtype)
        gw = None if g_w is None else torch.tensordot(gs, g_w, dims=1).to(ctx.w_dtype)
        gb = None if g_b is None else (gs @ g_b).to(ctx.b_dtype)
        return gh, gw, gb, None, None, None, None


def chunked_sequence_logps(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                           seg: torch.Tensor, n_seqs: int, rows: int | None = None) -> torch.Tensor:
    """(S,) summed log-probs per sequence: :class:`ChunkedLinearSeqLogp` when gradients are needed and its
    buffer fits :data:`SEQ_GRAD_BYTES`, else the per-token chunked function summed (no gradient work
    under ``torch.no_grad``)."""
    rows = rows or chunk_rows(weight.shape[0])
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (h, weight, bias))
    if grad and n_seqs * weight.numel() * 4 <= SEQ_GRAD_BYTES:
        return ChunkedLinearSeqLogp.apply(h, weight, bias, targets, seg, n_seqs, rows)
    lp = ChunkedLinearLogp.apply(h, weight, bias, targets, rows, KEEP_BYTES)
    return torch.zeros(n_seqs, dtype=lp.dtype, device=lp.device).index_add(0, seg, lp)


@cache
def liger_available() -> bool:
    """liger-kernel >= 0.8.5 importable (earlier releases give wrong weight grads for reduction="none")."""
    if importlib.util.find_spec("liger_kernel") is None:
        return False
    from importlib.metadata import version

    from packaging.version import Version

    try:
        ok = Version(version("liger-kernel")) >= Version("0.8.5")
        if ok:
            import liger_kernel.transformers.functional  # noqa: F401
    except Exception as e:  # noqa: BLE001 - a broken optional kernel must not stop training
        log.warning("liger-kernel is installed but unusable (%s); using the chunked log-prob path", e)
        return False
    if not ok:
        log.warning("liger-kernel %s < 0.8.5 computes wrong gradients for reduction='none'; using the chunked path",
                    version("liger-kernel"))
    return ok


def liger_token_logps(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      targets: torch.Tensor) -> torch.Tensor:
    """(N,) fp32 log-probs through Liger's fused linear cross-entropy (CUDA only)."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    dt = _compute_dtype(h)
    nll = liger_fused_linear_cross_entropy(h.to(dt), weight.to(dt), targets, bias=None if bias is None else bias.to(dt),
                                           reduction="none", accum_dtype=torch.float32)
    return -nll.float()


def head_token_logps(h: torch.Tensor, head: nn.Module, targets: torch.Tensor, kernel: str = "auto",
                     rows: int | None = None, seg: torch.Tensor | None = None, n_seqs: int | None = None) -> torch.Tensor:
    """Log-probs of ``targets`` (N,) given hidden states (N, H) and the LM head; ``kernel`` in auto|liger|chunked.

    With ``seg`` (N,) and ``n_seqs``: the per-sequence sums (S,) instead.
    """
    bias = getattr(head, "bias", None)
    if kernel == "liger" or (kernel == "auto" and h.is_cuda and liger_available()):
        lp = liger_token_logps(h, head.weight, bias, targets)
    elif seg is not None:
        return chunked_sequence_logps(h, head.weight, bias, targets, seg, n_seqs, rows)
    else:
        lp = chunked_token_logps(h, head.weight, bias, targets, rows)
    return lp if seg is None else torch.zeros(n_seqs, dtype=lp.dtype, device=lp.device).index_add(0, seg, lp)


def _register_zero3(module: nn.Module, param: nn.Parameter) -> None:
    """Tell ZeRO-3 that ``module``'s forward uses ``param`` (a no-op record for other backends).

    Only when DeepSpeed is already imported: accelerate imports it when a DeepSpeed config is
    launched, before the trainer builds the model; plain runs never pay for the import.
    """
    ds = sys.modules.get("deepspeed")
    zero = getattr(ds, "zero", None)
    if zero is not None and hasattr(zero, "register_external_parameter"):
        zero.register_external_parameter(module, param)


class LogProbLM(nn.Module):
    """A causal LM whose forward returns per-token completion log-probs (N,) instead of logits.

    ``kernel``: auto (Liger on CUDA when usable, else chunked) | liger | chunked; ``rows``: rows per
    chunk (default from :data:`CHUNK_BYTES`); ``split``: run packed sequences one by one (None = auto).

    ``forward(input_ids (R, C), keep (N,), targets (N,), position_ids=None, attention_mask=None, seg=None,
    n_seqs=None)``: ``keep`` are flat positions (row * C + column) whose next-token prediction is
    ``targets``; returns (N,) log-probs, or with ``seg`` (N,) the (S,) per-sequence sums (cheaper in
    backward, see :class:`ChunkedLinearSeqLogp`).
    On CUDA without flash-attention, packed rows are split at position-id restarts (padded rows at
    their padding) and every sequence runs as its own (1, L) forward with no mask (SDPA then uses its
    causal flash kernel, not a dense (C, C) block or padding mask).
    """

    def __init__(self, lm: nn.Module, kernel: str = "auto", rows: int | None = None, split: bool | None = None):
        super().__init__()
        if kernel not in ("auto", "liger", "chunked"):
            raise ValueError(f"log-prob kernel must be auto, liger or chunked, got {kernel!r}")
        cfg = getattr(lm, "config", None)
        bad = [k for k in _UNSUPPORTED if getattr(cfg, k, None) not in (None, 1.0, 0.0)]
        if bad:
            raise TrainingSetupError(f"{type(lm).__name__} scales or caps its logits ({', '.join(bad)}); LogProbLM's head "
                                     "does not apply that: train this model with the plain logits path")
        self.lm, self.kernel, self.rows, self.split = lm, kernel, rows, split
        _register_zero3(self, lm.get_output_embeddings().weight)

    @property
    def config(self):
        return self.lm.config

    @property
    def _no_split_modules(self):
        return getattr(self.lm, "_no_split_modules", None)

    # accelerate's FSDP2 preparation calls these and tie_weights (below) on the module it wraps: without
    # tie_weights the tied embedding / LM head (Qwen2.5-1.5B ties them) come back from its meta-device move
    # as two separate parameters (seen on CPU/gloo: 27 parameters instead of 26, different gradients from DDP).
    def get_input_embeddings(self):
        return self.lm.get_input_embeddings()

    def get_output_embeddings(self):
        return self.lm.get_output_embeddings()

    def tie_weights(self, *args, **kwargs):
        """accelerate's FSDP2 preparation re-ties embeddings through this (Qwen2.5-1.5B ties them)."""
        return self.lm.tie_weights(*args, **kwargs)

    def split_sequences(self, device: torch.device) -> bool:
        """True where packed rows run sequence by sequence (CUDA attention other than flash varlen)."""
        if self.split is not None:
            return self.split
        impl = getattr(self.lm.config, "_attn_implementation", "sdpa")
        return device.type == "cuda" and not str(impl).startswith("flash")

    def forward(self, input_ids: torch.Tensor, keep: torch.Tensor, targets: torch.Tensor,
                position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                seg: torch.Tensor | None = None, n_seqs: int | None = None) -> torch.Tensor:
        backbone = self.lm.get_decoder()
        if self.split_sequences(input_ids.device):
            if position_ids is None:  # right-padded rows: the padding becomes its own (skipped) segment
                position_ids = _padded_positions(attention_mask)
            h = _split_hidden(backbone, input_ids, position_ids, keep)  # (N, H)
        else:
            kw = {"position_ids": position_ids} if position_ids is not None else {"attention_mask": attention_mask}
            if position_ids is not None and getattr(self.lm.config, "_attn_implementation", None) == PACKED_SDPA:
                kw["cu_seq_lens_q"] = _segment_offsets(position_ids)
            hs = backbone(input_ids=input_ids, use_cache=False, **kw).last_hidden_state  # (R, C, H)
            h = hs.reshape(-1, hs.shape[-1]).index_select(0, keep)  # (N, H)
        return head_token_logps(h, self.lm.get_output_embeddings(), targets, self.kernel, self.rows, seg, n_seqs)


def _padded_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of right-padded rows (B, L): 0..n-1 over the real tokens, restarting at 0 on the padding."""
    cols = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    n = mask.sum(1, keepdim=True)
    return torch.where(cols < n, cols, cols - n)


def _split_hidden(backbone, input_ids, position_ids, keep) -> torch.Tensor:
    """Hidden states at ``keep`` (N, H), running each packed sequence alone as a (1, L) row without a mask."""
    width = input_ids.shape[1]
    starts = (position_ids == 0).nonzero().tolist()  # [(row, col)], row-major
    ends = starts[1:] + [(input_ids.shape[0], 0)]
    keep_l = keep.tolist()
    out, k = [], 0
    for (r, c0), (r1, c1) in zip(starts, ends, strict=True):
        c_end = c1 if r1 == r else width
        lo, hi = r * width + c0, r * width + c_end
        j = k
        while j < len(keep_l) and keep_l[j] < hi:
            j += 1
        if j > k:  # sequences without completion tokens (row padding) are skipped
            hs = backbone(input_ids=input_ids[r:r + 1, c0:c_end], position_ids=position_ids[r:r + 1, c0:c_end],
                          use_cache=False).last_hidden_state[0]  # (L, H)
            out.append(hs.index_select(0, keep[k:j] - lo))
        k = j
    return torch.cat(out)


PACKED_SDPA = "redi_packed_sdpa"
"""transformers attention name of :func:`packed_sdpa_attention` (registered by :func:`register_packed_sdpa`)."""


def packed_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                          cu_seq_lens_q=None, **kwargs):
    """SDPA sequence by sequence inside packed rows: the CPU twin of flash-attention's varlen path.

    With ``cu_seq_lens_q`` (offsets of the packed sequences in the flattened (R x C) rows, as
    :class:`LogProbLM` passes them through the backbone's kwargs; a row's padding is its own segment)
    each sequence runs as its own causal SDPA call without a mask, so attention costs sum(L_i^2)
    instead of R x C^2 (SDPA with transformers' block-diagonal mask computes every masked block).
    Gradient checkpointing recomputes a layer with the same kwargs, so the split holds there too.
    Without the offsets but with packed ``position_ids`` and no mask (a training forward: :func:`packed_sdpa_mask`
    builds none), the offsets come from the position ids' restarts at 0, so a caller that packs rows without
    passing ``cu_seq_lens_q`` still gets attention per sequence.
    Otherwise (padded batches, generation with a cache), this is transformers' own SDPA with its mask.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    if (cu_seq_lens_q is None and attention_mask is None and position_ids is not None
            and query.shape[2] == key.shape[2] == position_ids.shape[-1]):
        cu_seq_lens_q = _segment_offsets(position_ids.expand(query.shape[0], -1))
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    width = query.shape[2]
    cuts = cu_seq_lens_q.tolist()
    rows: list[list[torch.Tensor]] = [[] for _ in range(query.shape[0])]
    for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
        r, a = divmod(lo, width)
        b = a + hi - lo
        out, _ = sdpa_attention_forward(module, query[r:r + 1, :, a:b], key[r:r + 1, :, a:b], value[r:r + 1, :, a:b],
                                        None, dropout=dropout, scaling=scaling, is_causal=True)  # (1, L, heads, D)
        rows[r].append(out)
    return torch.cat([torch.cat(parts, dim=1) for parts in rows]), None


def packed_sdpa_mask(*args, attention_mask=None, q_length=None, kv_length=None, q_offset=0, kv_offset=0,
                     **kwargs):
    """The mask transformers builds for :data:`PACKED_SDPA`: none for a training forward without padding.

    transformers' ``sdpa_mask`` turns packed position ids into a dense (R, 1, W, W) block-diagonal bool mask
    (for a pair of two 19k-token traces in one row, 1.5 GB per forward, plus its construction temporaries),
    which :func:`packed_sdpa_attention` never reads: it splits the row at the position ids' restarts instead.
    So without a 2-D padding mask and without a cache offset (queries = keys, from position 0) no mask is
    built; padded batches and generation get ``sdpa_mask``'s own.
    """
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and q_length == kv_length and _is_zero(q_offset) and _is_zero(kv_offset):
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, **kwargs)


def _is_zero(offset) -> bool:
    return (int(offset) if isinstance(offset, torch.Tensor) else offset) == 0


def register_packed_sdpa() -> str:
    """Register :func:`packed_sdpa_attention` and its mask (:func:`packed_sdpa_mask`) with transformers and return
    the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_SDPA, packed_sdpa_mask)
    return PACKED_SDPA


def _segment_offsets(position_ids: torch.Tensor) -> torch.Tensor:
    """(S + 1,) int32 offsets in the flattened rows where a packed sequence starts (position id 0, and each row's start)."""
    r, c = position_ids.shape
    starts = position_ids.reshape(-1) == 0
    starts[::c] = True
    idx = starts.nonzero().flatten()
    return torch.cat([idx, idx.new_tensor([r * c])]).to(torch.int32)


def resolve_attn(impl: str, device: str, mixed_precision: str = "bf16") -> str:
    """``auto`` -> flash_attention_2 on CUDA when flash-attn is importable, the training runs in bf16 / fp16
    (``mixed_precision``, as :func:`redi.train.resolve_device` gives it) and the GPU is Ampere or newer, else
    sdpa (``LogProbLM`` then runs packed sequences one by one); on any other device :data:`PACKED_SDPA`, registered
    and returned (the fastest CPU layout measured, docs/benchmarks/train.md); other names unchanged.

    flash-attn takes only fp16 / bf16 inputs and transformers casts q/k/v to the autocast dtype only under
    autocast: with fp32 training (``dtype: float32``, or ``auto`` on a GPU without bf16) it would raise at the
    first step, so ``auto`` does not pick it there and a named ``flash_attention_2`` is refused."""
    if impl == PACKED_SDPA:
        return register_packed_sdpa()
    if impl == "flash_attention_2" and device == "cuda" and mixed_precision not in ("bf16", "fp16"):
        raise TrainingSetupError("attn_implementation flash_attention_2 needs bf16 training, but this run trains in fp32 "
                                 "(dtype: float32, or a GPU without bf16): set dtype: bfloat16 or attn_implementation: sdpa")
    if impl != "auto":
        return impl
    if device == "cuda":
        from transformers.utils import is_flash_attn_2_available

        if (is_flash_attn_2_available() and mixed_precision in ("bf16", "fp16")
                and torch.cuda.get_device_capability() >= (8, 0)):
            return "flash_attention_2"
        return "sdpa"
    return register_packed_sdpa()


def unwrap_logprob(model: nn.Module) -> LogProbLM | None:
    """The LogProbLM inside ``model`` (itself, or wrapped by DDP / DeepSpeed / FSDP1 / torch.compile), else None."""
    for _ in range(4):
        if isinstance(model, LogProbLM):
            return model
        model = getattr(model, "module", None) or getattr(model, "_orig_mod", None) or getattr(model, "_fsdp_wrapped_module", None)
        if model is None:
            return None
    return None


def full_logits_token_logps(model: nn.Module, input_ids, keep, targets, position_ids=None, attention_mask=None):
    """The former path, for tests and benchmarks: (N, V) fp32 logits through the model's own forward.

    ``logits_to_keep`` takes the union of the needed columns over all rows, so with several rows it
    computes more than N rows of logits.
    """
    width = input_ids.shape[1]
    row, col = keep // width, keep % width  # (N,), (N,)
    cols = torch.unique(col)
    kw = {"position_ids": position_ids} if position_ids is not None else {"attention_mask": attention_mask}
    out = model(input_ids=input_ids, use_cache=False, logits_to_keep=cols, **kw)
    logits = out.logits[row, torch.searchsorted(cols, col)].float()  # (N, V)
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (N,)
