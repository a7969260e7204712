"""The `triton` attention back end equals a plain softmax over each context, read from the pool, on mixed
batches: decodes (batch 1..64) and chunks over cached context, contexts crossing block boundaries, GQA
ratios 1/3/7/32, block sizes 1..128, fp32/fp16/bf16, the int8 pool, a float8 pool; and the whole engine
served with it gives sdpa's answers. Its kernel runs under Triton's interpreter in a child process
(tests/triton_interp.py); on a machine with a GPU, TINYSERVE_TRITON_DEVICE=cuda runs the same checks
compiled for it (the engine check then serves the `triton` back end itself on cuda).

Tolerances are on the largest absolute error (outputs are averages of N(0, 1) rows): fp32 1e-5; fp16
4e-3; bf16 4e-2, loose because the interpreter rounds to bf16 by truncation (a GPU rounds to nearest).
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass, field

import pytest
import torch

from tinyserve.attention import select_backend

from triton_interp import DEVICE, assert_within, kernel_results, report

TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 4e-2}


@dataclass(frozen=True)
class Case:
    """A step: decodes of `decodes` cached tokens each, chunks of (new, cached) tokens (cached 0: a fresh
    prompt, which goes through SDPA), over a pool of `block_size` blocks handed out in shuffled order."""

    dtype: torch.dtype
    heads: tuple[int, int]  # query heads, KV heads
    head_dim: int
    block_size: int
    decodes: tuple[int, ...]
    chunks: tuple[tuple[int, int], ...] = ()
    kv_cache_dtype: str = "auto"
    seed: int = 0
    id: str = field(init=False)

    def __post_init__(self) -> None:
        h, h_kv = self.heads
        name = (f"{str(self.dtype)[6:]}-g{h // h_kv}-h{h_kv}-d{self.head_dim}-bs{self.block_size}"
                f"-b{len(self.decodes)}-c{len(self.chunks)}-{self.kv_cache_dtype}-s{self.seed}")
        object.__setattr__(self, "id", name)

    def error(self) -> float:
        """Largest |back end - reference| over every query of the step (run in the child, on DEVICE)."""
        from tinyserve.attention.base import BatchLayout, SeqSpan
        from tinyserve.attention.triton_backend import TritonBackend
        from tinyserve.kv.quant import quantize

        rng = random.Random(self.seed)
        g = torch.Generator().manual_seed(self.seed)
        h, h_kv = self.heads
        d, bs = self.head_dim, self.block_size
        shapes = [(1, n) for n in self.decodes] + list(self.chunks)
        num_blocks = sum(-(-(n + c) // bs) for n, c in shapes) + 4
        k_cache, v_cache = (torch.randn(num_blocks, bs, h_kv, d, generator=g) for _ in "kv")
        if self.kv_cache_dtype == "int8":  # rows of codes and their scale
            k_cache, v_cache = quantize(k_cache), quantize(v_cache)
        else:
            k_cache, v_cache = k_cache.to(self.dtype), v_cache.to(self.dtype)
        free = list(range(1, num_blocks))  # block 0 stays unused: tables are padded with it
        rng.shuffle(free)
        spans, start = [], 0
        for n, cached in shapes:
            spans.append(SeqSpan(start, n, cached, [free.pop() for _ in range(-(-(n + cached) // bs))]))
            start += n
        # views of one fused projection, as the model hands them over: q's rows are strided
        qkv = torch.randn(start, h + 2 * h_kv, d, generator=g).to(self.dtype)
        slots = [s.block_table[p // bs] * bs + p % bs for s in spans for p in range(s.num_cached, s.context_len)]
        dev = torch.device(DEVICE)
        layout = BatchLayout(spans[: len(self.decodes)], spans[len(self.decodes) :], torch.tensor(slots, device=dev),
                             bs, dev)
        backend = TritonBackend()
        scale = d**-0.5
        k_cache, v_cache = k_cache.to(dev), v_cache.to(dev)
        out = backend.forward(*qkv.to(dev).split([h, h_kv, h_kv], dim=1), k_cache, v_cache, backend.build(layout),
                              scale).cpu()
        assert out.shape == (start, h, d) and out.dtype == self.dtype
        ref = torch.cat([reference(qkv[:, :h], k_cache.cpu(), v_cache.cpu(), s, bs, scale) for s in spans])
        return (out.double() - ref).abs().max().item()


def reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, span, block_size: int,
              scale: float) -> torch.Tensor:
    """fp64 softmax over the span's context as the pool holds it (after the step wrote into it): query i
    sees positions [0, num_cached + i]; an int8 pool's rows dequantized (kv/quant.py)."""
    from tinyserve.kv.quant import dequantize, is_quantized

    h, d = q.shape[1:]
    h_kv = k_cache.shape[2]
    rows = [span.block_table[p // block_size] * block_size + p % block_size for p in range(span.context_len)]
    k, v = (c.flatten(0, 1)[rows] for c in (k_cache, v_cache))
    qs = q[span.start : span.start + span.num_tokens].float()
    if is_quantized(k_cache):
        k, v = dequantize(k, torch.float32), dequantize(v, torch.float32)
    k, v = (t.double().repeat_interleave(h // h_kv, dim=1) for t in (k, v))  # [ctx, H, D]
    scores = torch.einsum("qhd,thd->hqt", qs.double(), k) * scale
    visible = torch.arange(span.context_len)[None, :] <= torch.arange(span.num_cached, span.context_len)[:, None]
    p = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return torch.einsum("hqt,thd->qhd", p, v)


F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
_rng = random.Random(7)
CASES = [
    # decodes alone: batch 1..64, GQA 1/3/7, block sizes 1..32, contexts on and across block boundaries
    Case(F32, (2, 2), 16, 16, (0,)),
    Case(F32, (2, 2), 16, 16, (15, 16, 17)),
    Case(F32, (6, 2), 32, 4, (3, 4, 5, 31, 32, 33)),
    Case(F32, (7, 1), 64, 5, (0, 9, 70)),
    Case(F32, (4, 4), 32, 1, (0, 1, 2, 20)),
    Case(F32, (3, 1), 48, 16, (10, 65)),  # a head_dim that is not a power of two
    Case(F16, (6, 2), 32, 16, tuple(_rng.randrange(0, 80) for _ in range(64))),
    Case(BF16, (7, 1), 32, 32, tuple(_rng.randrange(0, 100) for _ in range(32))),
    Case(BF16, (3, 1), 64, 8, (127, 128, 129)),
    Case(F16, (14, 2), 16, 16, (5, 40)),
    # chunks over cached context (and fresh prompts) next to decodes
    Case(F32, (2, 2), 16, 4, (), ((5, 3),)),
    Case(F32, (6, 2), 32, 16, (), ((1, 16), (16, 16), (17, 15))),
    Case(F32, (7, 1), 32, 5, (6,), ((40, 23),)),
    Case(F32, (3, 1), 16, 3, (2, 2), ((9, 0), (70, 1))),
    Case(F32, (4, 4), 64, 32, (40,), ((33, 64),)),
    Case(F16, (6, 2), 32, 8, (1, 17), ((12, 30), (7, 0))),
    Case(BF16, (7, 1), 64, 16, (50,), ((24, 40),)),
    Case(BF16, (2, 2), 32, 7, (), ((65, 3),)),
    Case(F32, (32, 1), 16, 16, (5, 40), ((9, 20),)),  # more query heads per KV head than a decode's 16 rows
    Case(F16, (6, 2), 32, 128, (100, 130), ((20, 120),)),  # blocks longer than a tile
    # the int8 pool: codes and a bf16 scale per row
    Case(F32, (2, 2), 16, 16, (0, 15, 16, 17), (), "int8"),
    Case(F32, (6, 2), 32, 4, (9, 30), ((11, 13),), "int8"),
    Case(F32, (7, 1), 64, 5, (3,), ((6, 0),), "int8"),
    Case(BF16, (3, 1), 32, 16, (20, 47), ((8, 20),), "int8"),
    Case(F16, (4, 4), 16, 1, (4,), (), "int8", seed=1),
]


def check_float8_pool() -> float:
    """A float8_e4m3fn pool (unit scale) read as it stands: decodes and a chunk over cached context, bf16
    queries, against the reference over the pool's values. The kernel is called directly: writing fp8
    rows is the KV format's business (kv/quant.py), not the kernel's."""
    from tinyserve.attention.base import SeqSpan
    from tinyserve.attention.triton_kernel import paged_attention

    g = torch.Generator().manual_seed(3)
    h, h_kv, d, bs = 6, 2, 32, 4
    k_cache, v_cache = (torch.randn(40, bs, h_kv, d, generator=g).to(torch.float8_e4m3fn) for _ in "kv")
    blocks = torch.randperm(39, generator=g).add(1).tolist()
    shapes, spans, start = [(1, 4), (1, 16), (1, 29), (9, 14)], [], 0
    for n, cached in shapes:
        spans.append(SeqSpan(start, n, cached, [blocks.pop() for _ in range(-(-(n + cached) // bs))]))
        start += n
    q = torch.randn(start, h, d, generator=g).to(torch.bfloat16)
    dev, scale = torch.device(DEVICE), d**-0.5
    k_dev, v_dev, q_dev = k_cache.to(dev), v_cache.to(dev), q.to(dev)
    decodes, chunk = spans[:3], spans[3]
    tables = torch.tensor([s.block_table + [0] * (8 - len(s.block_table)) for s in decodes], dtype=torch.int32)
    lens = torch.tensor([s.context_len for s in decodes], dtype=torch.int32)
    out = [paged_attention(q_dev[:3], k_dev, v_dev, tables.to(dev), lens.to(dev), scale),
           paged_attention(q_dev[3:], k_dev, v_dev, torch.tensor([chunk.block_table], device=dev),
                           torch.tensor([chunk.context_len], dtype=torch.int32, device=dev), scale, chunk.num_tokens)]
    ref = torch.cat([reference(q, k_cache.float(), v_cache.float(), s, bs, scale) for s in spans])
    return (torch.cat(out).cpu().double() - ref).abs().max().item()


def check_padding_rows() -> float:
    """Rows of no context (a padded batch's) come out as zeros, not NaN; returns the largest |value|."""
    from tinyserve.attention.triton_kernel import paged_attention

    dev = torch.device(DEVICE)
    cache = torch.randn(4, 16, 2, 32, device=dev)
    q = torch.randn(3, 6, 32, device=dev)
    tables, lens = torch.zeros(3, 1, dtype=torch.int32, device=dev), torch.zeros(3, dtype=torch.int32, device=dev)
    return paged_attention(q, cache, cache, tables, lens, 0.1).abs().max().item()


def check_lazy_import() -> float:
    """The server and the other back ends import nothing of Triton, though it is importable (the child)."""
    import tinyserve.layers.methods  # noqa: F401
    import tinyserve.server.app  # noqa: F401

    select_backend("auto", "cpu")
    loaded = [n for n in sys.modules if n.split(".")[0] == "triton" or (n.startswith("tinyserve") and "triton" in n)]
    assert not loaded, f"imported {loaded}"
    return 0.0


def check_engine(kv_cache_dtype: str) -> float:
    """The whole engine on a tiny random model, served with the back end (on the CPU registered anew, in
    the child only) and with sdpa: chunked prefills, a prefix served from the cache (chunks over cached
    context), decodes, the KV pool in `kv_cache_dtype`. Same greedy tokens; returns the largest gap
    between their logprobs."""
    import tempfile
    from pathlib import Path

    from tinyserve import LLM, SamplingParams
    from tinyserve.attention import ATTENTION_BACKENDS
    from tinyserve.attention.triton_backend import TritonBackend

    from conftest import TINY, make_tiny_checkpoint

    name = "triton"
    if DEVICE == "cpu":
        name = "triton-interpreted"
        if name not in ATTENTION_BACKENDS:
            ATTENTION_BACKENDS.register(name)(lambda device: TritonBackend())
    shared = list(range(100, 130))
    prompts = [shared + [5, 6], list(range(7, 12)), [5], shared + list(range(40, 61))]
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=0, ignore_eos=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_checkpoint(Path(tmp), "llama", hidden_size=96, num_attention_heads=6,
                                    num_key_value_heads=2)  # GQA 3, head_dim 16
        runs = []
        for backend in (name, "sdpa"):
            llm = LLM(str(path), attention_backend=backend, block_size=4, max_num_batched_tokens=24,
                      kv_cache_memory_gb=0.01, kv_cache_dtype=kv_cache_dtype, device=DEVICE, **TINY)
            llm.generate(prompts[:1], params)  # its blocks serve the others' shared prefix
            outs = llm.generate(prompts, params)
            assert outs[3].num_cached_tokens > 0  # so its prefill is a chunk over cached context
            runs.append([o.outputs[0] for o in outs])
    gap = 0.0
    for a, b in zip(*runs):
        assert a.token_ids == b.token_ids, (a.token_ids, b.token_ids)
        gap = max([gap] + [abs(la[t].logprob - lb[t].logprob) for t, la, lb in zip(a.token_ids, a.logprobs,
                                                                                    b.logprobs)])
    return gap


@pytest.fixture(scope="module")
def results():
    return kernel_results(__file__)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_softmax_reference(results, case: Case):
    assert_within(results, case.id, TOL[case.dtype])


def test_reads_a_float8_pool(results):
    assert_within(results, "float8_pool", TOL[torch.bfloat16])


def test_padding_rows_are_zeros(results):
    assert_within(results, "padding_rows", 0)


def test_other_back_ends_import_no_triton(results):
    assert_within(results, "lazy_import", 0)


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_engine_gives_sdpa_answers(results, kv_cache_dtype):
    assert_within(results, f"engine-{kv_cache_dtype}", 1e-4)


def test_refuses_cpu_and_a_missing_triton(monkeypatch):
    with pytest.raises(ValueError, match="runs on CUDA"):
        select_backend("triton", "cpu")
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(ValueError, match="needs the triton package"):
        select_backend("triton", "cuda")
    assert select_backend("auto", "cuda").name == "sdpa"


def test_auto_picks_triton_on_cuda_where_it_imports(monkeypatch):
    """`auto` on cuda chooses `triton` when the package is there (its module stubbed: no GPU here)."""
    import importlib.util
    import types

    stub = types.ModuleType("tinyserve.attention.triton_backend")
    stub.TritonBackend = type("TritonBackend", (), {"name": "triton"})  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tinyserve.attention.triton_backend", stub)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    assert select_backend("auto", "cuda").name == "triton"
    assert select_backend("auto", "cpu").name != "triton"


def test_cpu_venv_keeps_triton_out_of_sight():
    """On torch's CPU build triton must not be importable: torch would find it and import it at every start."""
    import importlib.util

    if torch.version.cuda is not None:
        pytest.skip("a CUDA build of torch ships triton")
    assert importlib.util.find_spec("triton") is None


if __name__ == "__main__":
    checks = {"lazy_import": check_lazy_import, "float8_pool": check_float8_pool, "padding_rows": check_padding_rows}
    report(list(checks.items()) + [(c.id, c.error) for c in CASES]
           + [(f"engine-{kv}", lambda kv=kv: check_engine(kv)) for kv in ("auto", "int8")])
