"""Every knob in one place: the model's shape (ModelConfig), the engine's settings (EngineConfig) and
speculative decoding's (SpeculativeConfig), each validated once, at construction.

Light on purpose (no torch at import): `tinyserve --help` and every command's flags are built from
these dataclasses. The knobs that name an implementation (attention_backend, quantization,
scheduling_policy) take their choices from the registries of the packages that implement them:
engine_args.py shows them as flags, and the engine looks them up before it loads anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from tinyserve.system import cpu_has_fast_bf16, physical_cores

if TYPE_CHECKING:
    import torch

DTYPES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}
QUANT_GROUP_SIZES = (32, 64, 128, 256)


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

    def kv_bytes_per_token(self, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> int:
        """K and V, every layer: the exact price of one token of context (`dtype`: the activations')."""
        from tinyserve.kv.quant import pool_dtype, row_width

        row = row_width(self.head_dim, kv_cache_dtype) * pool_dtype(kv_cache_dtype, dtype).itemsize
        return 2 * self.num_layers * self.num_kv_heads * row


def resolve_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    """`auto`: bf16 where the hardware computes it natively (CUDA, AVX512-BF16, AMX), fp32 elsewhere
    (emulated bf16 is slower than fp32). fp32 stays the exact reference path, selected explicitly."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device != "cpu" or cpu_has_fast_bf16() else torch.float32
    try:
        return getattr(torch, DTYPES[dtype])
    except KeyError:
        raise ValueError(f"dtype must be one of auto, {', '.join(sorted(DTYPES))}; got {dtype!r}") from None


def knob(default: Any, help: str, **argparse_kwargs: Any) -> Any:
    """A dataclass field that carries its own help (and any argparse extras, e.g. `choices`), so the
    command-line flags are generated from EngineConfig itself (see engine_args.py)."""
    return field(default=default, metadata={"help": help, **argparse_kwargs})


COMPILE_MODES = ("background", "blocking", "off")
KV_CACHE_DTYPES = ("auto", "int8", "fp8_e4m3")  # how the pool stores K/V: kv/quant.py
PREEMPTION_MODES = ("swap", "recompute")  # what a preempted sequence's K/V becomes: engine/scheduler.py


@dataclass
class EngineConfig:
    """Every engine knob; each one is also a `--kebab-case` flag of every engine-running command."""

    model: str | None = knob(None, "HF directory, .gguf file or hub id (default: the bundled SmolLM2-135M-Instruct)")
    dtype: str = knob(
        "auto", "weights and activations; auto = bfloat16 on CUDA and on CPUs with AVX512-BF16 or AMX, "
        "float32 elsewhere (emulated bf16 is slower than fp32)",
        choices=("auto", *DTYPES), metavar="{auto,float32,bfloat16,float16}",
    )
    device: str = knob("cpu", "cpu | cuda | cuda:N")
    block_size: int = knob(16, "tokens per KV-cache block")
    kv_cache_dtype: str = knob(  # vLLM's flag; the formats are in kv/quant.py
        "auto", "how the KV pool stores K and V: auto = the activations' dtype; int8 = int8 codes with a bf16 "
        "scale per token and head (1.94x the tokens in the same bytes at head_dim 64); fp8_e4m3 = float8 E4M3 with "
        "a unit per-tensor scale (2x the tokens; sdpa attention back end)", choices=KV_CACHE_DTYPES)
    kv_cache_memory_gb: float = knob(1.0, "KV pool budget, allocated once at start")
    num_kv_blocks: int | None = knob(None, "exact KV pool size in blocks (overrides the budget; tests use tiny pools)")
    max_num_seqs: int = knob(64, "sequences in one batch")
    max_num_batched_tokens: int = knob(1024, "token budget of one step (decodes + prefill chunks)")
    max_model_len: int | None = knob(None, "context length (default: the model's, capped by the KV pool)")
    max_waiting: int = knob(1024, "bounded waiting queue; beyond it new requests are refused")
    num_threads: int | None = knob(
        None, "torch threads per process (default: the physical cores, shared out among the tensor-parallel "
        "ranks; oversubscribed threads are slower)")
    tensor_parallel_size: int = knob(
        1, "split the model over this many processes (Megatron-style: heads, MLP columns and vocabulary; "
        "gloo on a CPU, NCCL on CUDA), rank 0 in this one; at most the model's KV heads. Steps run eagerly; "
        "no speculation, swap or disk tier (docs/REPORT.md)")
    seed: int = knob(0, "engine seed for sampling")
    tokenizer: str | None = knob(None, "tokenizer directory or hub id (default: the model's)")
    quantization: str = knob(  # vLLM's flag name; the modes are registered in layers/__init__.py
        "auto", "weight quantization; auto: a GGUF keeps its own quantized blocks when activations are 16-bit "
        "on a CPU, float32 dequantizes; a quantized directory keeps its weights as stored (checkpoint)")
    # 32 or 64 for the bundled model: 576-wide layers have no 128 groups
    quant_group_size: int = knob(32, "int4 group size (weights sharing one scale)", choices=QUANT_GROUP_SIZES)
    packed_max_rows: int | None = knob(
        None, "quantized linears run their packed kernel for steps of up to this many rows (tokens) and a "
        "dense copy above (0: always dense; >= max-num-batched-tokens: always packed, no dense copy kept). "
        "Default: measured at start-up on this machine",
    )
    int8_compute: bool = knob(
        False, "compiled decode steps above the packed crossover (batches) multiply int8 activations (quantized on "
        "the fly) by an int8 copy of each quantized weight (per output channel) instead of its 16-bit dense copy; "
        "on a CPU with VNNI and no AMX our kernel, for eager steps (prefills) too, on every kind of linear with "
        "activations in blocks of 64 columns; with AMX oneDNN's, per token, on o_proj and gate_up_proj; lossy "
        "(docs/REPORT.md I8, VR, B8)")
    attention_backend: str = knob(  # the back ends are registered in attention/__init__.py
        "auto", "how attention reads the paged KV pool; auto = paged on CPU (sdpa where its kernel cannot "
        "be built), triton on CUDA (sdpa where triton is not installed)")
    enable_prefix_caching: bool = knob(
        True, "reuse the KV blocks of prompt prefixes seen before (vLLM's automatic prefix caching; "
        "--no-enable-prefix-caching turns it off)")
    preemption_mode: str | None = knob(
        None, "a sequence preempted for lack of KV blocks: swap = its K/V is copied to host memory and back "
        "when it resumes (cheaper than recomputing it on a CPU: docs/REPORT.md); recompute = it is "
        "recomputed from its tokens (also what swap does when the swap space is full, or for a sequence whose "
        "recompute measures cheaper than its copies). Default: swap; "
        "recompute under tensor parallelism (each rank holds a slice of every block)", choices=PREEMPTION_MODES)
    swap_space_gb: float = knob(4.0, "host memory that swapped-out K/V may take (vLLM's --swap-space)")
    kv_offload_path: str | None = knob(
        None, "a directory for the prefix cache's disk tier: every cached block is also written there, and "
        "a prompt whose prefix is on disk (evicted from the pool, a restart, another replica sharing the "
        "directory) loads it instead of prefilling. Default: off")
    kv_offload_gb: float = knob(10.0, "size bound of the disk tier; the least recently used blocks go first")
    scheduling_policy: str = knob("fcfs", "who is served first")  # registered in engine/policy.py
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
    compile: str | None = knob(
        None, "when the compiled decode step is built: background = serve eagerly at once and switch to the "
        "compiled step between two steps once it is built; blocking = build it before serving; off = always "
        "eager. Default: background for `tinyserve serve`, blocking for LLM(...) and the lab's benchmarks "
        "(a measured run at full speed throughout)", choices=COMPILE_MODES)
    enforce_eager: bool = knob(
        False, "run every step eagerly: no compiled decode step, no CUDA graphs (vLLM's flag)")
    cuda_graphs: bool | None = knob(
        None, "on a GPU, decode steps the compiled step does not serve (--compile off, a failed or pending "
        "build) replay CUDA graphs captured per batch-size bucket (worker/cuda_graphs.py). Default: on with "
        "a CUDA device unless --enforce-eager; a CPU has none (asking for them there is an error)")
    batch_invariant: bool = knob(
        False, "a request's tokens do not depend on what else shares its steps (greedy answers are the "
        "same alone and under load): GGUF models only, every linear on our row-independent kernel at every "
        "batch size, prefills in chunks of a fixed size, no prefix cache, the compiled step built before "
        "serving. Slower for large batches (docs/REPORT.md)")

    def __post_init__(self) -> None:
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.device != "cpu":
            import torch

            if not torch.cuda.is_available():
                raise ValueError(f"device {self.device!r} requested but CUDA is not available")
        resolve_dtype(self.dtype, self.device)  # a bad dtype fails here
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_waiting"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("kv_cache_memory_gb", "num_kv_blocks", "kv_offload_gb"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("aging_tokens_per_s", "packed_max_rows"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}; got {self.kv_cache_dtype!r}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.tensor_parallel_size > 1:
            self._check_tensor_parallel()
        if self.preemption_mode is None:
            self.preemption_mode = "swap"
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode must be one of {', '.join(PREEMPTION_MODES)}; "
                             f"got {self.preemption_mode!r}")
        if self.swap_space_gb < 0:
            raise ValueError(f"swap_space_gb must be >= 0, got {self.swap_space_gb}")
        if self.quant_group_size not in QUANT_GROUP_SIZES:
            raise ValueError(f"quant_group_size must be one of {QUANT_GROUP_SIZES}; got {self.quant_group_size}")
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}; got {self.compile!r}")
        if self.cuda_graphs and (self.device == "cpu" or self.enforce_eager):
            raise ValueError("cuda_graphs needs a CUDA device and no enforce_eager")
        if self.cuda_graphs is None:
            self.cuda_graphs = self.device != "cpu" and not self.enforce_eager
        if self.enforce_eager:
            self.compile = "off"
        if self.batch_invariant:
            self._check_batch_invariant()
        if self.kv_offload_path and not self.enable_prefix_caching:
            raise ValueError("kv_offload_path is the prefix cache's disk tier: it needs enable_prefix_caching")
        if self.num_threads is None:
            self.num_threads = max(1, physical_cores() // self.tensor_parallel_size)
        if isinstance(self.speculative_config, dict):  # LLM(speculative_config={...}): kept as the flag's JSON
            self.speculative_config = json.dumps(self.speculative_config)
        SpeculativeConfig.parse(self.speculative_config)  # a bad config fails here, naming its field

    @property
    def torch_dtype(self) -> torch.dtype:
        return resolve_dtype(self.dtype, self.device)

    @property
    def prefill_chunk(self) -> int | None:
        """Batch-invariant mode: the fixed size prefills are cut into, whatever else is scheduled (the
        budget left after the most decodes a step can hold, so the first prefill in line always fits)."""
        return self.max_num_batched_tokens - self.max_num_seqs if self.batch_invariant else None

    def _check_tensor_parallel(self) -> None:
        """What tensor parallelism cannot combine with (yet), each named; what it implies, set."""
        refused = {"speculative_config": "speculative decoding", "batch_invariant": "batch_invariant",
                   "kv_offload_path": "the disk tier (kv_offload_path)", "int8_compute": "int8_compute"}
        for name, what in refused.items():
            if getattr(self, name):
                raise ValueError(f"tensor_parallel_size > 1 does not run {what} yet: each rank would need its share")
        if self.preemption_mode == "swap":
            raise ValueError("tensor_parallel_size > 1 preempts by recompute (each rank holds a slice of every "
                             "block): leave preemption_mode unset or set it to recompute")
        self.preemption_mode = "recompute"
        # The compiled decode step has no collectives in it: every rank runs its steps eagerly.
        self.compile = "off"
        if self.cuda_graphs:  # nor were collectives captured in graphs: rank 0 alone would replay them
            raise ValueError("tensor_parallel_size > 1 runs every step eagerly: leave cuda_graphs unset")
        self.cuda_graphs = False

    def _check_batch_invariant(self) -> None:
        """What the mode cannot combine with, each named; what it implies, set."""
        if self.speculative_config:
            raise ValueError("batch_invariant cannot speculate: verifying drafts computes a sequence's tokens "
                             "in other step shapes than decoding them one by one")
        if self.packed_max_rows is not None:
            raise ValueError("batch_invariant runs the packed kernel at every batch size; leave packed_max_rows unset")
        if self.int8_compute:
            raise ValueError("batch_invariant runs the packed kernel at every batch size: int8_compute has no "
                             "large steps to run")
        if self.max_num_batched_tokens <= self.max_num_seqs:
            raise ValueError("batch_invariant cuts prefills into chunks of max_num_batched_tokens - max_num_seqs "
                             f"tokens; raise max_num_batched_tokens above max_num_seqs ({self.max_num_seqs})")
        # A cached prefix changes how the rest of a prompt is computed (chunk attention over it).
        if self.kv_offload_path:
            raise ValueError("batch_invariant runs without the prefix cache, so without its disk tier: "
                             "leave kv_offload_path unset")
        self.enable_prefix_caching = False
        # Eager and compiled steps round differently: a switch mid-answer would change its tokens.
        if self.compile == "background":
            self.compile = "blocking"


SPECULATIVE_METHODS = ("ngram", "draft_model", "self")


@dataclass(frozen=True)
class SpeculativeConfig:
    """`speculative_config`: vLLM's names, every error naming its field."""

    method: str
    num_speculative_tokens: int
    prompt_lookup_max: int = 4  # ngram: longest suffix of the sequence searched for earlier in it
    prompt_lookup_min: int = 1  # ngram: shortest suffix that counts as a match
    model: str | None = None  # draft_model: HF directory, .gguf file or hub id (same vocabulary)
    quantization: str | None = None  # draft_model / self: the draft's weight mode (self: default int4, gguf for a GGUF)
    disable_by_batch_size: int | None = None  # vLLM's: no speculation while more sequences than this decode
    adaptive: bool = True  # per-sequence k from its measured acceptance; off when drafting cannot pay

    def __post_init__(self) -> None:
        def bad(name: str, msg: str) -> ValueError:
            return ValueError(f"speculative_config.{name} {msg}")

        if self.method not in SPECULATIVE_METHODS:
            raise bad("method", f"must be one of {', '.join(SPECULATIVE_METHODS)}; got {self.method!r}")
        k = self.num_speculative_tokens
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 16:
            raise bad("num_speculative_tokens", f"must be an integer in [1, 16], got {k!r}")
        for name in ("prompt_lookup_max", "prompt_lookup_min"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad(name, f"must be an integer >= 1, got {v!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise bad("prompt_lookup_min", f"({self.prompt_lookup_min}) must be <= prompt_lookup_max "
                                           f"({self.prompt_lookup_max})")
        if self.method == "draft_model" and not self.model:
            raise bad("model", "is required with method 'draft_model' (the draft's path or id)")
        if self.method == "ngram" and (self.model or self.quantization):
            raise bad("method", "'ngram' takes no model or quantization")
        if self.method == "self" and self.model:
            raise bad("model", "must not be set with method 'self' (the draft is the target's own weights)")
        b = self.disable_by_batch_size
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
            raise bad("disable_by_batch_size", f"must be an integer >= 1, got {b!r}")
        if not isinstance(self.adaptive, bool):
            raise bad("adaptive", f"must be true or false, got {self.adaptive!r}")

    @classmethod
    def parse(cls, value: str | dict[str, Any] | SpeculativeConfig | None) -> SpeculativeConfig | None:
        """From the JSON of `--speculative-config`, a dict (`LLM(speculative_config=...)`), or None.
        As in vLLM, a `model` without a `method` means a draft model."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a JSON object, got {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative_config: unknown field(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known))}")
        value = dict(value)
        if "method" not in value:
            if not value.get("model"):
                raise ValueError("speculative_config.method is required (ngram, draft_model or self)")
            value["method"] = "draft_model"
        if "num_speculative_tokens" not in value:
            raise ValueError("speculative_config.num_speculative_tokens is required")
        return cls(**value)
