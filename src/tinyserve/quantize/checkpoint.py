"""A quantized model directory: what `tinyserve quantize` writes and `LLM(DIR)` serves.

    DIR/config.json          the HF config (architecture), as for any HF directory
    DIR/tokenizer*.json ...  the tokenizer files
    DIR/quantization.json    how it was made (method, bits, group, calibration) + one entry per quantized tensor
    DIR/model.safetensors    dense tensors under their HF names; a quantized tensor NAME as NAME.q (codes),
                             NAME.scales and, for "int"/"intz", NAME.zeros

Codes of 4 bits and fewer are packed two per byte along K (low nibble = even column), so the file is as
small as the format; 3-bit codes take a nibble too (a 3-bit file is not smaller than a 4-bit one:
the kernel that runs it is the int4 one). Scales and zeros are bf16, the values the quantizer chose
its codes against, so loading is exact in bf16 and fp32 activations alike; "intz" zero points are
uint8 integers.

`hf_format.py` writes and reads the field's layouts (AutoGPTQ, AutoAWQ) instead; `quantized_weights`
reads either kind of directory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from tinyserve.layers.linear import WeightSource
from tinyserve.layers.quant import QuantizedTensor

CONFIG_FILE = "quantization.json"
WEIGHTS_FILE = "model.safetensors"
SCHEMA = "tinyserve.quantized/1"


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 [N, K] (K even) -> [N, K/2] bytes."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_nibbles(b: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_nibbles`."""
    return torch.stack([b & 15, b >> 4], dim=-1).view(b.shape[0], -1)


def save_quantized(out: Path, weights: Mapping[str, WeightSource], hf_config: dict[str, Any], tokenizer: Any,
                   info: dict[str, Any]) -> Path:
    """Write the directory: `weights` by HF name (dense tensors and QuantizedTensors), the HF config,
    the tokenizer (anything with `save_pretrained`), and `info` (how it was made) into quantization.json."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict[str, Any]] = {}
    for name, w in weights.items():
        if isinstance(w, torch.Tensor):
            tensors[name] = w.contiguous()
            continue
        if not isinstance(w, QuantizedTensor):
            raise TypeError(f"{name}: cannot store a {type(w).__name__}")
        entries[name] = {"format": w.format, "bits": w.bits, "group": w.group, "shape": list(w.shape)}
        tensors[f"{name}.q"] = pack_nibbles(w.q) if w.bits <= 4 else w.q.contiguous()
        tensors[f"{name}.scales"] = w.scales.to(torch.bfloat16).contiguous()
        if w.zeros is not None:
            zero_dtype = torch.uint8 if w.format == "intz" else torch.bfloat16
            tensors[f"{name}.zeros"] = w.zeros.to(zero_dtype).contiguous()
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config, indent=2))
    (out / CONFIG_FILE).write_text(json.dumps({"schema": SCHEMA, **info, "tensors": entries}, indent=1))
    tokenizer.save_pretrained(str(out))
    return out


def read_info(path: Path) -> dict[str, Any]:
    return dict(json.loads((path / CONFIG_FILE).read_text()))


def is_quantized_dir(path: Path) -> bool:
    """A directory whose weights are stored quantized: ours, or the field's GPTQ/AWQ layouts."""
    from tinyserve.quantize.hf_format import hf_quantization

    return (path / CONFIG_FILE).is_file() or hf_quantization(path) is not None


def quantized_weights(path: Path) -> Iterator[tuple[str, WeightSource]]:
    """Every weight of the directory by HF name: dense tensors as stored, quantized ones as QuantizedTensors."""
    from safetensors import safe_open

    if not (path / CONFIG_FILE).is_file():
        from tinyserve.quantize.hf_format import hf_quantized_weights

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
