"""Every knob in one place: the model's shape (ModelConfig) and the engine's settings (EngineConfig)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}

QUANTIZATION_MODES = ("auto", "none", "int8", "int4", "gguf", "checkpoint")
QUANT_GROUP_SIZES = (32, 64, 128, 256)
SCHEDULING_POLICIES = ("fcfs", "priority", "shortest")  # engine/policy.py


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of a Llama-family decoder; Qwen2 is the same with q/k/v bias."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = "model"

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], name: str = "model") -> ModelConfig:
        """Read a transformers config.json (Llama, Qwen2, Mistral-style) into our fields."""
        arch = (cfg.get("architectures") or [""])[0]
        heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        rope_scaling = cfg.get("rope_scaling") or None
        rope_theta = cfg.get("rope_theta")
        if rope_theta is None:  # transformers >= 5 nests it in rope_parameters
            params = cfg.get("rope_parameters") or {}
            rope_theta = params.get("rope_theta", 10000.0)
            if params.get("rope_type", "default") != "default":
                rope_scaling = params
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            attention_bias=bool(cfg.get("attention_bias", False)) or "Qwen2" in arch,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            name=name,
        )

    def to_hf(self) -> dict[str, Any]:
        """A transformers config.json for these weights (Llama or Qwen2)."""
        arch = "Qwen2ForCausalLM" if self.attention_bias else "LlamaForCausalLM"
        cfg: dict[str, Any] = {
            "architectures": [arch],
            "model_type": "qwen2" if self.attention_bias else "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "float32",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
        }
        if not self.attention_bias:
            cfg["attention_bias"] = False
        return cfg

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """K and V, every layer: the exact price of one token of context."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize


def physical_cores() -> int:
    """Physical cores available to this process: torch threads beyond this oversubscribe and slow down."""
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
    except Exception:  # pragma: no cover - psutil is a dependency, but stay robust
        n = None
    avail = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(n or avail, avail))


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo); the platform's processor string elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def cpu_has_fast_bf16() -> bool:
    """bf16 matmuls run natively (AVX512-BF16 dot products or AMX tiles) rather than emulated."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def resolve_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        # bf16 where the hardware computes it natively; else fp32 (emulated bf16 is slower than fp32).
        # fp32 stays the exact reference path, selected explicitly.
        if device != "cpu":
            return torch.bfloat16
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype must be one of auto, {', '.join(sorted(_DTYPES))}; got {dtype!r}") from None


def knob(default: Any, help: str, **argparse_kwargs: Any) -> Any:
    """A dataclass field that carries its own help (and any argparse extras, e.g. `choices`), so the
    command-line flags are generated from EngineConfig itself (see engine_args.py)."""
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass
class EngineConfig:
    """Every engine knob; each one is also a `--kebab-case` flag of every engine-running command."""

    model: str | None = knob(None, "HF directory, .gguf file or hub id (default: the bundled SmolLM2-135M-Instruct)")
    dtype: str = knob(
        "auto", "weights and activations; auto = bfloat16 on CUDA and on CPUs with AVX512-BF16 or AMX, "
        "float32 elsewhere (emulated bf16 is slower than fp32)",
        choices=("auto", *_DTYPES), metavar="{auto,float32,bfloat16,float16}",
    )
    device: str = knob("cpu", "cpu | cuda | cuda:N")
    block_size: int = knob(16, "tokens per KV-cache block")
    kv_cache_memory_gb: float = knob(1.0, "KV pool budget, allocated once at start")
    num_kv_blocks: int | None = knob(None, "exact KV pool size in blocks (overrides the budget; tests use tiny pools)")
    max_num_seqs: int = knob(64, "sequences in one batch")
    max_num_batched_tokens: int = knob(1024, "token budget of one step (decodes + prefill chunks)")
    max_model_len: int | None = knob(None, "context length (default: the model's, capped by the KV pool)")
    max_waiting: int = knob(1024, "bounded waiting queue; beyond it new requests are refused")
    num_threads: int | None = knob(None, "torch threads (default: physical cores; oversubscribed threads are slower)")
    seed: int = knob(0, "engine seed for sampling")
    tokenizer: str | None = knob(None, "tokenizer directory or hub id (default: the model's)")
    quantization: str = knob(  # vLLM's flag name; see layers/quant.py
        "auto", "weight quantization; auto: a GGUF keeps its own quantized blocks "
        "when activations are 16-bit, float32 dequantizes; a `tinyserve quantize` directory keeps "
        "its weights as stored (checkpoint)",
        choices=QUANTIZATION_MODES,
    )
    # 32 or 64 for the bundled model: 576-wide layers have no 128 groups
    quant_group_size: int = knob(32, "int4 group size (weights sharing one scale)", choices=QUANT_GROUP_SIZES)
    packed_max_batch: int | None = knob(
        None, "quantized linears run their packed kernel for steps of up to this many tokens and a dense "
        "copy above (0: always dense; >= max-num-batched-tokens: always packed, no dense copy kept). "
        "Default: measured at start-up on this machine",
    )
    attention_backend: str = knob(
        "auto", "how attention reads the paged KV pool: sdpa (gathers each context, then SDPA; any device), "
        "paged (in place, native CPU kernel built on first use); auto = paged on CPU, sdpa elsewhere",
        choices=("auto", "sdpa", "paged"),
    )
    enable_prefix_caching: bool = knob(
        True, "reuse the KV blocks of prompt prefixes seen before (vLLM's automatic prefix caching; "
        "--no-enable-prefix-caching turns it off)")
    scheduling_policy: str = knob(
        "fcfs", "who is served first: fcfs (arrival), priority (each request's priority, lower first, "
        "then arrival), shortest (shortest remaining prompt first, with aging)",
        choices=SCHEDULING_POLICIES,
    )
    aging_tokens_per_s: float = knob(
        1000.0, "shortest policy: prompt tokens taken off a sequence's rank per second it has waited, "
        "so a prompt of L tokens overtakes any newcomer after L / this many seconds")
    speculative_config: str | None = knob(
        None, "speculative decoding, as JSON with vLLM's names: "
        '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4} (prompt lookup), '
        '{"model": PATH, "num_speculative_tokens": 4} (a draft model with the same vocabulary), '
        '{"method": "self", "num_speculative_tokens": 4} (the target\'s own weights at int4 as the draft); '
        "also quantization (the draft's weight mode), disable_by_batch_size, adaptive (default true). "
        "LLM(...) also takes a dict. Default: off")
    enforce_eager: bool = knob(
        False, "run every step eagerly: no compiled decode step (vLLM's flag; skips the start-up compile)")
    torch_dtype: torch.dtype = field(init=False, default=torch.float32)  # resolved from dtype and device

    def __post_init__(self) -> None:
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} requested but CUDA is not available")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        self.torch_dtype = resolve_dtype(self.dtype, self.device)
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_waiting"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.kv_cache_memory_gb <= 0:
            raise ValueError(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.quantization not in QUANTIZATION_MODES:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_MODES)}; got {self.quantization!r}")
        if self.quant_group_size not in QUANT_GROUP_SIZES:
            raise ValueError(f"quant_group_size must be one of {QUANT_GROUP_SIZES}; got {self.quant_group_size}")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy must be one of {', '.join(SCHEDULING_POLICIES)}; "
                             f"got {self.scheduling_policy!r}")
        if self.aging_tokens_per_s < 0:
            raise ValueError(f"aging_tokens_per_s must be >= 0, got {self.aging_tokens_per_s}")
        if self.packed_max_batch is not None and self.packed_max_batch < 0:
            raise ValueError(f"packed_max_batch must be >= 0, got {self.packed_max_batch}")
        if self.num_threads is None:
            self.num_threads = physical_cores()
        if isinstance(self.speculative_config, dict):  # LLM(speculative_config={...}): kept as the flag's JSON
            self.speculative_config = json.dumps(self.speculative_config)
        from tinyserve.spec.config import SpeculativeConfig  # spec/ imports the engine, which imports this

        SpeculativeConfig.parse(self.speculative_config)  # a bad config fails here, naming its field
