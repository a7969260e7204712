"""Ablation of the decode attention path, side by side in one process on the bundled model.

v0: `cache[block_tables]` gather + SDPA(enable_gqa)   (the first version)
v1: index_select gather   + SDPA(enable_gqa)
v2: index_select gather   + KV-head-grouped queries   (the `sdpa` back end)
v3: the pool read in place by the native kernel       (the `paged` back end)
Variants are interleaved round by round so machine drift hits all of them alike; eager steps (the
report's numbers predate the compiled step, which would keep the back end it was traced with).
Usage: .venv/bin/python -m tinyserve_lab.ablations.decode_attention [--rounds 3] [--steps 8]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from tinyserve.attention.base import AttentionBackend, DecodeMeta, gather_blocks
from tinyserve.attention.paged import PagedBackend
from tinyserve.attention.sdpa import SdpaBackend
from tinyserve.config import EngineConfig
from tinyserve.engine.llm_engine import LLMEngine
from tinyserve_lab.ablations import rotated
from tinyserve_lab.env_info import run_header, save_json
from tinyserve_lab.profile import decode_ms


class V0(SdpaBackend):
    """The first version: advanced indexing copies the blocks, SDPA repeats K/V per query head."""

    def decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: DecodeMeta,
               scale: float) -> torch.Tensor:
        b, nb = meta.block_tables.shape
        _, bs, h_kv, d = k_cache.shape
        k = k_cache[meta.block_tables].view(b, nb * bs, h_kv, d).transpose(1, 2)
        v = v_cache[meta.block_tables].view(b, nb * bs, h_kv, d).transpose(1, 2)
        return F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=meta.mask, scale=scale,
                                              enable_gqa=True).squeeze(2)


class V1(SdpaBackend):
    """v0 with the cheaper gather (index_select), still SDPA's enable_gqa."""

    def decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: DecodeMeta,
               scale: float) -> torch.Tensor:
        k, v = gather_blocks(k_cache, meta.block_tables, q.dtype), gather_blocks(v_cache, meta.block_tables, q.dtype)
        return F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=meta.mask, scale=scale,
                                              enable_gqa=True).squeeze(2)


VARIANTS: dict[str, type[AttentionBackend]] = {
    "v0_index_gqa": V0, "v1_index_select_gqa": V1, "v2_grouped_queries": SdpaBackend, "v3_paged_in_place": PagedBackend}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--result-dir", default="docs/results")
    args = p.parse_args()
    # Eager: a compiled decode step keeps the back end it was traced with, whatever set_attention swaps in.
    engine = LLMEngine(EngineConfig(max_num_seqs=32, max_num_batched_tokens=2048, enforce_eager=True))
    points = [(1, 128), (1, 512), (32, 128), (32, 512)]
    best: dict[str, dict[str, float]] = {name: {} for name in VARIANTS}
    backends = {name: cls() for name, cls in VARIANTS.items()}
    for r in range(args.rounds):
        for name in rotated(list(VARIANTS), r):
            engine.model.set_attention(backends[name])
            for batch, ctx in points:
                ms = decode_ms(engine, batch, ctx, args.steps)
                key = f"batch{batch}_ctx{ctx}"
                best[name][key] = min(best[name].get(key, float("inf")), ms)
    print(f"{'decode ms/step (best of rounds)':<24}" + "".join(f"{k:>18}" for k in best["v0_index_gqa"]))
    for name, row in best.items():
        print(f"{name:<24}" + "".join(f"{v:>18.1f}" for v in row.values()))
    result = run_header("tinyserve.ablation/1", experiment="decode_attention", torch_threads=torch.get_num_threads(),
                        rounds=args.rounds, steps=args.steps, ms_per_step=best)
    print("wrote", save_json(result, Path(args.result_dir), "ablation-decode-attention"))


if __name__ == "__main__":
    main()
