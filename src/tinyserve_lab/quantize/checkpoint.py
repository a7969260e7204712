"""Writes `tinyserve quantize`'s own model directory; the engine reads it (tinyserve/models/quantized.py,
whose docstring gives the layout). 3-bit codes take a nibble too: a 3-bit file is not smaller than a
4-bit one, as the kernel that runs it is the int4 one. Scales and zeros are stored in bf16, the values
the quantizer chose its codes against, so loading is exact in bf16 and fp32 activations alike.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tinyserve.layers.formats import QuantizedTensor, WeightSource
from tinyserve.models.quantized import CONFIG_FILE, SCHEMA, WEIGHTS_FILE


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 [N, K] (K even) -> [N, K/2] bytes."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


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


