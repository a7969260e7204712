"""Our GGUF kernel (layers/gguf_native.py, layers/csrc/gguf_linear.cpp) against `gguf`'s own
dequantization, for every block type it reads: random blocks (every bit pattern of codes, scales and
high bits) with plausible fp16 scales."""

from __future__ import annotations

import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch

from tinyserve.layers import gguf_native
from tinyserve.layers.formats import GGUFTensor
from tinyserve.layers.gguf_native import ERROR_BOUND, QTYPES, GGUFWeight
from tinyserve.layers.methods import GGUFMethod
from tinyserve.layers.packed import Int4Weight

# bytes per block, weights per block, byte offsets of the block's fp16 fields
LAYOUT = {"Q4_0": (18, 32, (0,)), "Q4_1": (20, 32, (0, 2)), "Q5_0": (22, 32, (0,)), "Q5_1": (24, 32, (0, 2)),
          "Q8_0": (34, 32, (0,)), "Q4_K": (144, 256, (0, 2)), "Q5_K": (176, 256, (0, 2)), "Q6_K": (210, 256, (208,))}



@pytest.fixture(autouse=True)
def _kernel() -> None:
    """Built and loaded here, not at import: the portable test's child process imports this module and
    loads the other build of the same op."""
    if not gguf_native.kernel_available():
        pytest.skip("no C++ compiler to build the kernel")


def random_blocks(qtype: str, n: int, k: int, seed: int = 0) -> GGUFTensor:
    nbytes, qk, fields = LAYOUT[qtype]
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 256, (n, k // qk, nbytes), dtype=np.uint8)
    for f in fields:  # scales of real files' magnitude; Q4_1/Q5_1's second field is a (negative) min
        v = (rng.random((n, k // qk)) * 0.02 + 1e-3).astype(np.float16)
        b[..., f : f + 2] = (-v if f == 2 and qtype in ("Q4_1", "Q5_1") else v).view(np.uint8).reshape(n, k // qk, 2)
    return GGUFTensor(qtype, torch.from_numpy(b.reshape(n, -1)), (n, k))


def reference(t: GGUFTensor) -> torch.Tensor:
    w = gguf.quants.dequantize(t.data.numpy(), gguf.GGMLQuantizationType[t.qtype])
    return torch.from_numpy(w.copy()).view(t.shape).double()


def run(x: torch.Tensor, shards: list[GGUFTensor]) -> torch.Tensor:
    return torch.ops.tinyserve.gguf_linear(x, [s.data for s in shards], [QTYPES[s.qtype] for s in shards])


def group_amax(x: torch.Tensor, group: int) -> torch.Tensor:
    """Each activation's group maximum |x|, broadcast back to [M, K]."""
    m, k = x.shape
    return x.abs().view(m, k // group, group).amax(-1, keepdim=True).expand(m, k // group, group).reshape(m, k)


@pytest.mark.parametrize("qtype", list(LAYOUT))
@pytest.mark.parametrize("rows", [1, 3, 6, 35])
def test_kernel_matches_gguf_dequantization_within_its_bound(qtype, rows):
    """37 output rows (uneven thread ranges), 1/3/6/35 activation rows (in registers, in groups of 32
    and a remainder), fp32
    activations (not bf16-representable: the int16 rounding is exercised): within the stated bound."""
    t = random_blocks(qtype, 37, 512, seed=rows)
    x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(rows))
    w = reference(t)
    y = run(x, [t])
    assert y.dtype == torch.float32 and y.shape == (rows, 37)
    ref = x.double() @ w.t()
    group = 256 if qtype.endswith("_K") else 32
    bound = ERROR_BOUND * (group_amax(x, group).double() @ w.abs().t()) + 1e-6 * (x.double().abs() @ w.abs().t())
    err = (y.double() - ref).abs()
    assert bool((err <= bound).all()), f"max error {err.max():.3g}, bound there {bound.flatten()[err.argmax()]:.3g}"


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K", "Q8_0", "Q5_1"])
def test_bf16_activations_near_their_group_maximum_are_exact(qtype):
    """bf16 values within 2^7 of their group's largest are represented exactly, so the product is the
    exact one up to fp32 accumulation (before the result is rounded to bf16)."""
    g = torch.Generator().manual_seed(0)
    signs = torch.randint(0, 2, (2, 512), generator=g) * 2 - 1
    magnitudes = torch.exp2(torch.randint(-6, 1, (2, 512), generator=g).float())
    x = signs * magnitudes * (1 + torch.rand(2, 512, generator=g))
    x = x.bfloat16().float()  # every value in [2^-6, 2^1): within 2^7 of any group's maximum
    t = random_blocks(qtype, 16, 512)
    ref = x.double() @ reference(t).t()
    torch.testing.assert_close(run(x, [t]).double(), ref, rtol=1e-5, atol=1e-5)


def test_mixed_shards_are_one_call_and_match_each_alone():
    """A fused q/k/v whose shards are of different types (Q4_K_M files mix Q4_K and Q6_K): one call
    gives each shard's own product in its columns, bit for bit."""
    shards = [random_blocks("Q4_K", 24, 256, 1), random_blocks("Q6_K", 8, 256, 2), random_blocks("Q8_0", 8, 256, 3)]
    x = torch.randn(3, 256).bfloat16()
    y = run(x, shards)
    assert y.dtype == torch.bfloat16 and y.shape == (3, 40)
    assert torch.equal(y, torch.cat([run(x, [s]) for s in shards], dim=1))


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K", "Q4_0", "Q4_1", "Q5_K"])
def test_each_row_is_computed_alone(qtype):
    """Batch invariance: a row's result does not depend on the rows beside it. 1 to 4 rows keep their
    sums in registers, more go through groups of 32 in memory, 40 rows are a group and a remainder:
    every way sums in the same order."""
    t = random_blocks(qtype, 40, 512)
    x = torch.randn(40, 512).bfloat16()
    y = run(x, [t])
    for i in (0, 5, 31, 32, 39):
        assert torch.equal(y[i : i + 1], run(x[i : i + 1], [t]))
    for lo, hi in ((2, 5), (3, 10), (0, 33)):
        assert torch.equal(y[lo:hi], run(x[lo:hi], [t]))


def run_repacked(x: torch.Tensor, shards: list[GGUFTensor]) -> torch.Tensor:
    """Through each shard's repacked form, where it has one: on AMX tiles where the CPU has them, else
    (Q4_K) on the vector units."""
    tiles = [torch.ops.tinyserve.gguf_repack(s.data, QTYPES[s.qtype]) for s in shards]
    return torch.ops.tinyserve.gguf_linear(x, [s.data for s in shards], [QTYPES[s.qtype] for s in shards], tiles)


needs_repacked = pytest.mark.skipif("not gguf_native.repack_available()", reason="no AVX-512 VNNI on this CPU")
no_amx = pytest.mark.skipif("gguf_native.tiles_available()", reason="AMX: the repacked form goes to the tiles")


@needs_repacked
@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
@pytest.mark.parametrize("rows", [1, 3, 8, 17, 35])
def test_repacked_matches_gguf_dequantization_within_its_bound(qtype, rows):
    """Q4_K and Q6_K repacked (on AMX tiles where the CPU has them, else the vector units): 48 output rows (three
    16-row groups, uneven over threads), 1 to 35 activation rows (a partial tile, a full one, more than
    one; one to four rows at a time and a remainder), fp32 activations: within the int16 path's bound,
    and that path's result up to fp32 rounding (the same integer sums, scaled and summed in another
    order)."""
    t = random_blocks(qtype, 48, 768, seed=rows)
    x = torch.randn(rows, 768, generator=torch.Generator().manual_seed(rows))
    w = reference(t)
    y = run_repacked(x, [t])
    ref = x.double() @ w.t()
    bound = ERROR_BOUND * (group_amax(x, 256).double() @ w.abs().t()) + 1e-6 * (x.double().abs() @ w.abs().t())
    err = (y.double() - ref).abs()
    assert bool((err <= bound).all()), f"max error {err.max():.3g}, bound there {bound.flatten()[err.argmax()]:.3g}"
    scale = x.double().abs() @ w.abs().t()  # fp32 rounding is relative to the terms' size, not the sum's
    assert bool(((y.double() - run(x, [t]).double()).abs() <= 1e-6 * scale).all())


@needs_repacked
def test_tiles_in_a_fused_linear_and_where_they_cannot_go():
    """A fused q/k/v of Q4_K, Q6_K and Q4_K shards: the first repacked, the Q6_K (8 rows) and the Q4_K
    starting off a 16-row boundary on the int16 path; each column block is its shard's own product. A
    Q4_K whose rows are not in 16s has no repacked form."""
    shards = [random_blocks("Q4_K", 32, 256, 1), random_blocks("Q6_K", 8, 256, 2), random_blocks("Q4_K", 16, 256, 3)]
    tiles = [torch.ops.tinyserve.gguf_repack(s.data, QTYPES[s.qtype]) for s in shards]
    assert [t.numel() > 0 for t in tiles] == [True, False, True]
    x = torch.randn(6, 256).bfloat16()
    y = run_repacked(x, shards)
    assert torch.equal(y[:, :32], run_repacked(x, shards[:1]))
    assert torch.equal(y[:, 32:], torch.cat([run(x, [s]) for s in shards[1:]], dim=1))
    assert torch.ops.tinyserve.gguf_repack(random_blocks("Q4_K", 8, 256).data, QTYPES["Q4_K"]).numel() == 0


@needs_repacked
@no_amx
@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
def test_vector_path_computes_each_row_alone(qtype):
    """Without AMX the repacked form is read by the vector units, one to four activation rows at a time:
    a row's result is the same bits whatever rows share its call."""
    t = random_blocks(qtype, 48, 512)
    x = torch.randn(11, 512).bfloat16()
    y = run_repacked(x, [t])
    for lo, hi in ((0, 1), (3, 4), (2, 5), (1, 11), (4, 9)):
        assert torch.equal(y[lo:hi], run_repacked(x[lo:hi], [t]))


@needs_repacked
@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
def test_weights_read_repacked_from_their_min_rows_except_in_the_invariant_mode(qtype):
    """The default mode reads steps of `repacked_min_rows()` rows or more from the repacked form (on
    AMX tiles or the vector units: a result within fp32 rounding of the int16 path's), fewer from the
    file's blocks (bit for bit); `gguf-native`, whose rows must never depend on the batch, keeps none."""
    cpu = torch.device("cpu")
    t = random_blocks(qtype, 32, 512)
    w = GGUFMethod(keep_dense=False).pack([t], torch.bfloat16, cpu)
    assert isinstance(w, GGUFWeight) and w.kind.endswith("+tiles" if gguf_native.tiles_available() else "+repacked")
    n = gguf_native.repacked_min_rows()[qtype]
    x = torch.randn(n + 1, 512).bfloat16()
    if n > 1:
        assert torch.equal(w(x[: n - 1]), run(x[: n - 1], [t]))
        assert w.bytes_read(n - 1) == t.data.nbytes
    assert torch.equal(w(x[:n]), run_repacked(x[:n], [t])) and torch.equal(w(x), run_repacked(x, [t]))
    assert w.bytes_read(n) == w.repacked0.nbytes
    native = GGUFMethod(kernel="native", keep_dense=False).pack([t], torch.bfloat16, cpu)
    assert isinstance(native, GGUFWeight) and not native.repacked_names
    assert torch.equal(native(x), run(x, [t]))


@pytest.mark.parametrize("qtype", list(LAYOUT))
def test_dequantization_is_gguf_bit_for_bit(qtype):
    """The dense copies' native dequantization: `gguf`'s fp32 values exactly, and their bf16 rounding;
    shards stacked along N (37 + 16 rows: uneven thread ranges)."""
    shards = [random_blocks(qtype, 37, 512, seed=1), random_blocks(qtype, 16, 512, seed=2)]
    ref = torch.cat([reference(s) for s in shards]).float()
    assert torch.equal(gguf_native.dequantize_into(shards, torch.float32), ref)
    assert torch.equal(gguf_native.dequantize_into(shards, torch.bfloat16), ref.bfloat16())
    assert torch.equal(gguf_native.dequantize_into(shards, torch.float16), ref.half())  # the torch-ops path


def test_bad_input_is_a_clear_error():
    t = random_blocks("Q4_K", 8, 256)
    with pytest.raises(RuntimeError, match="unsupported GGML type"):
        torch.ops.tinyserve.gguf_linear(torch.randn(1, 256), [t.data], [1])
    with pytest.raises(RuntimeError, match="must be contiguous uint8"):
        torch.ops.tinyserve.gguf_linear(torch.randn(1, 512), [t.data], [QTYPES["Q4_K"]])
    with pytest.raises(RuntimeError, match="not a multiple of the block size"):
        torch.ops.tinyserve.gguf_linear(torch.randn(1, 100), [t.data], [QTYPES["Q4_K"]])
    with pytest.raises(RuntimeError, match="float32 and bfloat16"):
        torch.ops.tinyserve.gguf_linear(torch.randn(1, 256).half(), [t.data], [QTYPES["Q4_K"]])
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        torch.ops.tinyserve.gguf_dequantize(t.data, QTYPES["Q4_K"], torch.empty(8, 256, dtype=torch.half))
    with pytest.raises(RuntimeError, match="blocks must be contiguous uint8"):
        torch.ops.tinyserve.gguf_dequantize(t.data, QTYPES["Q4_K"], torch.empty(8, 512))


def test_method_serves_each_type_on_its_kernel():
    """Q4_0/Q4_1 on PyTorch's int4 kernel (faster there), everything else on ours; the dense copy for
    large steps is the file's weights."""
    native = GGUFMethod().pack([random_blocks("Q4_K", 16, 256), random_blocks("Q6_K", 8, 256)], torch.bfloat16,
                               torch.device("cpu"))
    tiles = "+tiles" if gguf_native.tiles_available() else "+repacked" if gguf_native.repack_available() else ""
    assert isinstance(native, GGUFWeight) and native.kind == "gguf-Q4_K+Q6_K" + tiles
    assert native.dense is not None and native.dense.dtype == torch.bfloat16
    ref = torch.cat([reference(random_blocks("Q4_K", 16, 256)), reference(random_blocks("Q6_K", 8, 256))])
    assert torch.equal(native.dense, ref.bfloat16())
    int4 = GGUFMethod().pack([random_blocks("Q4_1", 16, 256)], torch.bfloat16, torch.device("cpu"))
    assert isinstance(int4, Int4Weight)
    assert isinstance(GGUFMethod(kernel="int4").pack([random_blocks("Q4_K", 16, 256)], torch.bfloat16,
                                                    torch.device("cpu")), Int4Weight)


def test_portable_path_builds_and_agrees():
    """The scalar path (what a CPU without AVX-512 VNNI compiles), in its own process (the op name is
    process-wide), gives the VNNI path's results: the same integer sums, scaled in the same order up to
    fp32 rounding; its dequantization the same values exactly."""
    script = """
import sys, torch
sys.path.insert(0, "tests")
from test_gguf_native import random_blocks, run
from tinyserve.layers.gguf_native import QTYPES, SOURCE
from tinyserve.native import CFLAGS, load_kernel
load_kernel(SOURCE, CFLAGS + ("-DTINYSERVE_PORTABLE",))
x = torch.randn(5, 512, generator=torch.Generator().manual_seed(0))
for q in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"):
    t = random_blocks(q, 16, 512)
    w = torch.empty(16, 512)
    torch.ops.tinyserve.gguf_dequantize(t.data, QTYPES[q], w)
    torch.save((run(x, [t]), w), f"{sys.argv[1]}/{q}.pt")
"""
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        proc = subprocess.run([sys.executable, "-c", script, out], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        x = torch.randn(5, 512, generator=torch.Generator().manual_seed(0))
        for q in LAYOUT:
            y, w = torch.load(f"{out}/{q}.pt")
            t = random_blocks(q, 16, 512)
            torch.testing.assert_close(y, run(x, [t]), rtol=1e-5, atol=1e-5)
            assert torch.equal(w, reference(t).float())


def test_without_vnni_the_default_stays_on_the_int4_kernel(monkeypatch):
    """Where our kernel would run its portable loop, `gguf` keeps PyTorch's int4 kernel (the types it
    maps) and dense copies (the rest); `gguf-native` (the batch-invariant mode's) still uses ours."""
    monkeypatch.setattr(gguf_native, "vectorized", lambda: False)
    cpu = torch.device("cpu")
    assert isinstance(GGUFMethod().pack([random_blocks("Q4_K", 16, 256)], torch.bfloat16, cpu), Int4Weight)
    assert GGUFMethod().pack([random_blocks("Q6_K", 16, 256)], torch.bfloat16, cpu).kind == "dense-bfloat16"
    native = GGUFMethod(kernel="native").pack([random_blocks("Q6_K", 16, 256)], torch.bfloat16, cpu)
    assert isinstance(native, GGUFWeight)
