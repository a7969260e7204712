"""Prompt attention on our AVX512-BF16 kernel (attention/prefill.py): against a float reference, each
row's bits independent of the rest, a prompt in chunks giving the whole prompt's bits, and the engine
taking it for bf16 prefills."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tinyserve.attention import prefill as fast_prefill
from tinyserve.system import cpu_flags

pytestmark = pytest.mark.skipif("avx512_bf16" not in cpu_flags(), reason="the kernel needs AVX512-BF16")

SHAPES = [(9, 3, 64), (12, 2, 128), (4, 4, 64), (8, 1, 128)]  # G = 3, 6, 1, 8


@pytest.fixture(autouse=True)
def kernel(restore_torch_threads):
    fast_prefill.OPS.load()
    torch.set_num_threads(2)


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """fp32 (or `dtype`) SDPA with query i of L seeing keys [0, i + S - L]."""
    n, s, g = q.shape[0], k.shape[0], q.shape[1] // k.shape[1]
    mask = torch.ones(n, s, dtype=torch.bool).tril(s - n)
    heads = [x.to(dtype).repeat_interleave(r, 1).transpose(0, 1) for x, r in ((q, 1), (k, g), (v, g))]
    return F.scaled_dot_product_attention(*heads, attn_mask=mask, scale=scale).transpose(0, 1).float()


@pytest.mark.parametrize("h,h_kv,d", SHAPES)
@pytest.mark.parametrize("n,s", [(1, 1), (7, 7), (8, 8), (31, 31), (33, 33), (70, 70), (200, 200), (5, 40), (40, 97)])
def test_matches_reference(h, h_kv, d, n, s):
    """Lengths straddle the 8-row items and the 32-key tiles; S > L is a chunk after a cached prefix.
    The error is bf16's: within 1.5x PyTorch's own bf16 attention's against the same fp32 reference."""
    q, k, v = rand(n, h, d, seed=1) * 2, rand(s, h_kv, d, seed=2) * 2, rand(s, h_kv, d, seed=3)
    scale = d**-0.5
    out = fast_prefill.attend(q, k, v, scale)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    ref = reference(q, k, v, scale)
    ours = (out.float() - ref).abs().max().item()
    theirs = (reference(q, k, v, scale, torch.bfloat16) - ref).abs().max().item()
    assert ours <= 1.5 * theirs + 1e-3, (ours, theirs)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("h,h_kv,d", SHAPES[:2])
def test_rows_and_chunks_have_the_whole_prompts_bits(h, h_kv, d):
    """A row's result depends on its query and keys alone: the first n rows of a prompt are the prompt
    cut at n, a chunk after a cached prefix is those rows of the whole prompt, and the thread count
    changes nothing: prefix caching and chunked prefill give a prompt the bits of one whole prefill."""
    s = 150
    q, k, v = rand(s, h, d, seed=4), rand(s, h_kv, d, seed=5), rand(s, h_kv, d, seed=6)
    whole = fast_prefill.attend(q, k, v, 0.1)
    for n in (1, 9, 32, 33, 100):
        assert torch.equal(fast_prefill.attend(q[:n], k[:n], v[:n], 0.1), whole[:n])
    for start in (1, 40, 64, 149):
        assert torch.equal(fast_prefill.attend(q[start:], k, v, 0.1), whole[start:])
    torch.set_num_threads(1)
    assert torch.equal(fast_prefill.attend(q, k, v, 0.1), whole)


def test_strided_views():
    """q, k, v as the step hands them (column slices of one fused projection; K/V read back from the pool
    head-major) give what contiguous copies give."""
    n, h, h_kv, d = 45, 9, 3, 64
    qkv = rand(n, (h + 2 * h_kv) * d, seed=7).view(n, h + 2 * h_kv, d)
    q, k, v = qkv[:, :h], qkv[:, h : h + h_kv], qkv[:, h + h_kv :]
    out = fast_prefill.attend(q, k, v, 0.125)
    assert torch.equal(out, fast_prefill.attend(q.contiguous(), k.contiguous(), v.contiguous(), 0.125))
    k_heads = k.transpose(0, 1).contiguous()  # [Hkv, S, D], as gather_blocks returns
    v_heads = v.transpose(0, 1).contiguous()
    assert torch.equal(fast_prefill.attend(q, k_heads.transpose(0, 1), v_heads.transpose(0, 1), 0.125), out)


def test_bad_input_is_an_error():
    q, k = rand(4, 4, 64, seed=8), rand(4, 2, 64, seed=9)
    with pytest.raises(RuntimeError, match="bfloat16"):
        fast_prefill.attend(q.float(), k.float(), k.float(), 0.1)
    with pytest.raises(RuntimeError, match="head_dim 64 and 128"):
        fast_prefill.attend(rand(4, 4, 96, seed=1), rand(4, 2, 96, seed=2), rand(4, 2, 96, seed=3), 0.1)
    with pytest.raises(RuntimeError, match="S < L"):
        fast_prefill.attend(q, k[:2], k[:2], 0.1)
    assert not fast_prefill.usable(rand(4, 4, 96, seed=1)) and not fast_prefill.usable(q.float())


def test_wanted_only_without_amx(monkeypatch):
    """bf16 on a CPU with AVX512-BF16 and no AMX; never fp32, never where AMX is (PyTorch's attention there)."""
    from tinyserve.attention import prefill

    monkeypatch.setattr(prefill, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    assert prefill.wanted("cpu", torch.bfloat16) and not prefill.wanted("cpu", torch.float32)
    monkeypatch.setattr(prefill, "cpu_flags", lambda: frozenset({"avx512_bf16", "amx_bf16"}))
    assert not prefill.wanted("cpu", torch.bfloat16)


@pytest.mark.skipif("amx_bf16" in cpu_flags(), reason="with AMX the engine keeps PyTorch's attention")
def test_engine_prefill_takes_the_kernel(monkeypatch):
    """A bf16 engine's prompts run the kernel, and its logprobs stay those of the SDPA path within bf16's error."""
    from tinyserve import LLM, SamplingParams

    calls = []
    real = fast_prefill.attend
    monkeypatch.setattr(fast_prefill, "attend", lambda *a: calls.append(a[0].shape) or real(*a))
    llm = LLM(dtype="bfloat16", enforce_eager=True, enable_prefix_caching=False)
    prompt = "The history of the printing press begins in"
    params = SamplingParams(max_tokens=4, temperature=0, logprobs=5, prompt_logprobs=5)
    (ours,) = llm.generate([prompt], params)
    assert calls, "the paged back end did not call the kernel"
    monkeypatch.setattr(fast_prefill.OPS, "_available", False)
    (before,) = llm.generate([prompt], params)
    a = [max(d.values(), key=lambda x: x.logprob).logprob for d in ours.prompt_logprobs[1:]]
    b = [max(d.values(), key=lambda x: x.logprob).logprob for d in before.prompt_logprobs[1:]]
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=0.15)
