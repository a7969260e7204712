"""The eager steps' native RMSNorm and SiLU(gate) * up (models/eager_ops.py): equal to ATen's ops within
bf16's rounding (fp32: to float error), each row computed alone, and kept out of traced graphs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tinyserve.models import eager_ops


@pytest.fixture(scope="module", autouse=True)
def kernels():
    eager_ops.OPS.load()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2**-8)])
@pytest.mark.parametrize("rows,width", [(1, 576), (5, 1536), (70, 37)])  # 37: a partial vector at the end
def test_ops_match_aten(dtype, tol, rows, width):
    g = torch.Generator().manual_seed(rows * width)
    x = (torch.randn(rows, width, generator=g) * 4).to(dtype)
    w = (torch.rand(width, generator=g) + 0.5).to(dtype)
    ref = F.rms_norm(x.float(), (width,), w.float(), 1e-6)
    out = torch.ops.tinyserve.rms_norm(x, w, 1e-6)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
    gu = (torch.randn(rows, 2 * width, generator=g) * 4).to(dtype)
    gate, up = gu.float().chunk(2, dim=-1)
    torch.testing.assert_close(torch.ops.tinyserve.silu_mul(gu).float(), F.silu(gate) * up, rtol=tol, atol=tol)


@pytest.mark.parametrize("op", ["rms_norm", "silu_mul"])
def test_a_row_alone_gets_the_bits_it_gets_among_others(op):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(300, 1152, generator=g) * 3).to(torch.bfloat16)
    w = (torch.rand(1152, generator=g) + 0.5).to(torch.bfloat16)
    run = (lambda t: torch.ops.tinyserve.rms_norm(t, w, 1e-5)) if op == "rms_norm" else torch.ops.tinyserve.silu_mul
    together = run(x)
    for r in (0, 137, 299):
        assert torch.equal(run(x[r : r + 1].contiguous())[0], together[r])


def test_eager_steps_use_them_and_traced_graphs_do_not(monkeypatch):
    monkeypatch.setattr(eager_ops, "_enabled", False)
    assert eager_ops.enable(torch.bfloat16, "cpu")

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(64, dtype=torch.bfloat16), requires_grad=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return eager_ops.silu_mul(torch.cat([eager_ops.rms_norm(x, self.w, 1e-5)] * 2, dim=-1))

    x = torch.randn(4, 64, dtype=torch.bfloat16)
    with torch.profiler.profile() as prof:
        eager = Block()(x)
    assert {"tinyserve::rms_norm", "tinyserve::silu_mul"} <= {e.name for e in prof.events()}
    graph = str(torch.export.export(Block(), (x,), strict=False).graph)
    assert "tinyserve" not in graph and "rms_norm" in graph  # ATen's ops, for inductor to fuse
    a = eager_ops.rms_norm(x, Block().w, 1e-5)
    torch.testing.assert_close(eager, F.silu(a) * a, rtol=2**-7, atol=2**-7)
