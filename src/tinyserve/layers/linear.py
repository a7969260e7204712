"""Every projection of the model, the LM head included, is a `Linear` built here.

A `Linear` is a shell: it knows its shape (one projection, or several fused along the output dim,
like q/k/v) and collects its weight shards as the loader hands them over. Once every shard is in,
its `QuantMethod` packs them into a weight module (`impl`) — dense, int8, int4, a GGUF block type —
and from then on `forward` is `impl(x)` (+ bias). Quantization is therefore a module swap inside the
shell (gpt-fast's way), chosen per engine by `--quantization` (layers/__init__.py registers the
methods), and the model file never changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn

from tinyserve.layers import bf16_gemm
from tinyserve.layers.formats import WeightSource, as_dense


class QuantMethod(Protocol):
    """Turns a linear's fp32 shards into the module that multiplies by them."""

    name: str
    keeps_stored: bool  # packs a file's quantized form as stored (GGUF blocks, codes), not from dense

    def pack(self, shards: Sequence[WeightSource], dtype: torch.dtype, device: torch.device) -> nn.Module: ...


class DenseWeight(nn.Module):
    """W [out, in] in the model dtype, or packed for our bf16 kernel (layers/bf16_gemm.py). The reference,
    and the large-batch kernel."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bf16_gemm.linear(x, self.weight)

    @property
    def dense_weight(self) -> torch.Tensor:
        return self.weight

    def bytes_read(self, rows: int) -> int:
        return self.weight.numel() * self.weight.element_size()

    @property
    def kind(self) -> str:
        layout = "-packed" if self.weight.dim() == 3 else ""
        return f"dense-{str(self.weight.dtype).removeprefix('torch.')}{layout}"


class Unquantized:
    """`--quantization none`: every weight dequantized into the model dtype."""

    name = "none"
    keeps_stored = False

    def pack(self, shards: Sequence[WeightSource], dtype: torch.dtype, device: torch.device) -> nn.Module:
        return DenseWeight(torch.cat([as_dense(s) for s in shards]).to(device=device, dtype=dtype))


class Linear(nn.Module):
    """y = x W^T (+ b); W is `sum(out_sizes)` x `in_features`, loaded shard by shard."""

    def __init__(self, in_features: int, out_sizes: Sequence[int], bias: bool, method: QuantMethod) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_sizes = list(out_sizes)
        self.out_features = sum(out_sizes)
        self.method = method
        self.bias = nn.Parameter(torch.empty(self.out_features), requires_grad=False) if bias else None
        self.impl: nn.Module | None = None
        self._pending: dict[int, WeightSource] = {}

    @property
    def loaded(self) -> bool:
        return self.impl is not None

    def load_shard(self, shard: int, src: WeightSource, dtype: torch.dtype, device: torch.device) -> None:
        """Take one shard; when the last one arrives, pack them all (and drop the fp32 copies)."""
        rows, cols = src.shape
        if (rows, cols) != (self.out_sizes[shard], self.in_features):
            raise ValueError(f"shape {(rows, cols)}, expected {(self.out_sizes[shard], self.in_features)}")
        self._pending[shard] = src
        if len(self._pending) == len(self.out_sizes):
            self.impl = self.method.pack([self._pending[i] for i in range(len(self.out_sizes))], dtype, device)
            self._pending.clear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.impl(x)  # type: ignore[misc]  # loaded before the first forward
        return y if self.bias is None else y + self.bias

    def bytes_read(self, rows: int) -> int:
        """Weight bytes a product with `rows` rows streams (the kernel depends on the row count)."""
        bias = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return self.impl.bytes_read(rows) + bias  # type: ignore[union-attr,operator]  # loaded

    def extra_repr(self) -> str:
        kind = getattr(self.impl, "kind", "unloaded")
        return f"in={self.in_features}, out={self.out_sizes}, bias={self.bias is not None}, weight={kind}"


def weight_bytes(module: nn.Module, dense_copies: bool = True) -> int:
    """Bytes of every parameter and buffer under `module`, counted once per storage (a tied embedding
    sharing the head's table is one table). Without `dense_copies`, the dense copies that packed
    weights keep for large batches are left out: the packed model's own size."""
    skip = set() if dense_copies else {id(t) for m in module.modules() if (t := getattr(m, "dense", None)) is not None}
    tensors = [t for t in [*module.parameters(), *module.buffers()] if id(t) not in skip]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())
