"""Every attention back end equals a naive reference on mixed batches (decodes + prefill chunks with
cached prefixes, scattered blocks), and the engine gives the same answers whichever one it runs."""

from __future__ import annotations

import random

import pytest
import torch

from tinyserve import LLM, SamplingParams
from tinyserve.attention import ATTENTION_BACKENDS, select_backend
from tinyserve.attention.base import AttentionBackend, BatchLayout, SeqSpan

from conftest import TINY, make_tiny_checkpoint, top_logprobs

BS = 4  # small blocks: contexts straddle many of them
# The back ends that run on a CPU; `triton` is CUDA's (test_triton_attention.py runs its kernel interpreted).
CPU_BACKENDS = sorted(set(ATTENTION_BACKENDS) - {"triton"})


def naive_attention(q, k_cache, v_cache, span: SeqSpan, scale: float) -> torch.Tensor:
    """Token by token from the pool: query i of the span sees positions [0, num_cached + i]."""
    h, h_kv = q.shape[1], k_cache.shape[2]
    rows = [span.block_table[p // BS] * BS + p % BS for p in range(span.context_len)]
    k = k_cache.flatten(0, 1)[rows].float().repeat_interleave(h // h_kv, dim=1)  # [ctx, H, D]
    v = v_cache.flatten(0, 1)[rows].float().repeat_interleave(h // h_kv, dim=1)
    out = []
    for i in range(span.num_tokens):
        n = span.num_cached + i + 1
        qi = q[span.start + i].float()  # [H, D]
        p = torch.softmax(torch.einsum("hd,thd->ht", qi, k[:n]) * scale, dim=-1)
        out.append(torch.einsum("ht,thd->hd", p, v[:n]))
    return torch.stack(out)


def mixed_batch(dtype: torch.dtype, h: int, h_kv: int, d: int, seed: int = 0):
    """Decodes of various lengths, a fresh prompt and a later chunk over a cached prefix, in blocks
    scattered over the pool; the pool already holds every cached position's K/V."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    num_blocks = 64
    k_cache = torch.randn(num_blocks, BS, h_kv, d, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, BS, h_kv, d, generator=g).to(dtype)
    free = list(range(1, num_blocks))  # block 0 stays unused: tables are padded with it
    rng.shuffle(free)
    shapes = [(1, 0), (1, 6), (1, 17), (1, 33), (9, 0), (5, 11)]  # (new tokens, cached tokens)
    spans, start = [], 0
    for n, cached in shapes:
        table = [free.pop() for _ in range(-(-(n + cached) // BS))]
        spans.append(SeqSpan(start, n, cached, table))
        start += n
    t = start
    q = torch.randn(t, h, d, generator=g).to(dtype)
    k = torch.randn(t, h_kv, d, generator=g).to(dtype)
    v = torch.randn(t, h_kv, d, generator=g).to(dtype)
    slots = [s.block_table[p // BS] * BS + p % BS for s in spans for p in range(s.num_cached, s.context_len)]
    layout = BatchLayout([s for s in spans if s.num_tokens == 1], [s for s in spans if s.num_tokens > 1],
                         torch.tensor(slots), BS, torch.device("cpu"))
    return q, k, v, k_cache, v_cache, spans, layout


@pytest.mark.parametrize("name", CPU_BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("h,h_kv,d", [(6, 2, 64), (4, 4, 32), (8, 1, 128)])
def test_backend_matches_naive_reference(name, dtype, tol, h, h_kv, d):
    backend: AttentionBackend = select_backend(name, "cpu")
    q, k, v, k_cache, v_cache, spans, layout = mixed_batch(dtype, h, h_kv, d)
    meta = backend.build(layout)
    scale = d**-0.5
    out = backend.forward(q, k, v, k_cache, v_cache, meta, scale)
    assert out.shape == q.shape and out.dtype == dtype
    for span in spans:  # the pool now holds this step's K/V too, as the reference reads it
        ref = naive_attention(q, k_cache, v_cache, span, scale)
        torch.testing.assert_close(out[span.start : span.start + span.num_tokens].float(), ref, rtol=tol, atol=tol)


def test_pure_decode_step_matches():
    """The all-decodes fast path (no output buffer) agrees with the mixed path's decode rows."""
    q, k, v, k_cache, v_cache, spans, _ = mixed_batch(torch.float32, 6, 2, 64, seed=1)
    decodes = [s for s in spans if s.num_tokens == 1]
    rows = [s.start for s in decodes]
    slots = [s.block_table[s.num_cached // BS] * BS + s.num_cached % BS for s in decodes]
    layout = BatchLayout([SeqSpan(i, 1, s.num_cached, s.block_table) for i, s in enumerate(decodes)], [],
                         torch.tensor(slots), BS, torch.device("cpu"))
    outs = []
    for name in CPU_BACKENDS:
        backend = select_backend(name, "cpu")
        outs.append(backend.forward(q[rows], k[rows], v[rows], k_cache, v_cache, backend.build(layout), 0.125))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pool", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("h,h_kv,d", [(9, 3, 64), (8, 2, 64), (12, 2, 128)])  # G = 3, 4 and 6
def test_paged_kernel_one_sequence_or_many(pool, h, h_kv, d, restore_torch_threads):
    """The paged kernel on many sequences (its work split by sequence) equals a float reference, and
    gives each sequence the very bits it gets alone (split by KV head): what --batch-invariant needs.
    Lengths straddle its 16-token chunks; blocks are scattered."""
    from tinyserve.attention.paged import load_native
    from tinyserve.kv.quant import dequantize, quantize

    load_native()
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(3)
    lens = [1, 15, 16, 17, 33, 47, 64, 70, 5, 100, 31, 2]  # 12 >= 4 per thread: one sequence per item
    bs, width = 16, 7
    k = torch.randn(len(lens) * width + 1, bs, h_kv, d, generator=g)
    v = torch.randn(len(lens) * width + 1, bs, h_kv, d, generator=g)
    if pool == "int8":
        k_cache, v_cache, qdtype = quantize(k * 3), quantize(v), torch.bfloat16
        kf, vf = dequantize(k_cache, torch.float32), dequantize(v_cache, torch.float32)
    else:
        qdtype = getattr(torch, pool)
        k_cache, v_cache = (k * 3).to(qdtype), v.to(qdtype)
        kf, vf = k_cache.float(), v_cache.float()
    q = torch.randn(len(lens), h, d, generator=g).to(qdtype)
    tables = torch.randperm(len(lens) * width, generator=g).add(1).view(len(lens), width).to(torch.int32)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    scale = d**-0.5
    out = torch.ops.tinyserve.paged_decode(q, k_cache, v_cache, tables, lens_t, scale)
    tol = 1e-5 if pool == "float32" else 1e-2
    for s, n in enumerate(lens):
        ks = kf[tables[s].long()].reshape(-1, h_kv, d)[:n].repeat_interleave(h // h_kv, 1)
        vs = vf[tables[s].long()].reshape(-1, h_kv, d)[:n].repeat_interleave(h // h_kv, 1)
        p = (torch.einsum("hd,thd->ht", q[s].float(), ks) * scale).softmax(-1)
        torch.testing.assert_close(out[s].float(), torch.einsum("ht,thd->hd", p, vs), rtol=tol, atol=tol)
        alone = torch.ops.tinyserve.paged_decode(q[s : s + 1], k_cache, v_cache, tables[s : s + 1],
                                                 lens_t[s : s + 1], scale)
        assert torch.equal(alone[0], out[s]), f"sequence {s} alone differs from among others"


def test_select_backend_errors():
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        select_backend("flash", "cpu")
    with pytest.raises(ValueError, match="CPU-only"):
        select_backend("paged", "cuda")
    assert select_backend("auto", "cuda").name == "sdpa"
    assert select_backend("auto", "cpu").name == "paged"  # this machine has a compiler


def test_engine_same_answers_with_every_backend(tmp_path, restore_torch_threads):
    """Greedy tokens and their logprobs through the whole engine (chunked prefill, paged decode,
    preemption-free): identical tokens, logprobs equal to fp32 rounding."""
    path = make_tiny_checkpoint(tmp_path, "llama", num_key_value_heads=2)
    prompts = [list(range(100, 160)), list(range(7, 12)), [5]]
    params = SamplingParams(temperature=0, max_tokens=16, logprobs=3, ignore_eos=True)
    results = {}
    for name in CPU_BACKENDS:
        llm = LLM(str(path), attention_backend=name, block_size=4, max_num_batched_tokens=24,
                  kv_cache_memory_gb=0.01, **TINY)
        results[name] = llm.generate(prompts, params)
    for a, b in zip(*results.values()):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for tok, la, lb in zip(a.outputs[0].token_ids, a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert abs(la[tok].logprob - lb[tok].logprob) < 1e-4
            assert [t for t, _ in top_logprobs(la, 3)] == [t for t, _ in top_logprobs(lb, 3)]


def test_a_back_end_added_with_one_decorator_serves_and_is_a_flag(tiny_llama_dir, restore_torch_threads):
    """What adding a back end takes: an `AttentionBackend` subclass and one decorated factory. This one
    attends each decode with a Python loop over its context (the plainest correct thing): served through
    the whole engine it gives the built-in back ends' greedy tokens, and `--attention-backend` offers it."""
    import argparse

    from tinyserve.attention.base import DecodeMeta, gather_blocks
    from tinyserve.engine_args import add_engine_args

    class LoopBackend(AttentionBackend):
        name = "loop"

        def decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: DecodeMeta,
                   scale: float) -> torch.Tensor:
            out = []
            for i in range(q.shape[0]):
                n, table = int(meta.context_lens[i]), meta.block_tables[i : i + 1]
                k, v = (gather_blocks(c, table, q.dtype)[0, :, :n].repeat_interleave(q.shape[1] // c.shape[2], 0)
                        for c in (k_cache, v_cache))
                out.append(((q[i, :, None] @ k.transpose(1, 2)) * scale).softmax(-1) @ v)
            return torch.stack(out)[:, :, 0]

    @ATTENTION_BACKENDS.register("loop")
    def _loop(device: str) -> AttentionBackend:
        """a Python loop over each decode's context"""
        return LoopBackend()

    try:
        p = argparse.ArgumentParser()
        add_engine_args(p)
        assert p.parse_args(["--attention-backend", "loop"]).attention_backend == "loop"
        prompts = [list(range(100, 140)), [7, 8, 9]]
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        got = LLM(str(tiny_llama_dir), attention_backend="loop", **TINY).generate(prompts, params)
        want = LLM(str(tiny_llama_dir), attention_backend="sdpa", **TINY).generate(prompts, params)
        assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    finally:
        del ATTENTION_BACKENDS._entries["loop"]
