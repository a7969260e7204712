"""The field's 4-bit checkpoint layouts, written (`tinyserve quantize --format gptq|awq`), so that what
tinyserve quantizes other engines serve (and what they quantize, tinyserve serves: the engine reads both).

Both layouts are described in tinyserve/models/quantized.py, which reads them.

Exports are exact for the "intz" grid (`--zero int`): its scales are bf16 values in fp16's normal
range (exact in fp16) and its zero points integers 1..15. Dense tensors are written as stored; an
int8 LM head (`--head int8`) has no place in these layouts and is written dequantized (fp32, exact).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tinyserve.layers.formats import QuantizedTensor, WeightSource
from tinyserve.models.quantized import AWQ, AWQ_ORDER, FORMATS, GPTQ, WEIGHTS_FILE, interleave

INFO_FILE = "quantize_info.json"  # how tinyserve made it; the loaders of the field ignore it


# -- int32 words of eight nibbles ---------------------------------------------------------------------------
def pack_int32(v: torch.Tensor) -> torch.Tensor:
    """Values 0..15 [R, C] (C a multiple of 8) -> int32 [R, C/8], value i of each 8 at bits 4i."""
    r, c = v.shape
    words = (v.to(torch.int64).view(r, c // 8, 8) << (4 * torch.arange(8))).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # the same 32 bits, signed


# -- writing ------------------------------------------------------------------------------------------------
def to_hf_tensors(t: QuantizedTensor, fmt: str) -> dict[str, torch.Tensor]:
    """One linear's tensors in `fmt`, by part name."""
    if t.format != "intz" or t.bits != 4:
        raise ValueError(f"--format {fmt} stores 4-bit groups with integer zero points (--bits 4 --zero int); "
                         f"got {t.format} {t.bits}-bit")
    n, k = t.shape
    if n % 8:
        raise ValueError(f"--format {fmt} packs 8 output rows per word; this weight has {n}")
    assert t.zeros is not None
    zq = t.zeros.to(torch.int64).t()  # [G, N]
    low = 1 if fmt == GPTQ else 0  # v1 writes zq - 1
    if int(zq.min()) < low or int(zq.max()) > 15:
        raise ValueError(f"--format {fmt} stores zero points {low}..15; got {int(zq.min())}..{int(zq.max())}")
    scales = t.scales.float().t().to(torch.float16).contiguous()
    if fmt == GPTQ:
        return {"qweight": pack_int32(t.q).t().contiguous(),
                "qzeros": pack_int32(zq - 1), "scales": scales,
                "g_idx": (torch.arange(k) // t.group).to(torch.int32)}
    return {"qweight": pack_int32(interleave(t.q.t(), AWQ_ORDER)),
            "qzeros": pack_int32(interleave(zq, AWQ_ORDER)), "scales": scales}


def quantization_config(fmt: str, group: int, sym: bool, info: Mapping[str, Any]) -> dict[str, Any]:
    """config.json's `quantization_config`, as the field's loaders read it."""
    if fmt == GPTQ:
        return {"quant_method": GPTQ, "bits": 4, "group_size": group, "desc_act": False, "sym": sym,
                "static_groups": bool(info.get("act_order")), "true_sequential": True,
                "damp_percent": info.get("damp", 0.01), "checkpoint_format": "gptq", "lm_head": False}
    return {"quant_method": AWQ, "bits": 4, "group_size": group, "zero_point": True, "version": "gemm",
            "modules_to_not_convert": None}


def save_hf_quantized(out: Path, weights: Mapping[str, WeightSource], hf_config: dict[str, Any], tokenizer: Any,
                      info: dict[str, Any], fmt: str) -> Path:
    """Write an HF model directory in `fmt` ("gptq" | "awq") from `weights` by HF name (the decoder's
    linears QuantizedTensors on the "intz" 4-bit grid; an int8 head is dequantized)."""
    from safetensors.torch import save_file

    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    groups = set()
    sym = True  # every zero point the middle code: GPTQ's sym=true
    for name, w in weights.items():
        if isinstance(w, QuantizedTensor) and w.format == "int8":  # the head: no int8 rows in these layouts
            tensors[name] = w.dequantize()
        elif isinstance(w, QuantizedTensor):
            prefix = name.removesuffix(".weight")
            try:
                parts = to_hf_tensors(w, fmt)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
            tensors.update({f"{prefix}.{p}": v for p, v in parts.items()})
            groups.add(w.group)
            sym = sym and w.zeros is not None and bool((w.zeros == 8).all())
        elif isinstance(w, torch.Tensor):
            tensors[name] = w.contiguous()
        else:
            raise TypeError(f"{name}: cannot store a {type(w).__name__}")
    if len(groups) != 1:
        raise ValueError(f"--format {fmt} has one group size per model; got {sorted(groups) or 'none'}")
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    config = {**hf_config, "quantization_config": quantization_config(fmt, groups.pop(), sym, info)}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / INFO_FILE).write_text(json.dumps({**info, "format": fmt}, indent=1))
    tokenizer.save_pretrained(str(out))
    return out


