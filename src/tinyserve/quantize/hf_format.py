"""The field's 4-bit checkpoint layouts, written (`tinyserve quantize --format gptq|awq`) and read
(`LLM(DIR)` on such a directory, from us or from the hub), so that what tinyserve quantizes other
engines serve, and what they quantize tinyserve serves on its int4 kernel.

Both layouts store, per linear `P` (in_features K, out_features N, groups of G along K), int32 words
of eight 4-bit values, value i at bits 4i..4i+3, and w[n, k] = scales[g, n] * (q[n, k] - zq[g, n]),
g = k // G:

- AutoGPTQ (`quant_method: gptq`, checkpoint format v1, `sym: false`, or `sym: true` when every zq
  is 8, `--zero sym`): `P.qweight` [K/8, N] packs
  along K; `P.qzeros` [K/G, N/8] packs zq - 1 along N (v1's offset: a loader adds 1 back);
  `P.scales` [K/G, N] fp16; `P.g_idx` [K] int32 = k // G (`desc_act: false`: groups contiguous,
  which is what our act-order with static groups produces).
- AutoAWQ GEMM (`quant_method: awq`, `version: gemm`): `P.qweight` [K, N/8] and `P.qzeros` [K/G, N/8]
  pack along N in the interleaved order AWQ_ORDER (nibble i holds column 8j + AWQ_ORDER[i]), zq as
  is; `P.scales` [K/G, N] fp16.

Exports are exact for the "intz" grid (`--zero int`): its scales are bf16 values in fp16's normal
range (exact in fp16) and its zero points integers 1..15. Dense tensors are written as stored; an
int8 LM head (`--head int8`) has no place in these layouts and is written dequantized (fp32, exact).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from tinyserve.layers.linear import WeightSource
from tinyserve.layers.quant import QuantizedTensor

GPTQ, AWQ = "gptq", "awq"
FORMATS = (GPTQ, AWQ)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = tuple(AWQ_ORDER.index(j) for j in range(8))  # (0, 4, 1, 5, 2, 6, 3, 7)
WEIGHTS_FILE = "model.safetensors"
INFO_FILE = "quantize_info.json"  # how tinyserve made it; the loaders of the field ignore it
PARTS = ("qweight", "qzeros", "scales", "g_idx")


# -- int32 words of eight nibbles ---------------------------------------------------------------------------
def pack_int32(v: torch.Tensor) -> torch.Tensor:
    """Values 0..15 [R, C] (C a multiple of 8) -> int32 [R, C/8], value i of each 8 at bits 4i."""
    r, c = v.shape
    words = (v.to(torch.int64).view(r, c // 8, 8) << (4 * torch.arange(8))).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # the same 32 bits, signed


def unpack_int32(p: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_int32`: int32 [R, C/8] -> uint8 [R, C]."""
    v = (p.to(torch.int64)[..., None] >> (4 * torch.arange(8))) & 15
    return v.reshape(p.shape[0], -1).to(torch.uint8)


def _interleave(v: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """Columns [R, C] regrouped by 8 in `order` (AWQ's packing order and its inverse)."""
    r, c = v.shape
    return v.reshape(r, c // 8, 8)[..., list(order)].reshape(r, c)


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
    return {"qweight": pack_int32(_interleave(t.q.t(), AWQ_ORDER)),
            "qzeros": pack_int32(_interleave(zq, AWQ_ORDER)), "scales": scales}


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


# -- reading ------------------------------------------------------------------------------------------------
def hf_quantization(path: Path) -> dict[str, Any] | None:
    """The directory's `quantization_config` if it is one of the layouts read here, else None."""
    try:
        qc = json.loads((path / "config.json").read_text()).get("quantization_config")
    except (OSError, ValueError):
        return None
    return dict(qc) if isinstance(qc, dict) and qc.get("quant_method") in FORMATS else None


def check_supported(qc: Mapping[str, Any]) -> None:
    """A clear error for the variants of the layouts that the int4 kernel cannot take as stored."""
    method = qc["quant_method"]
    if qc.get("bits") != 4:
        raise ValueError(f"{method} checkpoints are read at 4 bits; this one has bits={qc.get('bits')}")
    if method == GPTQ and qc.get("checkpoint_format", "gptq") != "gptq":
        raise ValueError(f"GPTQ checkpoint_format {qc.get('checkpoint_format')!r}: only v1 ('gptq') is read")
    if method == AWQ and (str(qc.get("version", "gemm")).lower() != "gemm" or not qc.get("zero_point", True)):
        raise ValueError(f"AWQ version {qc.get('version')!r}, zero_point {qc.get('zero_point')}: only gemm with "
                         "zero points is read")


def from_hf_tensors(parts: Mapping[str, torch.Tensor], method: str, group: int) -> QuantizedTensor:
    """One linear's tensors in the layout -> a QuantizedTensor on the "intz" grid."""
    scales = parts["scales"].t().contiguous()  # [N, G]
    if method == GPTQ:
        q = unpack_int32(parts["qweight"].t().contiguous())  # [N, K]
        zq = unpack_int32(parts["qzeros"]).to(torch.int16) + 1  # v1 stores zq - 1
        g_idx = parts.get("g_idx")
        if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(q.shape[1]) // group):
            raise ValueError("GPTQ with act-order groups (desc_act, g_idx not k // group) is not read: the int4 "
                             "kernel needs contiguous groups")
    else:
        q = _interleave(unpack_int32(parts["qweight"]), AWQ_REVERSE_ORDER).t().contiguous()
        zq = _interleave(unpack_int32(parts["qzeros"]), AWQ_REVERSE_ORDER).to(torch.int16)
    zeros = zq[:, :q.shape[0]].t().contiguous()  # [N, G]; 16 (v1's wrapped zero of 0) decodes as the field's
    return QuantizedTensor("intz", 4, group, q, scales, zeros.to(torch.uint8))


def hf_quantized_weights(path: Path) -> Iterator[tuple[str, WeightSource]]:
    """Every weight of a GPTQ/AWQ directory by HF name: dense tensors as stored, each quantized linear's
    parts as one QuantizedTensor named `P.weight`."""
    from safetensors import safe_open

    qc = hf_quantization(path)
    if qc is None:
        raise ValueError(f"{path}: no gptq/awq quantization_config in config.json")
    check_supported(qc)
    method, group = qc["quant_method"], int(qc["group_size"])
    if group <= 0:
        raise ValueError(f"{path}: group_size {group}: only grouped checkpoints are read (the int4 kernel's groups)")
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                prefix, _, part = key.rpartition(".")
                if part in PARTS:
                    pending.setdefault(prefix, {})[part] = f.get_tensor(key)
                else:
                    yield key, f.get_tensor(key)
    for prefix, parts in pending.items():
        missing = {"qweight", "qzeros", "scales"} - parts.keys()
        if missing:
            raise ValueError(f"{path}: {prefix} lacks {', '.join(sorted(missing))}")
        yield f"{prefix}.weight", from_hf_tensors(parts, method, group)
