"""GGUF files: the model's config and tensors read with the `gguf` package, llama.cpp's Q/K row
permutation undone, exported once to a cached HF-format directory (fp32 weights, config.json, the
tokenizer) with the file's quantized blocks kept raw beside it.

Why an export: parsing a GGUF's metadata alone takes seconds of Python and converting its vocabulary
~15 s; later starts mmap the export in well under a second. The export is also what peers that cannot
read GGUF (vLLM, transformers) load for side-by-side runs.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from tinyserve.config import ModelConfig
from tinyserve.layers.formats import GGUFTensor, WeightSource
from tinyserve.models.llama import SUPPORTED_ARCHS
from tinyserve.system import cache_dir

log = logging.getLogger(__name__)

# The GGUF's quantized blocks, kept raw beside the export. In a subdirectory: loaders that take every
# top-level *.safetensors of an HF directory (vLLM, for one) must not read them as weights.
GGUF_BLOCKS_FILE = "gguf/blocks.safetensors"


_GGUF_NAMES = {
    "token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def _gguf_hf_name(name: str) -> str:
    parts = name.split(".")  # e.g. blk.3.attn_q.weight | output_norm.weight
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{_GGUF_NAMES[parts[2]]}.{parts[3]}"
    hf = _GGUF_NAMES[parts[0]]
    return f"{hf}.{parts[1]}" if hf == "lm_head" else f"model.{hf}.{parts[1]}"


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter interleaves each head's rotary halves; undo it to get HF's layout."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_config(reader, name: str) -> ModelConfig:
    f = {k: v.contents() for k, v in reader.fields.items() if not k.startswith("tokenizer.ggml.") or k.endswith("_id")}
    arch = f["general.architecture"]
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})")
    heads = int(f[f"{arch}.attention.head_count"])
    hidden = int(f[f"{arch}.embedding_length"])
    names = {t.name for t in reader.tensors}
    scaling = None
    if f.get(f"{arch}.rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": float(f[f"{arch}.rope.scaling.factor"])}
    eos = [int(f[k]) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in f]
    return ModelConfig(
        vocab_size=int(f.get(f"{arch}.vocab_size", 0)) or len(reader.fields["tokenizer.ggml.tokens"].data),
        hidden_size=hidden,
        intermediate_size=int(f[f"{arch}.feed_forward_length"]),
        num_layers=int(f[f"{arch}.block_count"]),
        num_heads=heads,
        num_kv_heads=int(f.get(f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(f.get(f"{arch}.attention.key_length", hidden // heads)),
        max_position_embeddings=int(f.get(f"{arch}.context_length", 2048)),
        rms_norm_eps=float(f[f"{arch}.attention.layer_norm_rms_epsilon"]),
        rope_theta=float(f.get(f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        attention_bias="blk.0.attn_q.bias" in names,
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=f.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(eos)),
        name=name,
    )


def gguf_weights(reader, cfg: ModelConfig, raw: bool = False) -> Iterator[tuple[str, torch.Tensor, str]]:
    """(HF name, tensor, GGML type name) for every tensor: dequantized to fp32, or with `raw` the
    quantized ones as their uint8 blocks [rows, row_bytes] (float tensors are skipped then)."""
    import gguf

    permuted = reader.fields["general.architecture"].contents() in ("llama", "mistral")
    float_types = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16)
    for t in reader.tensors:
        if raw and t.tensor_type in float_types:
            continue
        w = t.data if raw else gguf.quants.dequantize(t.data, t.tensor_type)  # [out, in] either way
        if permuted and t.name.endswith(("attn_q.weight", "attn_k.weight")):
            w = unpermute_qk(w, cfg.num_heads if "attn_q" in t.name else cfg.num_kv_heads)
        yield _gguf_hf_name(t.name), torch.from_numpy(np.array(w, copy=True)), t.tensor_type.name


def export_gguf(path: Path) -> Path:
    """The GGUF as a cached HF-format directory (fp32 weights, config.json, tokenizer files), plus its
    quantized blocks as they are in the file (`GGUF_BLOCKS_FILE`) for `--quantization gguf`."""
    import gguf
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    stat = path.stat()
    out = cache_dir() / "models" / f"{path.stem}-{stat.st_size}-{stat.st_mtime_ns}-v3"
    if (out / "model.safetensors").is_file():
        return out
    log.warning("exporting %s to %s (once; later starts load the export)", path.name, out)
    reader = gguf.GGUFReader(str(path))
    cfg = gguf_config(reader, path.stem)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".export-"))
    try:
        (tmp / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2))
        save_file({n: w for n, w, _ in gguf_weights(reader, cfg)}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        blocks = {n: (w, qtype) for n, w, qtype in gguf_weights(reader, cfg, raw=True)}
        if blocks:  # tensor name -> GGML type in the metadata; safetensors keeps only the bytes
            (tmp / GGUF_BLOCKS_FILE).parent.mkdir()
            save_file({n: w for n, (w, _) in blocks.items()}, str(tmp / GGUF_BLOCKS_FILE),
                      metadata={n: qtype for n, (_, qtype) in blocks.items()})
        AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(str(tmp))
        tmp.rename(out)  # atomic: a concurrent first start never sees a half-written export
    except OSError:
        if not (out / "model.safetensors").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out



def gguf_block_weights(export: Path) -> Iterator[tuple[str, WeightSource]]:
    """An export's weights with every quantized tensor replaced by its raw GGUF blocks."""
    from safetensors import safe_open

    with safe_open(str(export / GGUF_BLOCKS_FILE), framework="pt") as blocks, \
            safe_open(str(export / "model.safetensors"), framework="pt") as dense:
        qtypes = blocks.metadata()
        for name in dense.keys():
            if name in qtypes:
                rows, cols = dense.get_slice(name).get_shape()
                yield name, GGUFTensor(qtypes[name], blocks.get_tensor(name), (rows, cols))
            else:
                yield name, dense.get_tensor(name)

