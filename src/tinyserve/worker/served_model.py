"""A model made ready to serve: loaded in its weight mode, its packed/dense crossover chosen, its KV
pool allocated, its decode step compiled. The engine's target is one; a speculative draft model
(speculative/draft.py) is another, built the same way with its own pool."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tinyserve.attention import select_backend
from tinyserve.attention.base import AttentionBackend
from tinyserve.config import EngineConfig, ModelConfig
from tinyserve.layers import batch_invariant_quantization, bf16_gemm, resolve_quantization
from tinyserve.layers.kernel_choice import configure_packed_kernels, packed_weights
from tinyserve.layers.linear import DenseWeight, Linear
from tinyserve.layers.packed import INT8_CHUNK_ROWS, INT8_COMPUTE_LINEARS, INT8_PER_TOKEN_LINEARS, PackedWeight
from tinyserve.models.llama import LlamaForCausalLM
from tinyserve.models.loader import ModelSource, load_model
from tinyserve.system import cache_dir, cpu_flags, cpu_model
from tinyserve.worker.compiled import BackgroundCompile, CompiledDecode, artifact_dir, artifact_key, decode_forward
from tinyserve.worker.cuda_graphs import Capture, GraphPool, cuda_capture
from tinyserve.worker.runner import ModelRunner

if TYPE_CHECKING:  # torch.distributed is imported only where ranks start (worker/tp_ranks.py)
    from tinyserve.parallel.tp import TensorParallel

log = logging.getLogger(__name__)


@dataclass
class ServedModel:
    model: LlamaForCausalLM
    runner: ModelRunner
    attention: AttentionBackend
    quantization: str  # the resolved weight mode
    packed_max_rows: int
    compile_seconds: float  # spent building the compiled step before serving (0 when built in the background)


def served_quantization(config: EngineConfig, quantization: str, stored: str | None) -> str:
    """The weight method `quantization` resolves to for a model stored as `stored` under `config`."""
    if config.batch_invariant:
        return batch_invariant_quantization(quantization, stored, config.device)
    return resolve_quantization(quantization, stored, config.torch_dtype, config.device)


def serve_model(config: EngineConfig, src: ModelSource, mc: ModelConfig, quantization: str, max_len: int,
                num_blocks: int, max_decode_rows: int, compile: str = "blocking",
                tp: TensorParallel | None = None) -> ServedModel:
    """Load `src` for serving under `config` (dtype, device, attention, packed kernels); `compile`: when
    its decode step is compiled (off | blocking | background: config.py); `max_decode_rows`: the most
    rows a pure decode step can have (the compiled regimes cover them); `tp`: the slice of one
    tensor-parallel rank (which runs eagerly: config.py)."""
    dtype, device = config.torch_dtype, config.device
    resolved = served_quantization(config, quantization, src.stored_form)
    attention = select_backend(config.attention_backend, device, config.kv_cache_dtype)
    model = load_model(src, mc, max_len, dtype, device, resolved, config.quant_group_size, attention, tp)
    if config.kv_cache_dtype == "int8":  # K stored smoothed (kv/quant.py): factors from the weights, 25-105 ms
        model.smooth_k_channels()
    # The packed/dense crossover depends on the machine, the model and the mode: measured once, cached.
    machine = f"{cpu_model()}|{config.device}|{config.num_threads} threads|torch {torch.__version__}"
    key = f"{src.path}|{resolved}|g{config.quant_group_size}|{dtype}|{machine}"
    if bf16_gemm.packed(model):  # the dense copies on our GEMM (layers/bf16_gemm.py): another crossover
        key += "|dense on bf16_gemm"
    if tp is not None:
        key += f"|tp rank {tp.rank} of {tp.part.world}"
    if config.int8_compute:
        # Every kind on our kernel where it runs; the per-token ones only where oneDNN's product does.
        weights = []
        for name, m in model.named_modules():
            kind = name.rsplit(".", 1)[-1]
            if isinstance(m, Linear) and isinstance(m.impl, PackedWeight) and kind in INT8_COMPUTE_LINEARS \
                    and m.impl.int8_copy(per_token=kind in INT8_PER_TOKEN_LINEARS):
                weights.append(m.impl)
        if not weights:
            raise ValueError(f"int8_compute runs the large steps of quantized weights; this model's weight mode "
                             f"({resolved}) has none: choose a quantized mode (gguf, int8, int4, checkpoint)")
        # Used by the compiled decode step (layers/packed.py); without AMX by eager steps (prefills) too, where
        # the int8 product, with its separate passes, still beats the bf16 GEMM (REPORT VR: 1.46-1.59x at
        # 128-512 rows on the 1.5B's shapes); with AMX the bf16 GEMM is as fast (REPORT I8).
        eager = torch.device(device).type == "cpu" and "amx_bf16" not in cpu_flags()
        for w in weights:
            w.int8_active = eager
            w.int8_chunk_rows = INT8_CHUNK_ROWS if eager else None
            if eager:  # every step above the crossover takes the int8 copy: the dense one is never read
                w.dense = None
        key += "|int8-compute" + ("|eager" if eager else "")
        if any(w.dense_cols is not None for w in weights):
            key += "|int8 blocked on int8_gemm"  # our VNNI kernel (layers/int8_gemm.py): another crossover
    # batch-invariant: the packed kernel at every batch size (no dense copy kept)
    rows = config.max_num_batched_tokens if config.batch_invariant else config.packed_max_rows
    packed_max_rows = configure_packed_kernels(model, rows, config.max_num_batched_tokens, dtype,
                                                cache=(cache_dir() / "kernel-choice.json", key))
    runner = ModelRunner(model, mc, num_blocks, config.block_size, dtype, device, config.kv_cache_dtype)
    runner.split_mixed_steps = config.batch_invariant
    if config.cuda_graphs:
        runner.graphs = graph_pool(runner, attention, max_decode_rows, max_len, cuda_capture())
    seconds = 0.0
    if compile != "off":
        step, cache = _compiled_step(model, runner, attention, packed_max_rows, max_decode_rows)
        start = time.perf_counter()
        if step.load(runner.kv_caches, attention.index_dtype, runner.scratch_block, cache):  # built before: ms
            runner.compiled, seconds = step, time.perf_counter() - start
        elif compile == "blocking":
            try:
                runner.compiled, seconds = step.prepare(runner.kv_caches, attention.index_dtype,
                                                        runner.scratch_block, cache)
            except Exception as e:  # no C++ compiler, an op export cannot trace: slower, never down
                runner.compile_failed = True
                log.warning("the compiled decode step could not be built; running eager (%s: %s)",
                            type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        else:  # a child process builds the packages; the runner loads them when it is done
            request = {"config": dataclasses.asdict(config), "max_len": max_len, "packed_max_rows": packed_max_rows,
                       "max_decode_rows": max_decode_rows}
            runner.building = BackgroundCompile(request)
            runner.pending = (step, cache)
    return ServedModel(model, runner, attention, resolved, packed_max_rows, seconds)


def graph_pool(runner: ModelRunner, attention: AttentionBackend, max_rows: int, max_len: int,
               capture: Capture) -> GraphPool:
    """Graphs of the eager decode forward for steps of up to `max_rows` rows over `max_len`-token contexts
    (worker/cuda_graphs.py); `capture`: cuda_capture(), or a test's stand-in."""
    model, kv, bs = runner.model, runner.kv_caches, runner.block_size

    def step(ids: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor, tables: torch.Tensor,
             lens: torch.Tensor) -> torch.Tensor:
        return decode_forward(model, ids, pos, kv, slots, tables, lens, bs)

    return GraphPool(step, capture, max_rows, -(-max_len // bs),
                     runner.scratch_block, bs, attention.index_dtype, runner.device)


def _compiled_step(model: LlamaForCausalLM, runner: ModelRunner, attention: AttentionBackend, packed_max_rows: int,
                   top: int) -> tuple[CompiledDecode, Path]:
    """The compiled decode step (not loaded yet) and the directory of its packages. Its regimes split at
    the quantized linears' packed/dense crossover where dense copies exist (worker/compiled.py)."""
    dense = any(w.has_copy for _, w in packed_weights(model))
    # A dense 16-bit linear in the compiled graph rounds one row differently from several (not one packed
    # for our GEMM, which computes each row alone); fp32's dense GEMM has no row count that agrees with
    # another, so it gains nothing from two rows.
    one_row_dense = runner.dtype != torch.float32 and any(
        isinstance(m, Linear) and isinstance(m.impl, DenseWeight) and m.impl.weight.dim() == 2
        for m in model.modules())
    step = CompiledDecode(model, runner.block_size, packed_max_rows if dense else None, top,
                          two_row_minimum=one_row_dense)
    key = artifact_key(model, runner.kv_caches[0][0], attention.index_dtype, runner.block_size, step.packed_max_rows)
    return step, artifact_dir(cache_dir() / "compiled", key)
