"""The Triton int4 weight (layers/triton_int4.py) equals x @ W.T, W the codes' `(q - 8) * s + z` per group
(formats.dequant_groups, scales and zeros in the activation dtype as the module holds them), for batch
1..64, ragged N, groups 16..128, fp32/fp16/bf16. Its kernel runs under Triton's interpreter in a child
process (tests/triton_interp.py); TINYSERVE_TRITON_DEVICE=cuda runs them compiled for a GPU.

The error is the largest |got - reference| over the largest |reference|: fp32 1e-5; fp16 3e-3; bf16 2e-2
(the interpreter rounds to bf16 by truncation, twice per product: the weight and the output).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from triton_interp import DEVICE, assert_within, kernel_results, report

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@dataclass(frozen=True)
class Case:
    """x [m, k] times an [n, k] int4 weight in groups of `group`: round-to-nearest codes of a random
    matrix (`rtn`), or random codes, scales and zeros (`random`: every code and any zero)."""

    m: int
    n: int
    k: int
    group: int
    dtype: torch.dtype
    source: str = "rtn"
    id: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "id", f"{self.m}x{self.n}x{self.k}-g{self.group}-{str(self.dtype)[6:]}-{self.source}")

    def error(self) -> float:
        from tinyserve.layers.formats import dequant_groups
        from tinyserve.layers.methods import quantize_int4
        from tinyserve.layers.triton_int4 import TritonInt4Weight

        g = torch.Generator().manual_seed(self.m * 1000 + self.n)
        if self.source == "rtn":
            q, scales, zeros = quantize_int4(torch.randn(self.n, self.k, generator=g), self.group, self.dtype)
        else:
            q = torch.randint(0, 16, (self.n, self.k), generator=g)
            scales = torch.rand(self.n, self.k // self.group, generator=g) * 0.1
            zeros = torch.randn(self.n, self.k // self.group, generator=g) * 0.2
        weight = TritonInt4Weight(q, scales, zeros, self.group, self.dtype, torch.device(DEVICE))
        x = torch.randn(self.m, self.k, generator=g).to(self.dtype)
        got = weight(x.to(DEVICE)).cpu()
        assert got.shape == (self.m, self.n) and got.dtype == self.dtype
        w = dequant_groups(q, weight.scales.cpu().double(), weight.zeros.cpu().double(), self.group)
        ref = x.double() @ w.T
        return ((got.double() - ref).abs().max() / ref.abs().max()).item()


F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
CASES = [
    Case(1, 64, 64, 32, F32),
    Case(1, 96, 128, 32, F32, "random"),
    Case(1, 70, 256, 64, F16),
    Case(1, 33, 128, 128, BF16),
    Case(2, 64, 96, 32, F32),
    Case(3, 130, 64, 16, F32, "random"),
    Case(5, 70, 64, 16, BF16),
    Case(7, 17, 192, 64, F16, "random"),
    Case(8, 128, 128, 32, BF16, "random"),
    Case(16, 64, 256, 128, F32),
    Case(16, 200, 64, 32, F16),
    Case(17, 33, 128, 128, F32),
    Case(17, 65, 96, 32, BF16),
    Case(24, 48, 64, 64, F16, "random"),
    Case(32, 96, 128, 16, F32),
    Case(33, 64, 64, 32, BF16, "random"),
    Case(40, 100, 160, 32, F32, "random"),
    Case(48, 64, 128, 64, F16),
    Case(63, 31, 64, 32, F32),
    Case(64, 128, 256, 64, F16),
    Case(64, 96, 128, 128, BF16),
    Case(64, 80, 96, 16, F32, "random"),
]


def check_refuses_odd_groups() -> float:
    """Groups the kernel cannot step through (not a power of two, under 16, not dividing K) are refused."""
    from tinyserve.layers.triton_int4 import TritonInt4Weight

    for group, k in ((24, 96), (8, 64), (64, 96)):
        q, s = torch.zeros(4, k, dtype=torch.uint8), torch.ones(4, k // group)
        try:
            TritonInt4Weight(q, s, s, group, torch.float32, torch.device("cpu"))
        except ValueError:
            continue
        raise AssertionError(f"group {group} of K {k} accepted")
    return 0.0


@pytest.fixture(scope="module")
def results():
    return kernel_results(__file__)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_matches_dequantized_matmul(results, case: Case):
    assert_within(results, case.id, TOL[case.dtype])


def test_refuses_groups_it_cannot_step_through(results):
    assert_within(results, "odd_groups", 0)


if __name__ == "__main__":
    report([("odd_groups", check_refuses_odd_groups)] + [(c.id, c.error) for c in CASES])
