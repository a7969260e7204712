"""The Llama-family decoder (Llama 2/3, SmolLM2, TinyLlama, Mistral-style; Qwen2 via `attention_bias`).

Readable in one sitting: embedding -> N x (RMSNorm, GQA attention over the paged KV cache, RMSNorm,
SwiGLU MLP) -> RMSNorm -> LM head. Q/K/V and gate/up are fused into one matmul each: at batch 1 on a
CPU every op costs microseconds of overhead, so fewer, larger GEMMs win. Weights are loaded by
Hugging Face names (`load_weights`), so any loader only has to produce HF-named tensors.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from tinyserve.attention.base import AttentionBackend, AttentionMetadata
from tinyserve.attention.sdpa import SdpaBackend
from tinyserve.config import ModelConfig
from tinyserve.kv.quant import k_smoothing
from tinyserve.layers import bf16_gemm, gguf_native
from tinyserve.layers.formats import GGUFTensor, WeightSource, as_dense
from tinyserve.layers.linear import Linear, QuantMethod, Unquantized
from tinyserve.models import eager_ops

if TYPE_CHECKING:  # the model only calls it; torch.distributed is imported where ranks are started
    from tinyserve.parallel.tp import TensorParallel

SUPPORTED_ARCHS = ("llama", "qwen2", "mistral")  # what this decoder reads: config model_type, GGUF architecture


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies, with the scaling variants found in real configs (linear, llama3)."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / float(scaling["factor"])
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: default, linear, llama3)")


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position, computed once; a step just indexes them."""

    cos: torch.Tensor  # buffers, declared for the type checker
    sin: torch.Tensor

    def __init__(self, cfg: ModelConfig, max_len: int) -> None:
        super().__init__()
        with torch.device("cpu"):  # real tables even under a meta-device build, which would import dynamo
            freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), rope_inv_freq(cfg))
        self.register_buffer("cos", freqs.cos(), persistent=False)  # [max_len, D/2]
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        cos = self.cos[positions].to(dtype).unsqueeze(1)  # [T, 1, D/2], broadcast over heads
        sin = self.sin[positions].to(dtype).unsqueeze(1)
        return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's rotate-half convention: pairs are (i, i + D/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return eager_ops.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    """Under tensor parallelism, this rank's heads: o_proj's partial sums are all-reduced."""

    def __init__(self, cfg: ModelConfig, method: QuantMethod, backend: AttentionBackend,
                 tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.backend = backend
        self.tp = tp
        self.h, self.h_kv, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        if tp is not None:
            self.h, self.h_kv = _width(tp.part.heads), _width(tp.part.kv_heads)
        qkv = [self.h * self.d, self.h_kv * self.d, self.h_kv * self.d]
        self.qkv_proj = Linear(cfg.hidden_size, qkv, bias=cfg.attention_bias, method=method)
        self.o_proj = Linear(self.h * self.d, [cfg.hidden_size], bias=False, method=method)  # no bias: summed per rank
        self.scale = self.d**-0.5
        self.qk_scale: torch.Tensor | None  # [H + H_kv, D]: an int8 KV pool's K smoothing (kv/quant.py)
        self.register_buffer("qk_scale", None)

    def smooth_k_channels(self, norm_weight: torch.Tensor, probes: int = 128) -> None:
        """Set `qk_scale` from this layer's weights: each K channel's RMS over `probes` rows of random
        normalized input (unit Gaussians times the norm's weight, as RMSNorm leaves them), bias included.
        Through the layer's own qkv_proj, so any weight format and a tensor-parallel rank's heads alike;
        a fixed seed makes it the same at every start (the compiled step and the disk tier rely on it)."""
        gen = torch.Generator().manual_seed(0)
        z = torch.randn(probes, norm_weight.shape[0], generator=gen)
        x = (z * norm_weight.detach().float().cpu()).to(device=norm_weight.device, dtype=norm_weight.dtype)
        with torch.no_grad():
            k = self.qkv_proj(x)[:, self.h * self.d : (self.h + self.h_kv) * self.d].float()
        rms = k.pow(2).mean(0).sqrt().view(self.h_kv, self.d)
        self.qk_scale = k_smoothing(rms, self.h // self.h_kv).to(norm_weight.dtype)

    def forward(self, x, cos, sin, kv: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        qk, v = self.qkv_proj(x).split([(self.h + self.h_kv) * self.d, self.h_kv * self.d], dim=-1)
        # q and k heads rotate together: one set of RoPE ops per layer instead of two (op overhead
        # is a first-order cost of a batch-1 step on a CPU).
        qk = apply_rope(qk.view(t, self.h + self.h_kv, self.d), cos, sin)
        if self.qk_scale is not None:
            qk = qk * self.qk_scale
        q, k = qk.split([self.h, self.h_kv], dim=1)
        o = self.backend.forward(q, k, v.view(t, self.h_kv, self.d), kv[0], kv[1], meta, self.scale)
        y = self.o_proj(o.view(t, self.h * self.d))
        return y if self.tp is None else self.tp.all_reduce(y)


class MLP(nn.Module):
    """Under tensor parallelism, this rank's intermediate columns: down_proj's partial sums are all-reduced."""

    def __init__(self, cfg: ModelConfig, method: QuantMethod, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.tp = tp
        inter = cfg.intermediate_size if tp is None else _width(tp.part.intermediate)
        self.gate_up_proj = Linear(cfg.hidden_size, [inter, inter], bias=False, method=method)
        self.down_proj = Linear(inter, [cfg.hidden_size], bias=False, method=method)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.down_proj(eager_ops.silu_mul(self.gate_up_proj(x)))
        return y if self.tp is None else self.tp.all_reduce(y)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, method: QuantMethod, backend: AttentionBackend,
                 tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, method, backend, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, method, tp)

    def forward(self, x, cos, sin, kv, meta) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    """Built on the meta device; `load_weights` then fills the embedding and norms and hands each
    `Linear` its shards, which it packs with the engine's quantization method. Every layer attends
    through the same `attention` back end, which also builds the step's metadata (`attention.build`).
    With `tp`, the model is one rank's slice (parallel/tp.py): its heads, MLP columns and vocabulary."""

    def __init__(self, cfg: ModelConfig, max_len: int, method: QuantMethod | None = None,
                 attention: AttentionBackend | None = None, tp: TensorParallel | None = None) -> None:
        super().__init__()
        method = method or Unquantized()
        self.attention = attention or SdpaBackend()
        self.cfg = cfg
        self.tp = tp
        self.method = method
        vocab = cfg.vocab_size if tp is None else _width(tp.part.vocab)
        # An explicit (uninitialized) weight: the default random init would, on the meta device, import
        # torch._dynamo (a second of every start) to initialize nothing; the loader fills it.
        self.embed_tokens = nn.Embedding(vocab, cfg.hidden_size, _weight=torch.empty(vocab, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg, method, self.attention, tp) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # Tied or not, the head is a Linear of its own, so it can be quantized like any projection; a
        # method may name another for it (`head_method`: fp8 keeps the head dense, layers/fp8.py).
        self.lm_head = Linear(cfg.hidden_size, [vocab], bias=False, method=getattr(method, "head_method", method))
        self.rotary = RotaryEmbedding(cfg, max_len)

    @property
    def num_kv_heads(self) -> int:
        """The KV heads this model (rank) holds: the width of its KV pool."""
        attn = self.layers[0].self_attn
        assert isinstance(attn, Attention)
        return attn.h_kv

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Hidden states of every token, [T, hidden]; the LM head runs only where we sample."""
        table = self.embed_tokens.weight  # the LM head's packed table where tied (layers/bf16_gemm.py)
        x = bf16_gemm.embedding(input_ids, table) if self.tp is None else self.tp.embed(input_ids, table)
        cos, sin = self.rotary(positions, x.dtype)
        for layer, kv in zip(self.layers, kv_caches):
            x = layer(x, cos, sin, kv, meta)
        return self.norm(x)

    def smooth_k_channels(self) -> None:
        """For an int8 KV pool: every layer stores K smoothed, its queries to match (kv/quant.py)."""
        for layer in self.layers:
            assert isinstance(layer, DecoderLayer)
            layer.self_attn.smooth_k_channels(layer.input_layernorm.weight)

    def set_attention(self, backend: AttentionBackend) -> None:
        """Swap the attention back end of every layer (ablations compare them on one loaded model)."""
        self.attention = backend
        for layer in self.layers:
            assert isinstance(layer, DecoderLayer)
            layer.self_attn.backend = backend

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits [rows, vocab]; under tensor parallelism on rank 0 only (the others get an empty
        tensor), every rank computing its vocabulary slice."""
        logits = self.lm_head(hidden).float()
        return logits if self.tp is None else self.tp.gather_vocab(logits)

    # -- loading ---------------------------------------------------------------------------------
    _FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
              "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, WeightSource]], dtype: torch.dtype,
                     device: torch.device | str) -> None:
        """Take HF-named weights (dense tensors or GGUF blocks): linears get their shards (q/k/v and
        gate/up fused), everything else is copied into its parameter."""
        device = torch.device(device)
        linears = {n: m for n, m in self.named_modules() if isinstance(m, Linear)}
        params = dict(self.named_parameters())  # before loading: embedding, norms, biases
        # Every (parameter, shard) that must be written; whatever is left at the end is missing.
        missing = {(n, i) for n, m in linears.items() for i in range(len(m.out_sizes))}
        missing |= {(n, i) for n in params for i in range(len(linears[n[:-5]].out_sizes) if n.endswith(".bias") else 1)}
        for name, w in weights:
            name = name.removeprefix("model.")
            if "rotary_emb" in name or (name == "lm_head.weight" and self.cfg.tie_word_embeddings):
                continue  # recomputed / tied to the embedding
            parts = name.split(".")
            if self.tp is not None:
                w = self._rank_slice(name, w)
            fused, shard = self._FUSED.get(parts[-2], (None, 0)) if len(parts) >= 2 else (None, 0)
            module = ".".join(parts[:-2] + [fused] if fused else parts[:-1])
            try:
                if parts[-1] == "weight" and module in linears:
                    linears[module].load_shard(shard, w, dtype, device)
                    missing.discard((module, shard))
                    continue
                target = f"{module}.{parts[-1]}"
                if target not in params:
                    raise ValueError(f"unexpected weight for {type(self).__name__}")
                if name == "embed_tokens.weight" and self.cfg.tie_word_embeddings:
                    self.lm_head.load_shard(0, w, dtype, device)
                    missing.discard(("lm_head", 0))
                    if self._share_tied_embedding():  # not dequantized a second time (1.1 s on a 1.5B)
                        missing.discard((target, shard))
                        continue
                dst = params[target].data
                if fused:
                    dst = dst.split(linears[module].out_sizes, dim=0)[shard]
                # a GGUF embedding on the kernel where it is loaded (2.4 -> 0.3 s for a 1.5B's)
                dense = gguf_native.dequantize_into([w], dst.dtype) if isinstance(w, GGUFTensor) else as_dense(w)
                if dst.shape != dense.shape:
                    raise ValueError(f"shape {tuple(dense.shape)}, expected {tuple(dst.shape)}")
                dst.copy_(dense)
                missing.discard((target, shard))
            except ValueError as e:
                raise ValueError(f"weight {name!r}: {e}") from None
        if missing:
            raise ValueError(f"checkpoint is missing weights: {sorted(n for n, _ in missing)[:5]} ...")

    def _rank_slice(self, name: str, w: WeightSource) -> WeightSource:
        """The part of weight `name` this rank holds (all of it for the replicated ones: norms)."""
        from tinyserve.parallel.tp import shard

        assert self.tp is not None
        parts = name.split(".")
        where = self.tp.part.weight_slice(parts[-2] if len(parts) >= 2 else "", self.cfg.head_dim)
        if where is None:
            return w
        dim, rng = where
        if parts[-1] != "weight" and dim != 0:  # a row-parallel bias would be added once per rank
            raise ValueError(f"weight {name!r}: tensor parallelism has no bias on o_proj/down_proj")
        return shard(w, dim, rng, self.method.keeps_stored, name)

    def _share_tied_embedding(self) -> bool:
        """Whether the tied head's weight module holds a dense table in the model dtype, which then
        serves the embedding lookups too: one table in memory, not two."""
        table = getattr(self.lm_head.impl, "dense_weight", None)
        if table is None or table.dtype != self.embed_tokens.weight.dtype or \
                bf16_gemm.shape(table) != self.embed_tokens.weight.shape:
            return False
        self.embed_tokens.weight = nn.Parameter(table, requires_grad=False)
        return True


def _width(r: tuple[int, int]) -> int:
    return r[1] - r[0]
