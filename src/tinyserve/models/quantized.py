"""Quantized model directories, read: `tinyserve quantize`'s own layout and the field's (AutoGPTQ,
AutoAWQ), each weight as a `QuantizedTensor` that the `checkpoint` method serves on the packed kernels
with no re-quantization. The lab's quantizers write them (tinyserve_lab/quantize/).

Ours:
    DIR/config.json          the HF config (architecture), as for any HF directory
    DIR/tokenizer*.json ...  the tokenizer files
    DIR/quantization.json    how it was made (method, bits, group, calibration) + one entry per quantized tensor
    DIR/model.safetensors    dense tensors under their HF names; a quantized tensor NAME as NAME.q (codes),
                             NAME.scales and, for "int"/"intz", NAME.zeros
Codes of 4 bits and fewer are packed two per byte along K (low nibble = even column); scales and zeros
are bf16, the values the quantizer chose its codes against; "intz" zero points are uint8 integers.

The field's, per linear `P` (K in, N out, groups of G along K), int32 words of eight 4-bit values,
value i at bits 4i..4i+3, and w[n, k] = scales[g, n] * (q[n, k] - zq[g, n]), g = k // G:
- AutoGPTQ (`quant_method: gptq`, checkpoint format v1): `P.qweight` [K/8, N] packs along K;
  `P.qzeros` [K/G, N/8] packs zq - 1 along N (v1's offset); `P.scales` [K/G, N] fp16; `P.g_idx` [K]
  = k // G (`desc_act: false`: groups contiguous, as the int4 kernel needs them).
- AutoAWQ GEMM (`quant_method: awq`, `version: gemm`): `P.qweight` [K, N/8] and `P.qzeros` [K/G, N/8]
  pack along N in the interleaved order AWQ_ORDER (nibble i holds column 8j + AWQ_ORDER[i]), zq as
  is; `P.scales` [K/G, N] fp16.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from tinyserve.layers.formats import QuantizedTensor, WeightSource

CONFIG_FILE = "quantization.json"
WEIGHTS_FILE = "model.safetensors"
SCHEMA = "tinyserve.quantized/1"
GPTQ, AWQ = "gptq", "awq"
FORMATS = (GPTQ, AWQ)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = tuple(AWQ_ORDER.index(j) for j in range(8))  # (0, 4, 1, 5, 2, 6, 3, 7)
PARTS = ("qweight", "qzeros", "scales", "g_idx")


def unpack_nibbles(b: torch.Tensor) -> torch.Tensor:
    """[N, K/2] bytes -> uint8 codes 0..15 [N, K], low nibble first."""
    return torch.stack([b & 15, b >> 4], dim=-1).view(b.shape[0], -1)


def unpack_int32(p: torch.Tensor) -> torch.Tensor:
    """int32 [R, C/8] -> uint8 [R, C]: value i of each word at bits 4i."""
    v = (p.to(torch.int64)[..., None] >> (4 * torch.arange(8))) & 15
    return v.reshape(p.shape[0], -1).to(torch.uint8)


def interleave(v: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """Columns [R, C] regrouped by 8 in `order` (AWQ's packing order and its inverse)."""
    r, c = v.shape
    return v.reshape(r, c // 8, 8)[..., list(order)].reshape(r, c)


def read_info(path: Path) -> dict[str, Any]:
    return dict(json.loads((path / CONFIG_FILE).read_text()))


def is_quantized_dir(path: Path) -> bool:
    """A directory whose weights are stored quantized: ours, or the field's GPTQ/AWQ layouts."""
    return (path / CONFIG_FILE).is_file() or hf_quantization(path) is not None


def quantized_weights(path: Path) -> Iterator[tuple[str, WeightSource]]:
    """Every weight of the directory by HF name: dense tensors as stored, quantized ones as QuantizedTensors."""
    from safetensors import safe_open

    if not (path / CONFIG_FILE).is_file():
        yield from hf_quantized_weights(path)
        return
    info = read_info(path)
    if info.get("schema") != SCHEMA:
        raise ValueError(f"{path / CONFIG_FILE}: schema {info.get('schema')!r}, expected {SCHEMA!r}")
    entries: dict[str, dict[str, Any]] = info["tensors"]
    parts = {f"{n}.{p}" for n in entries for p in ("q", "scales", "zeros")}
    with safe_open(str(path / WEIGHTS_FILE), framework="pt") as f:
        keys = set(f.keys())
        for key in f.keys():
            if key not in parts:
                yield key, f.get_tensor(key)
        for name, e in entries.items():
            q = f.get_tensor(f"{name}.q")
            q = unpack_nibbles(q) if e["bits"] <= 4 else q
            if list(q.shape) != e["shape"]:
                raise ValueError(f"{name}: stored codes {tuple(q.shape)}, quantization.json says {e['shape']}")
            zeros = f.get_tensor(f"{name}.zeros") if f"{name}.zeros" in keys else None
            yield name, QuantizedTensor(e["format"], e["bits"], e["group"], q, f.get_tensor(f"{name}.scales"), zeros)


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
        q = interleave(unpack_int32(parts["qweight"]), AWQ_REVERSE_ORDER).t().contiguous()
        zq = interleave(unpack_int32(parts["qzeros"]), AWQ_REVERSE_ORDER).to(torch.int16)
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
