"""Our dense bf16 GEMM on weights packed once (layers/bf16_gemm.py): the layout round-trips, products
agree with an fp32 reference within bf16's output rounding, a row's bits do not depend on its neighbours,
and a loaded model packs every dense matrix once, its tied embedding reading the head's packed table."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tinyserve.layers import bf16_gemm
from tinyserve.system import cpu_flags

needs_bf16_units = pytest.mark.skipif("avx512_bf16" not in cpu_flags(),
                                      reason="the kernel runs on AVX512-BF16; this CPU has none")


def _pair(m: int, k: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, k, generator=g).bfloat16(), torch.randn(n, k, generator=g).bfloat16())


def test_layout_round_trips_and_embeds():
    _, w = _pair(1, 96, 48, 0)
    p = bf16_gemm.pack(w)
    assert p.shape == (3, 48, 32) and bf16_gemm.shape(p) == (48, 96) and bf16_gemm.shape(w) == (48, 96)
    assert torch.equal(bf16_gemm.unpack(p), w)
    assert p[1, 2, 2 * 5 + 1] == w[16 + 5, 2 * 2 + 1]  # block 1, column pair 2, row 5 of the block, second of the pair
    ids = torch.tensor([[0, 47, 16], [15, 31, 2]])
    assert torch.equal(bf16_gemm.embedding(ids, p), F.embedding(ids, w))
    assert not bf16_gemm.packable(w[:40]) and not bf16_gemm.packable(w[:, :95]) and not bf16_gemm.packable(w.float())


@needs_bf16_units
@pytest.mark.parametrize("m,k,n", [(1, 576, 960), (5, 1536, 576), (37, 64, 112), (70, 96, 48), (130, 32, 16 * 13)])
def test_products_match_fp32_within_output_rounding(m, k, n):
    """Each product of two bf16 is exact in fp32; the sum's fp32 error is far below the output's rounding
    to bf16 (2^-9 relative). n = 112 and 208 leave groups of fewer than 6 blocks; 5, 37, 70 and 130 rows
    leave tiles of fewer than 4 rows."""
    bf16_gemm.OPS.load()
    x, w = _pair(m, k, n, m * n)
    ref = x.float() @ w.float().T
    y = bf16_gemm.linear(x, bf16_gemm.pack(w))
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    bound = ref.abs() * 2.0**-8 + (x.float().abs() @ w.float().abs().T) * 2.0**-20
    assert ((y.float() - ref).abs() <= bound).all()


@needs_bf16_units
def test_a_row_gets_the_same_bits_alone_and_among_others():
    bf16_gemm.OPS.load()
    x, w = _pair(70, 576, 960, 1)
    p = bf16_gemm.pack(w)
    together = bf16_gemm.linear(x, p)
    for rows in (1, 2, 3, 4, 9, 33, 64, 69):
        assert torch.equal(bf16_gemm.linear(x[:rows], p), together[:rows]), rows
    assert torch.equal(bf16_gemm.linear(x.view(7, 10, 576), p), together.view(7, 10, 960))  # leading dims kept


@needs_bf16_units
def test_a_loaded_model_packs_its_dense_weights_once(tmp_path, monkeypatch):
    """Every dense matrix packed, the tied embedding sharing the head's packed storage (no second table),
    and the first token's logprobs those of the unpacked model within bf16 rounding."""
    from tinyserve import LLM, SamplingParams
    from tinyserve.layers.linear import DenseWeight, Linear

    from conftest import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path / "tied", tie=True)
    params = SamplingParams(max_tokens=1, temperature=0, logprobs=5)
    prompt = "The quick brown fox jumps over the lazy dog"
    monkeypatch.setattr(bf16_gemm, "wanted", lambda dtype, device: True)  # AMX CPUs keep oneDNN; test the pass anyway
    packed = LLM(model=str(path), dtype="bfloat16", quantization="none", num_threads=1, enforce_eager=True)
    model = packed.engine.model
    weights = [m.impl for m in model.modules() if isinstance(m, Linear)]
    assert weights and all(isinstance(w, DenseWeight) and w.weight.dim() == 3 for w in weights)
    assert model.embed_tokens.weight.data_ptr() == model.lm_head.impl.weight.data_ptr()
    got = packed.generate([prompt], params)[0].outputs[0].logprobs[0]
    monkeypatch.setattr(bf16_gemm, "wanted", lambda dtype, device: False)
    plain = LLM(model=str(path), dtype="bfloat16", quantization="none", num_threads=1, enforce_eager=True)
    assert all(m.impl.weight.dim() == 2 for m in plain.engine.model.modules() if isinstance(m, Linear))
    want = plain.generate([prompt], params)[0].outputs[0].logprobs[0]
    shared = set(got) & set(want)
    assert len(shared) >= 3
    for token in shared:
        assert abs(got[token].logprob - want[token].logprob) < 0.1


def test_gguf_dense_copies_dequantize_straight_into_the_layout():
    """The 1.5B's dense copies are written packed a chunk at a time (no second full matrix): the same
    bits as packing the whole dequantized matrix, across chunk and shard boundaries (q and k stacked)."""
    from tinyserve.layers import gguf_native
    from tinyserve.layers.formats import GGUFTensor
    from tinyserve.models.gguf import gguf_weights
    from tinyserve.models.loader import resolve_model

    wanted = ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight")
    found = {name: w for name, w in gguf_weights(resolve_model(None).path) if name in wanted}
    shards = [found[n] for n in wanted]
    assert all(isinstance(s, GGUFTensor) for s in shards)
    whole = gguf_native.dequantize_into(shards, torch.bfloat16)
    assert whole.shape == (576 + 192, 576)
    packed = gguf_native.dequantize_into(shards, torch.bfloat16, chunk=90, packed=True)  # 90: to whole blocks
    assert torch.equal(packed, bf16_gemm.pack(whole))
    odd = gguf_native.dequantize_into(shards[:1], torch.float32, packed=True)  # fp32: never packed
    assert odd.dim() == 2
