"""GGUF files, served straight from the file: its tensors are memory-mapped and read as they are
stored (the quantized ones as raw blocks, which a quantization method packs or dequantizes), llama.cpp's
Q/K row permutation undone.

What is slow about a GGUF is its metadata: parsing it with the `gguf` package takes seconds of
Python, and converting its vocabulary to a fast tokenizer seconds more. Both are done once per file
into a small cached directory (`gguf_source`: config.json, the tokenizer files, and `GGUF_INDEX`, where
each tensor lies in the file), so a later start reads a few kilobytes of JSON and maps the file. No
weight is converted or copied to disk at start-up; the fp32 HF export that peers without a GGUF reader
(vLLM, transformers) load is `export_gguf`, run by the lab when a peer needs it.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
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

# In a GGUF's cached directory: the file it describes and where each of its tensors lies in it.
GGUF_INDEX = "gguf-index.json"
_FLOAT_TYPES = {"F32": np.float32, "F16": np.float16}  # BF16 has no numpy dtype: read as int16 bits


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


def _index(reader, cfg: ModelConfig, path: Path) -> dict:
    """Where each tensor lies in the file: HF name, GGML type, byte range, shape [rows, cols] (or [n])
    of the dequantized tensor, and the head count whose Q/K interleave to undo (0: none)."""
    permuted = reader.fields["general.architecture"].contents() in ("llama", "mistral")
    tensors = []
    for t in reader.tensors:
        heads = 0
        if permuted and t.name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = cfg.num_heads if "attn_q" in t.name else cfg.num_kv_heads
        tensors.append({"name": _gguf_hf_name(t.name), "type": t.tensor_type.name, "offset": int(t.data_offset),
                        "nbytes": int(t.n_bytes), "shape": [int(d) for d in reversed(t.shape)], "unpermute": heads})
    stat = path.stat()
    return {"file": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "tensors": tensors}


_CONVERT_TOKENIZER = """
import sys
from pathlib import Path
from transformers import AutoTokenizer
path = Path(sys.argv[1])
AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(sys.argv[2])
"""


def gguf_source(path: Path) -> Path:
    """The GGUF's cached directory (config.json, tokenizer files, `GGUF_INDEX`): made once per file
    (a few seconds of metadata parsing), atomically, so concurrent first starts never see half of it."""
    stat = path.stat()
    out = cache_dir() / "gguf" / f"{path.stem}-{stat.st_size}-{stat.st_mtime_ns}-v1"
    if (out / GGUF_INDEX).is_file():
        return out
    import gguf

    log.info("reading %s's metadata and vocabulary (once per file; later starts read %s)", path.name, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".index-"))
    # The vocabulary's conversion (transformers parses the file again) runs in a child process, beside
    # our own parse: on a 1.5B model's 151k-token vocabulary that is 9 s next to 6, instead of after them.
    tokenizer = subprocess.Popen([sys.executable, "-c", _CONVERT_TOKENIZER, str(path), str(tmp)],
                                 stdin=subprocess.DEVNULL)
    try:
        reader = gguf.GGUFReader(str(path))
        cfg = gguf_config(reader, path.stem)
        (tmp / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2))
        index = _index(reader, cfg, path)
        if tokenizer.wait() != 0:
            raise ValueError(f"could not convert {path.name}'s vocabulary to a tokenizer (see the error above)")
        (tmp / GGUF_INDEX).write_text(json.dumps(index))  # last: it marks the directory done
        if out.exists():  # damaged (no index): replaced
            log.warning("%s has no %s: made again", out, GGUF_INDEX)
            shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    except OSError:
        if not (out / GGUF_INDEX).is_file():
            raise
    finally:
        if tokenizer.poll() is None:
            tokenizer.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def gguf_weights(source: Path) -> Iterator[tuple[str, WeightSource]]:
    """Every tensor of the GGUF that `source` (a `gguf_source` directory) describes, by HF name: float
    ones as tensors, quantized ones as their raw blocks (`GGUFTensor`, rows in HF order), read from
    the memory-mapped file."""
    index = json.loads((source / GGUF_INDEX).read_text())
    path = Path(index["file"])
    stat = path.stat()
    if (stat.st_size, stat.st_mtime_ns) != (index["size"], index["mtime_ns"]):
        raise ValueError(f"{path} changed since {source} was made from it; delete that directory to re-read it")
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    for t in index["tensors"]:
        raw = mapped[t["offset"] : t["offset"] + t["nbytes"]]
        shape, qtype = t["shape"], t["type"]
        if qtype in _FLOAT_TYPES or qtype == "BF16":
            w = raw.view(_FLOAT_TYPES.get(qtype, np.int16)).reshape(shape)
        else:
            w = raw.reshape(shape[0], -1)  # [rows, row_bytes]
        if t["unpermute"]:
            w = unpermute_qk(w, t["unpermute"])
        tensor = torch.from_numpy(np.array(w))  # a copy: the map is read-only, and reading it here faults it in
        if qtype == "BF16":
            yield t["name"], tensor.view(torch.bfloat16).float()
        elif qtype in _FLOAT_TYPES:
            yield t["name"], tensor.float()
        else:
            yield t["name"], GGUFTensor(qtype, tensor, (shape[0], shape[1]))


def is_gguf_source(path: Path) -> bool:
    return (path / GGUF_INDEX).is_file()


def export_gguf(path: Path) -> Path:
    """The GGUF as an fp32 HF-format directory (config.json, model.safetensors, tokenizer files), cached:
    what peers that cannot read a GGUF (vLLM, transformers) load. Never a start-up cost of ours."""
    from safetensors.torch import save_file

    from tinyserve.layers.formats import as_dense

    source = gguf_source(path)
    out = source.with_name(source.name + "-hf")
    if (out / "model.safetensors").is_file():
        return out
    log.warning("exporting %s to %s for a peer that cannot read GGUF", path.name, out)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".export-"))
    try:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        (tmp / GGUF_INDEX).unlink()
        save_file({n: as_dense(w).contiguous() for n, w in gguf_weights(source)}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        tmp.rename(out)  # atomic
    except OSError:
        if not (out / "model.safetensors").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
