"""Ablation of the decode attention path, side by side in one process on the bundled model.

v0: `cache[block_tables]` gather + SDPA(enable_gqa)   (the first version)
v1: index_select gather   + SDPA(enable_gqa)
v2: index_select gather   + KV-head-grouped queries   (the `sdpa` back end)
v3: the pool read in place by the native kernel       (the `paged` back end)
Variants are interleaved round by round so machine drift hits all of them alike.
Usage: .venv/bin/python scripts/ablate_decode_attention.py [--rounds 3] [--steps 8]
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
from tinyserve_lab.env_info import run_header, save_json
from tinyserve_lab.profile import decode_ms


class V0(SdpaBackend):
    def decode(self, q, k_cache, v_cache, meta: DecodeMeta, scale):
        b, nb = meta.block_tables.shape
        _, bs, h_kv, d = k_cache.shape
        k = k_cache[meta.block_tables].view(b, nb * bs, h_kv, d).transpose(1, 2)
        v = v_cache[meta.block_tables].view(b, nb * bs, h_kv, d).transpose(1, 2)
        return F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=meta.mask, scale=scale,
                                              enable_gqa=True).squeeze(2)


class V1(SdpaBackend):
    def decode(self, q, k_cache, v_cache, meta: DecodeMeta, scale):
        k, v = gather_blocks(k_cache, meta.block_tables), gather_blocks(v_cache, meta.block_tables)
        return F.scaled_dot_product_attention(q.unsqueeze(2), k, v, attn_mask=meta.mask, scale=scale,
                                              enable_gqa=True).squeeze(2)


VARIANTS: dict[str, type[AttentionBackend]] = {
    "v0_index_gqa": V0, "v1_index_select_gqa": V1, "v2_grouped_queries": SdpaBackend, "v3_paged_in_place": PagedBackend}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--result-dir", default="docs/results")
    args = p.parse_args()
    engine = LLMEngine(EngineConfig(max_num_seqs=32, max_num_batched_tokens=2048))
    points = [(1, 128), (1, 512), (32, 128), (32, 512)]
    best: dict[str, dict[str, float]] = {name: {} for name in VARIANTS}
    backends = {name: cls() for name, cls in VARIANTS.items()}
    for r in range(args.rounds):
        names = list(VARIANTS)[r % len(VARIANTS):] + list(VARIANTS)[: r % len(VARIANTS)]
        for name in names:
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
