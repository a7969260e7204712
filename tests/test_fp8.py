"""FP8 E4M3: weights (`--quantization fp8`, layers/fp8.py) and the KV pool (`--kv-cache-dtype fp8_e4m3`,
kv/quant.py): the formats' error bounds, the products against the dequantized weight, what is refused,
and the engine on a tiny random model close to its full-precision self."""

from __future__ import annotations

import pytest
import torch

from tinyserve import LLM, SamplingParams
from tinyserve.kv.quant import read_rows, to_fp8
from tinyserve.layers import resolve_quantization
from tinyserve.layers.fp8 import FP8, Fp8Method, Fp8Weight, fp8_linear, quantize_fp8, scaled_mm_fits
from tinyserve.layers.linear import DenseWeight, Linear

from conftest import TINY, assert_same_under_preemption

pytestmark = pytest.mark.usefixtures("restore_torch_threads")
HALF_STEP = 2.0**-4  # E4M3's 3 mantissa bits: a normal value rounds within 2^-4 of itself
SUBNORMAL_STEP = 2.0**-9


def _rows(n: int = 48, k: int = 96, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * torch.logspace(-4, 2, n)[:, None]  # rows six decades apart


def test_fp8_weights_round_trip_within_half_a_step():
    w = _rows()
    w[7] = 0  # an all-zero row stays zero
    q, scales = quantize_fp8(w)
    assert q.dtype == FP8 and scales.dtype == torch.float32 and scales.shape == (w.shape[0],)
    back = q.float() * scales[:, None]
    bound = HALF_STEP * w.abs() + 0.5 * SUBNORMAL_STEP * scales[:, None]  # relative, or the subnormal step
    assert bool(((back - w).abs() <= bound * (1 + 1e-6)).all())
    assert bool((back[7] == 0).all())
    assert torch.allclose(back.abs().amax(-1)[w.abs().amax(-1) > 0], w.abs().amax(-1)[w.abs().amax(-1) > 0])


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_the_fp8_module_multiplies_by_its_dequantized_weight(dtype, tol, device):
    w = _rows(64, 128, seed=1)
    module = Fp8Method().pack([w], dtype, torch.device(device))
    assert isinstance(module, Fp8Weight)
    # a CPU dequantizes on read; a Hopper GPU runs bf16 on _scaled_mm, whose E4M3 activations cost more
    assert module.scaled_mm == scaled_mm_fits(64, 128, dtype, torch.device(device))
    tol = 0.05 if module.scaled_mm else tol
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(2)).to(device=device, dtype=dtype)
    ref = x.float() @ module.dequantized(torch.float32).T
    got = module(x)
    assert got.dtype == dtype
    assert ((got.float() - ref).norm() / ref.norm()).item() < tol
    assert module.bytes_read(1) == 64 * 128 + 64 * 4  # one byte a weight, a fp32 scale a row


def test_the_scaled_mm_product_quantizes_activations_per_token(device):
    """The GPU path's arithmetic (on a CPU through torch's CPU _scaled_mm): the exact product of x rounded
    to E4M3 per token (within bf16's output rounding), rows of very different magnitude alike, and a few
    percent of the product with x itself."""
    if device != "cpu" and not scaled_mm_fits(64, 128, torch.bfloat16, torch.device(device)):
        pytest.skip("no row-wise FP8 GEMM on this GPU")
    w = _rows(64, 128, seed=3).to(device)
    q, scales = quantize_fp8(w)
    x = torch.randn(6, 128, generator=torch.Generator().manual_seed(4)) * torch.logspace(-3, 3, 6)[:, None]
    x = x.to(device=device, dtype=torch.bfloat16)
    got = fp8_linear(x, q, scales)
    assert got.dtype == torch.bfloat16 and got.shape == (6, 64)
    w_deq = q.float() * scales[:, None]
    x_q, x_scales = quantize_fp8(x.float())  # per row of x: the same rounding, done by the weight quantizer
    exact = (x_q.float() * x_scales[:, None]) @ w_deq.T
    torch.testing.assert_close(got.float(), exact, rtol=2**-7, atol=1e-6 * exact.abs().amax().item())
    rel = (got.float() - x.float() @ w_deq.T).norm(dim=-1) / exact.norm(dim=-1)
    assert bool((rel < 0.1).all()), rel


def test_scaled_mm_is_chosen_only_where_it_fits(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert not scaled_mm_fits(64, 128, torch.bfloat16, cpu)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert scaled_mm_fits(64, 128, torch.bfloat16, gpu)
    assert not scaled_mm_fits(64, 120, torch.bfloat16, gpu)  # K not a multiple of 16
    assert not scaled_mm_fits(60, 128, torch.bfloat16, gpu)  # N not a multiple of 16
    assert not scaled_mm_fits(64, 128, torch.float32, gpu)  # row-wise scales write bf16 only
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert not scaled_mm_fits(64, 128, torch.bfloat16, gpu)  # no FP8 tensor cores


def test_fp8_alone_of_the_quantized_modes_passes_on_cuda():
    assert resolve_quantization("fp8", None, torch.bfloat16, "cuda") == "fp8"
    assert resolve_quantization("fp8", "gguf", torch.bfloat16, "cpu") == "fp8"  # re-quantizes a GGUF's weights
    for mode in ("int8", "int4", "gguf"):
        with pytest.raises(ValueError, match="CPU kernels.*fp8"):
            resolve_quantization(mode, "gguf", torch.bfloat16, "cuda")
    with pytest.raises(ValueError, match="already quantized"):
        resolve_quantization("fp8", "checkpoint", torch.bfloat16, "cuda")


PROMPTS = [[5, 77, 913, 4000, 21, 8, 8, 300], [9, 10, 11, 12, 13, 14, 15], [2000, 3000, 4000], [42] * 20]


def _first_logprobs(llm: LLM) -> list[dict[int, float]]:
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=1, logprobs=5))
    return [{t: lp.logprob for t, lp in (o.outputs[0].logprobs or [{}])[0].items()} for o in outs]


def _assert_close(ref: list[dict[int, float]], got: list[dict[int, float]], tol: float) -> None:
    """Same top-1 token, and its log-probability within `tol`, for every prompt."""
    for r, g in zip(ref, got):
        top = max(r, key=r.__getitem__)
        assert max(g, key=g.__getitem__) == top
        assert abs(g[top] - r[top]) < tol, (g[top], r[top])


def _layer_linears(model: torch.nn.Module) -> list[Linear]:
    return [m for m in model.modules() if isinstance(m, Linear) and m is not model.lm_head]


def test_the_engine_with_fp8_weights_is_the_model_with_its_weights_rounded(tiny_llama_dir):
    """Every linear but the head on fp8, and the engine's logits those of an fp32 engine whose weights are
    the fp8 ones dequantized (the wiring exact; the rounding's own cost is what the bundled model's ppl
    measures)."""
    llm = LLM(str(tiny_llama_dir), **TINY, quantization="fp8")
    assert llm.engine.quantization == "fp8"
    linears = _layer_linears(llm.engine.model)
    assert {m.impl.kind for m in linears} == {"fp8-e4m3"}  # type: ignore[union-attr]
    assert isinstance(llm.engine.model.lm_head.impl, DenseWeight)  # the head stays dense, as vLLM keeps it
    rounded = LLM(str(tiny_llama_dir), **TINY)
    for mine, dense in zip(linears, _layer_linears(rounded.engine.model)):
        dense.impl = DenseWeight(mine.impl.dequantized(torch.float32))  # type: ignore[union-attr,operator]
    _assert_close(_first_logprobs(rounded), _first_logprobs(llm), 1e-4)


def test_a_tied_fp8_model_shares_its_dense_head_with_the_embedding(tmp_path):
    from conftest import make_tiny_checkpoint

    llm = LLM(str(make_tiny_checkpoint(tmp_path, tie=True)), **TINY, quantization="fp8")
    model = llm.engine.model
    assert model.embed_tokens.weight.data_ptr() == model.lm_head.impl.weight.data_ptr()  # type: ignore[union-attr]


# -- the fp8 KV pool -----------------------------------------------------------------------------------------
def test_fp8_kv_rows_round_trip_within_half_a_step_and_clamp(device):
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(40, 3, 64, generator=g) * torch.logspace(-1, 2, 40)[:, None, None]).to(device)
    rows = to_fp8(x)
    assert rows.dtype == FP8 and rows.shape == x.shape
    back = read_rows(rows, torch.float32)
    assert bool(((back - x).abs() <= HALF_STEP * x.abs() + 0.5 * SUBNORMAL_STEP).all())
    assert read_rows(rows, torch.bfloat16).dtype == torch.bfloat16
    big = read_rows(to_fp8(torch.tensor([1e4, -1e4, float("inf")], device=device)), torch.float32)
    assert big.tolist() == [448.0, -448.0, 448.0]  # clamped, never NaN


def test_attention_over_an_fp8_pool_stays_close_to_fp32(device):
    """A fresh prompt written to the pool, then a decode reading it back through sdpa's gather."""
    from tinyserve.attention import ATTENTION_BACKENDS
    from tinyserve.attention.base import AttentionMetadata

    g = torch.Generator().manual_seed(6)
    att = ATTENTION_BACKENDS["sdpa"](device)
    blocks, bs, h_kv, h, d, n = 8, 4, 2, 4, 32, 30
    k, v, q = (torch.randn(n, heads, d, generator=g).to(device) for heads in (h_kv, h_kv, h))
    outs = {}
    for pool in (torch.float32, FP8):
        caches = [torch.zeros(blocks, bs, h_kv, d, dtype=pool, device=device) for _ in range(2)]
        att.forward(q, k, v, *caches, AttentionMetadata.fresh_prompt(n, device), 0.125)
        table = torch.arange(blocks, dtype=att.index_dtype, device=device)[None, :]
        meta = att.decode_meta(table, torch.tensor([n], dtype=att.index_dtype, device=device), bs)
        last = AttentionMetadata(torch.tensor([n - 1], device=device), 1, meta, [])
        outs[pool] = att.forward(q[-1:], k[-1:], v[-1:], *caches, last, 0.125)
    err = (outs[FP8] - outs[torch.float32]).norm() / outs[torch.float32].norm()
    assert 0 < err < 0.05, err


def test_the_paged_back_end_refuses_an_fp8_pool_and_auto_picks_sdpa():
    from tinyserve.attention import select_backend

    with pytest.raises(ValueError, match="paged.*fp8_e4m3"):
        select_backend("paged", "cpu", "fp8_e4m3")
    assert select_backend("auto", "cpu", "fp8_e4m3").name == "sdpa"


def test_the_engine_on_an_fp8_pool(tiny_llama_dir):
    """Half the bytes of bf16 per token; the first tokens close to an fp32 pool's; a pool small enough to
    preempt (swap), with the prefix cache on, gives the unpressured run's tokens exactly."""
    ref = _first_logprobs(LLM(str(tiny_llama_dir), **TINY))
    # chunks of 8: a later chunk reads the pool
    llm = LLM(str(tiny_llama_dir), **TINY, kv_cache_dtype="fp8_e4m3", max_num_batched_tokens=8)
    assert llm.engine.runner.kv_caches[0][0].dtype == FP8
    assert llm.engine.attention.name == "sdpa"
    mc = llm.engine.model_config
    assert mc.kv_bytes_per_token(torch.bfloat16, "fp8_e4m3") * 2 == mc.kv_bytes_per_token(torch.bfloat16)
    _assert_close(ref, _first_logprobs(llm), 0.25)  # seen: 0.11 at most (a widened random model amplifies)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
    tight = LLM(str(tiny_llama_dir), **TINY, kv_cache_dtype="fp8_e4m3", num_kv_blocks=12, block_size=4,
                max_num_batched_tokens=8)
    e = tight.engine
    assert_same_under_preemption(e, PROMPTS, params, want)
    assert e.tiers.stats.traffic["swap", "in"].blocks > 0, "preempted K/V was meant to come back from swap"
