"""Time the paged decode kernel alone against the sdpa back end's gather + SDPA, per call (one layer).

    .venv/bin/python -m tinyserve_lab.ablations.paged_decode [--threads 1] [--batch 32] [--context 300]
Shapes of the bundled model (9 query heads, 3 KV heads, head_dim 64, 16-token blocks), fp32 and bf16.
"""

from __future__ import annotations

import argparse
import time

import torch

from tinyserve.attention import select_backend
from tinyserve.attention.base import AttentionBackend, BatchLayout, DecodeMeta, SeqSpan


def per_call_ms(backend: AttentionBackend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: DecodeMeta,
                reps: int = 20) -> float:
    """ms per `decode` call, best-effort warm (3 calls first), mean of `reps`."""
    for _ in range(3):
        backend.decode(q, k, v, meta, q.shape[-1] ** -0.5)
    t = time.perf_counter()
    for _ in range(reps):
        backend.decode(q, k, v, meta, q.shape[-1] ** -0.5)
    return (time.perf_counter() - t) / reps * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--context", type=int, default=300)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    b, ctx, h, h_kv, d, bs = args.batch, args.context, 9, 3, 64, 16
    nbk = -(-ctx // bs)
    spans = [SeqSpan(i, 1, ctx - 1, list(range(i * nbk, (i + 1) * nbk))) for i in range(b)]
    layout = BatchLayout(spans, [], torch.zeros(b, dtype=torch.long), bs, torch.device("cpu"))
    for dtype in (torch.float32, torch.bfloat16):
        k = torch.randn(b * nbk, bs, h_kv, d, dtype=dtype)
        v = torch.randn(b * nbk, bs, h_kv, d, dtype=dtype)
        q = torch.randn(b, h, d, dtype=dtype)
        row = {}
        for name in ("sdpa", "paged"):
            backend = select_backend(name, "cpu")
            meta = backend.build(layout).decode
            assert meta is not None  # every span is a decode
            row[name] = per_call_ms(backend, q, k, v, meta)
        rows = b * ctx * h_kv
        print(f"{str(dtype):>15}  sdpa {row['sdpa']:.3f} ms  paged {row['paged']:.3f} ms  "
              f"({row['paged'] * 1e6 / rows:.1f} ns per K/V row)")


if __name__ == "__main__":
    main()
