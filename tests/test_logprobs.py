"""redi.logprobs: chunked log-probs equal the full-logits path (values and gradients), on a tiny Qwen2."""

import sys
import types

import pytest
import torch

from redi.logprobs import (
    PACKED_SDPA,
    ChunkedLinearLogp,
    ChunkedLinearSeqLogp,
    LogProbLM,
    full_logits_token_logps,
    resolve_attn,
)
from redi.packing import Example, collate, row_budget, sequence_logps


def _model(tied: bool, vocab: int = 300, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, tie_word_embeddings=tied, attn_implementation="sdpa")
    return Qwen2ForCausalLM(cfg).train()


def _examples(vocab: int = 300) -> list[Example]:
    g = torch.Generator().manual_seed(1)
    shapes = [(20, 8), (12, 3), (53, 20), (7, 1), (90, 10)]  # uneven lengths, one long one
    return [Example(tuple(torch.randint(0, vocab, (n,), generator=g).tolist()), p) for n, p in shapes]


def _grads(model) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("layout", ["packed_rows", "packed_one_row", "padded"])
@pytest.mark.parametrize("per", ["token", "token_kept_part", "token_recomputed", "sequence"])
def test_chunked_equals_full_logits_values_and_gradients(tied, layout, per, monkeypatch):
    """Per token (chunks kept from forward, 4 of 20 kept, all recomputed in backward) and per sequence
    (gradients formed in forward), 7-row chunks."""
    import redi.logprobs as L

    # 300-token vocabulary in fp32: 1,200 bytes per kept row; 30 rows of budget keep the first four 7-row chunks
    monkeypatch.setattr(L, "KEEP_BYTES", {"token": L.KEEP_BYTES, "token_kept_part": 1200 * 30,
                                          "token_recomputed": 0, "sequence": L.KEEP_BYTES}[per])
    per = "sequence" if per == "sequence" else "token"
    m = _model(tied)
    packed = layout != "padded"
    b = collate(_examples(), packed=packed, pad_id=0, row_tokens=100 if layout == "packed_rows" else None)
    n = b.targets.numel() if per == "token" else b.n_seqs
    w = torch.randn(n, generator=torch.Generator().manual_seed(2))  # an arbitrary upstream gradient
    seq = {"seg": b.seg, "n_seqs": b.n_seqs} if per == "sequence" else {}
    m.zero_grad()
    ref = full_logits_token_logps(m, b.input_ids, b.keep, b.targets, b.position_ids, b.attention_mask)
    if per == "sequence":
        ref = torch.zeros(b.n_seqs).index_add(0, b.seg, ref)
    (ref * w).sum().backward()
    g_ref = _grads(m)
    m.zero_grad()
    lp = LogProbLM(m, kernel="chunked", rows=7)(b.input_ids, b.keep, b.targets, b.position_ids, b.attention_mask, **seq)
    (lp * w).sum().backward()
    g = _grads(m)
    assert lp.dtype == torch.float32 and lp.shape == ref.shape
    # 1e-5 per token; a sequence's sum of L token log-probs (fp32, summed in another order) gets L x 1e-5
    tol = 1e-5 * (torch.bincount(b.seg, minlength=b.n_seqs).float() if per == "sequence" else torch.ones(n))
    assert ((lp - ref).abs() <= tol).all(), (lp - ref).abs().max().item()
    assert g.keys() == g_ref.keys()
    for k in g:
        assert (g[k] - g_ref[k]).abs().max().item() < 1e-5, k


@pytest.mark.parametrize("keep_rows", [0, 8, 11])
def test_linear_functions_with_bias_match_autograd(keep_rows):
    """11 rows in chunks of 4, 4, 3: none, the first two or all three chunks kept from forward."""
    torch.manual_seed(0)
    h = torch.randn(11, 8, requires_grad=True)
    lin = torch.nn.Linear(8, 37)
    t = torch.randint(0, 37, (11,))
    seg = torch.tensor([0, 0, 0, 2, 2, 1, 1, 1, 1, 0, 0])  # runs of sequences, one sequence in two runs
    g, gs = torch.randn(11), torch.randn(3)
    ref = torch.log_softmax(lin(h), -1).gather(1, t[:, None]).squeeze(1)
    params = [h, lin.weight, lin.bias]
    out = ChunkedLinearLogp.apply(h, lin.weight, lin.bias, t, 4, keep_rows * 37 * 4)
    assert len(out.grad_fn.kept) == {0: 0, 8: 2, 11: 3}[keep_rows]
    assert torch.allclose(out, ref, atol=1e-6)
    ref_g = torch.autograd.grad((ref * g).sum(), params, retain_graph=True)
    for a, b in zip(torch.autograd.grad((out * g).sum(), params), ref_g, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    ref_s = torch.zeros(3).index_add(0, seg, ref)
    out_s = ChunkedLinearSeqLogp.apply(h, lin.weight, lin.bias, t, seg, 3, 4)
    assert torch.allclose(out_s, ref_s, atol=1e-6)
    for a, b in zip(torch.autograd.grad((out_s * gs).sum(), params), torch.autograd.grad((ref_s * gs).sum(), params),
                    strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_kept_chunks_are_freed_after_backward_and_a_second_backward_is_a_clear_error():
    torch.manual_seed(0)
    h, w, t = torch.randn(10, 8, requires_grad=True), torch.randn(37, 8, requires_grad=True), torch.randint(0, 37, (10,))
    out = ChunkedLinearLogp.apply(h, w, None, t, 4, 10**6)
    assert [k.shape for k in out.grad_fn.kept] == [(3, 37), (3, 37), (4, 37)]  # chunks of near-equal size
    out.sum().backward(retain_graph=True)
    assert out.grad_fn.kept == [None, None, None]
    with pytest.raises(RuntimeError, match="keep_bytes=0"):
        out.sum().backward()
    with torch.no_grad():  # no gradients asked for: nothing kept
        assert ChunkedLinearLogp.apply(h, w, None, t, 4, 10**6).grad_fn is None


def test_only_completion_hidden_states_reach_the_head(monkeypatch):
    """A 3-token and a 60-token completion in two rows: the head sees exactly 3 + 60 rows."""
    import redi.logprobs as L

    seen = []
    real = L.head_token_logps
    monkeypatch.setattr(L, "head_token_logps", lambda h, *a, **k: seen.append(h.shape[0]) or real(h, *a, **k))
    short, long = Example(tuple(range(10, 20)), 7), Example(tuple(range(30, 100)), 10)
    b = collate([short, long], packed=True, row_tokens=70)  # two rows of width 70
    assert b.input_ids.shape[0] == 2
    sums, lens = sequence_logps(_model(True).eval(), b)
    assert seen == [3 + 60] and lens.tolist() == [3, 60]
    # the former path's logits_to_keep took the union of both rows' columns: 2 rows x 63 columns of logits
    cols = torch.unique(b.keep % b.input_ids.shape[1])
    assert b.input_ids.shape[0] * cols.numel() == 126


@pytest.mark.parametrize("packed", [True, False])
def test_split_sequences_path_equals_rows_path(packed):
    """The CUDA path without flash-attention (each sequence alone, no mask), forced on CPU; packed or padded rows."""
    m = _model(True).eval()
    b = collate(_examples(), packed=packed, row_tokens=100)
    with torch.no_grad():
        rows = LogProbLM(m, split=False)(b.input_ids, b.keep, b.targets, b.position_ids, b.attention_mask)
        alone = LogProbLM(m, split=True)(b.input_ids, b.keep, b.targets, b.position_ids, b.attention_mask)
    assert torch.allclose(rows, alone, atol=1e-5)


@pytest.mark.parametrize("keep", [True, False])
def test_bf16_autocast_close_to_full_logits(keep, monkeypatch):
    import redi.logprobs as L

    monkeypatch.setattr(L, "KEEP_BYTES", L.KEEP_BYTES if keep else 0)
    m = _model(False)
    b = collate(_examples(), packed=True, row_tokens=100)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = full_logits_token_logps(m, b.input_ids, b.keep, b.targets, b.position_ids)
        lp = LogProbLM(m, rows=16)(b.input_ids, b.keep, b.targets, b.position_ids)
    assert lp.dtype == torch.float32 and (lp - ref).abs().max().item() < 2e-2
    gw = torch.autograd.grad(lp.sum(), m.lm_head.weight)[0]
    assert gw.dtype == torch.float32 and torch.isfinite(gw).all()


_DDP_CHECK = """
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
import test_logprobs as t
from redi.logprobs import LogProbLM, unwrap_logprob
from redi.packing import collate, sequence_logps
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
m = t._model(True)
ddp = DDP(LogProbLM(m, rows=9))
assert unwrap_logprob(ddp) is ddp.module
sums, _ = sequence_logps(ddp, collate(t._examples(), packed=True, row_tokens=100))
sums.sum().backward()
assert m.model.embed_tokens.weight.grad is not None and m.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0
print("ddp-ok", flush=True)
import os; os._exit(0)
"""


def test_works_inside_ddp():
    """The wrapper is what DDP wraps: gradients reach the head and the backbone through DDP's forward.

    In a child process with a deadline: freeing a DDP reducer after its gloo group can block in the group's
    destructor (seen once in a full run), and a test must not hang the suite."""
    import subprocess
    from pathlib import Path

    here = Path(__file__).resolve().parent
    env = {**__import__("os").environ, "PYTHONPATH": f"{here.parent}:{here}", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _DDP_CHECK], capture_output=True, text=True, timeout=180, env=env)
    assert out.returncode == 0 and "ddp-ok" in out.stdout, out.stderr[-2000:]


def test_zero3_registers_the_head_as_external_parameter(monkeypatch):
    calls = []
    fake = types.ModuleType("deepspeed")
    fake.zero = types.SimpleNamespace(register_external_parameter=lambda mod, p: calls.append((mod, p)))
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    m = _model(False)
    w = LogProbLM(m)
    assert calls == [(w, m.lm_head.weight)]


def test_bad_kernel_and_capped_logits_are_clear_errors():
    m = _model(True)
    with pytest.raises(ValueError, match="kernel must be auto, liger or chunked"):
        LogProbLM(m, kernel="fused")
    m.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        LogProbLM(m)


def test_attention_and_row_layout_resolution():
    assert resolve_attn("auto", "cpu") == PACKED_SDPA and resolve_attn("eager", "cuda") == "eager"
    assert resolve_attn(PACKED_SDPA, "cpu") == PACKED_SDPA and resolve_attn("sdpa", "cpu") == "sdpa"
    assert row_budget("cpu", 512, "auto") is None  # the CPU default: one row, attention per sequence
    # one padding-free row where attention runs per packed sequence; rows of pack_tokens under a block mask
    assert row_budget("cpu", 512, PACKED_SDPA) is None and row_budget("cuda", 512, "sdpa") is None
    assert row_budget("cpu", 512, "sdpa") == 512 and row_budget("cpu", 512, "eager") == 512


@pytest.mark.parametrize("flash, mp, capability, want", [
    (True, "bf16", (9, 0), "flash_attention_2"), (True, "no", (9, 0), "sdpa"), (True, "bf16", (7, 5), "sdpa"),
    (False, "bf16", (9, 0), "sdpa")])
def test_cuda_attention_picks_flash_only_where_it_can_run(flash, mp, capability, want, monkeypatch):
    """No GPU here: flash-attn's import check and the device's compute capability stand in. flash-attn takes only
    bf16 / fp16 on Ampere or newer, so auto falls back to sdpa for fp32 training or an older GPU, and a named
    flash_attention_2 with fp32 training is refused (by the config before any start-up, and here)."""
    import transformers.utils

    from redi.config import SFTConfig

    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: flash)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    assert resolve_attn("auto", "cuda", mp) == want
    if mp == "no":
        with pytest.raises(ValueError, match="flash_attention_2 needs bf16 training"):
            resolve_attn("flash_attention_2", "cuda", mp)
        with pytest.raises(ValueError, match="flash_attention_2 needs bf16 training"):
            SFTConfig(attn_implementation="flash_attention_2", dtype="float32")


def test_gradient_checkpointing_inside_the_wrapper_gives_the_same_gradients():
    b = collate(_examples(), packed=True, row_tokens=100)
    grads = []
    for ckpt in (False, True):
        m = _model(True)
        if ckpt:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        sums, _ = sequence_logps(LogProbLM(m, rows=16).train(), b)
        sums.sum().backward()
        grads.append(_grads(m))
    assert all(torch.allclose(grads[0][k], grads[1][k], atol=1e-6) for k in grads[0])


@pytest.mark.parametrize("layout", ["packed_rows", "packed_one_row", "padded"])
def test_packed_sdpa_equals_sdpa_with_its_mask(layout, monkeypatch):
    """CPU attention per packed sequence (PACKED_SDPA): same values and gradients as SDPA with transformers'
    block-diagonal mask, with and without gradient checkpointing (a layer recomputed with the same kwargs);
    packed rows make one causal, mask-free SDPA call per sequence (and per row's padding); padded batches
    fall back to SDPA with the padding mask."""
    import torch.nn.functional as F

    b = collate(_examples(), packed=layout != "padded", row_tokens=100 if layout == "packed_rows" else None)
    w = torch.arange(1.0, 6.0)
    ref_m = _model(True)
    ref, _ = sequence_logps(LogProbLM(ref_m, rows=16), b)
    (ref * w).sum().backward()
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append((k.get("attn_mask") is None, k.get("is_causal"))) or real(*a, **k))
    for ckpt in (False, True):
        m = _model(True)
        m.config._attn_implementation = resolve_attn(PACKED_SDPA, "cpu")
        if ckpt:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        calls.clear()
        got, _ = sequence_logps(LogProbLM(m, rows=16), b)
        (got * w).sum().backward()
        assert (got - ref).abs().max().item() < 1e-5
        grads, ref_g = _grads(m), _grads(ref_m)
        assert all((grads[k] - ref_g[k]).abs().max().item() < 1e-5 for k in ref_g)
        if layout == "padded":
            assert calls and not any(no_mask for no_mask, _ in calls)
        else:
            assert all(no_mask and causal for no_mask, causal in calls)
            per_layer = int((b.position_ids == 0).sum())  # 5 sequences + each short row's padding
            assert per_layer == (5 if layout == "packed_one_row" else 6)
            assert len(calls) == per_layer * 2 * (2 if ckpt else 1)  # 2 layers; recomputed in backward


def test_packed_sdpa_builds_no_dense_mask(monkeypatch):
    """PACKED_SDPA's training forward builds no (R, 1, W, W) mask (transformers' sdpa_mask is never called for
    packed rows; it is for padded batches and cached generation), and a packed row run without ``cu_seq_lens_q``
    still attends per sequence (offsets from the position ids): the same hidden states as each sequence alone."""
    import transformers.masking_utils as mu

    real, built = mu.sdpa_mask, []
    monkeypatch.setattr(mu, "sdpa_mask", lambda *a, **k: built.append(k.get("q_length")) or real(*a, **k))
    m = _model(True).eval()
    m.config._attn_implementation = resolve_attn(PACKED_SDPA, "cpu")
    b = collate(_examples(), packed=True, row_tokens=100)
    with torch.no_grad():
        LogProbLM(m, rows=16)(b.input_ids, b.keep, b.targets, b.position_ids)
        assert built == []
        ids = torch.randint(0, 300, (1, 50), generator=torch.Generator().manual_seed(3))
        pos = torch.cat([torch.arange(30), torch.arange(20)])[None]
        packed = m.model(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state
        alone = torch.cat([m.model(input_ids=ids[:, :30], use_cache=False).last_hidden_state,
                           m.model(input_ids=ids[:, 30:], use_cache=False).last_hidden_state], 1)
        assert built == [] and (packed - alone).abs().max().item() < 1e-5
        padded = collate(_examples(), packed=False)
        LogProbLM(m, rows=16)(padded.input_ids, padded.keep, padded.targets, attention_mask=padded.attention_mask)
        assert built == [padded.input_ids.shape[1]]
        am = torch.ones(2, 7, dtype=torch.long)
        am[0, :2] = 0
        m.generate(input_ids=torch.randint(3, 300, (2, 7)), attention_mask=am, max_new_tokens=3, do_sample=False,
                   pad_token_id=0)
        assert len(built) > 1


def test_split_path_gives_sdpa_no_mask(monkeypatch):
    """Each packed sequence alone: SDPA gets attn_mask=None and is_causal (its flash kernel on CUDA)."""
    import torch.nn.functional as F

    calls = []
    real = F.scaled_dot_product_attention

    def spy(*a, **k):
        calls.append((k.get("attn_mask") is None, k.get("is_causal")))
        return real(*a, **k)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    m = _model(True).eval()
    b = collate(_examples(), packed=True, row_tokens=100)
    with torch.no_grad():
        LogProbLM(m, split=True)(b.input_ids, b.keep, b.targets, b.position_ids)
    assert calls and all(no_mask and causal for no_mask, causal in calls)
    calls.clear()
    with torch.no_grad():
        LogProbLM(m, split=False)(b.input_ids, b.keep, b.targets, b.position_ids)
    assert calls and not any(no_mask for no_mask, _ in calls)  # packed rows: a block-diagonal mask (the CPU layout)


def test_liger_glue_with_a_stand_in_kernel(monkeypatch):
    """No CUDA here: a stand-in with liger_fused_linear_cross_entropy's signature checks our call (reduction none,
    -nll, keyword arguments) and the per-sequence sums built from it; the real kernel runs only on a GPU."""
    import torch.nn.functional as F

    seen = {}

    def fake(input, weight, target, bias=None, reduction="mean", accum_dtype=None, **kw):
        seen.update(reduction=reduction, accum_dtype=accum_dtype, extra=kw)
        return F.cross_entropy(F.linear(input, weight, bias).float(), target, reduction=reduction)

    pkg = types.ModuleType("liger_kernel.transformers.functional")
    pkg.liger_fused_linear_cross_entropy = fake
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", types.ModuleType("liger_kernel.transformers"))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.functional", pkg)
    m = _model(False).eval()
    b = collate(_examples(), packed=True, row_tokens=100)
    with torch.no_grad():
        ref, _ = sequence_logps(LogProbLM(m, kernel="chunked"), b)
        got, _ = sequence_logps(LogProbLM(m, kernel="liger"), b)
    assert torch.allclose(got, ref, atol=1e-4)
    assert seen == {"reduction": "none", "accum_dtype": torch.float32, "extra": {}}
