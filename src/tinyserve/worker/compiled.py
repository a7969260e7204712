"""The compiled decode step: one torch.compile'd graph per batch-size regime for the steps where
every sequence decodes one token (the steady state of serving).

Why: a batch-1 step of a small model is ~60 small ops per layer, each paying dispatcher and Python
overhead that dwarfs its arithmetic on a CPU. Inductor fuses the elementwise work (RoPE, SwiGLU,
residuals, norms) into generated C++ loops; `cpp_wrapper` calls the kernels from C++ instead of
Python; `freezing` folds the weights in as constants. Matmuls, the quantized kernels and the
attention op stay the library kernels they are.

Shapes: one graph per batch-size regime covers every decode step: 1 row up to the quantized
linears' measured packed/dense crossover, and (where dense copies exist) every batch above it; the
branch between the two kernels is taken at trace time, decided by the regime's range. Within a
regime the batch is an unbacked size (`_mark_rows`): PyTorch would otherwise specialize batch 1 (a
graph of its own, whose fused loops round differently), so a sequence's logits would depend on
whether its step carried one row or several. Speculation's greedy identity rests on that not
happening: a plain step (1 row) and its verification (1 + k rows) compute each row alike. The
block-table width is dynamic too. All graphs are compiled at start-up (`warm_up`), so no request
waits for a compile and nothing compiles at run time. Inductor's on-disk caches
(/tmp/torchinductor_$USER unless TORCHINDUCTOR_CACHE_DIR says otherwise) make a restart on the
same machine cheaper than the first start. Prefill and mixed steps run eager: their shapes vary
too much to be worth graphs, and their matmuls are big enough that overhead is not their cost.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import threading
import time
from collections.abc import Callable

import torch

from tinyserve.attention.base import AttentionMetadata
from tinyserve.models.llama import LlamaForCausalLM

log = logging.getLogger(__name__)


@functools.cache
def _mark_unbacked() -> Callable[..., None] | None:
    """torch._dynamo's `mark_unbacked` where it takes a range; None on an older PyTorch, which gets the
    previous behaviour (backed dynamic sizes, batch 1 specialized). Imported here, not at the top:
    importing dynamo costs ~1 s that an eager engine never needs."""
    from torch._dynamo.decorators import mark_unbacked

    return mark_unbacked if {"min", "max", "shape_id"} <= set(inspect.signature(mark_unbacked).parameters) else None


def decode_forward(
    model: LlamaForCausalLM,
    input_ids: torch.Tensor,  # [B]
    positions: torch.Tensor,  # [B]
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    slot_mapping: torch.Tensor,  # [B]
    block_tables: torch.Tensor,  # [B, W]
    context_lens: torch.Tensor,  # [B]
    block_size: int,
) -> torch.Tensor:
    """fp32 logits [B, vocab] of a pure decode step (every row samples)."""
    decode = model.attention.decode_meta(block_tables, context_lens, block_size)
    meta = AttentionMetadata(slot_mapping, input_ids.shape[0], decode, [])
    return model.compute_logits(model(input_ids, positions, kv_caches, meta))


def dummy_decode_inputs(rows: int, device: torch.device, index_dtype: torch.dtype, block: int,
                        block_size: int) -> tuple[torch.Tensor, ...]:
    """A decode step of `rows` rows at position 0 that reads and writes only block `block` (the runner's
    scratch block, which no sequence ever holds, so this can run while others are served): for
    warming up and timing steps. Distinct tensors: graphs are guarded on which inputs alias each other."""
    ids, positions = (torch.zeros(rows, dtype=torch.long, device=device) for _ in range(2))
    slots = torch.full((rows,), block * block_size, dtype=torch.long, device=device)
    tables = torch.full((rows, CompiledDecode.MIN_TABLE_WIDTH), block, dtype=index_dtype, device=device)
    return ids, positions, slots, tables, torch.ones(rows, dtype=index_dtype, device=device)


class CompiledDecode:
    """`decode_forward` under torch.compile, warmed up for every batch-size regime at start-up.
    `packed_max_rows`: the crossover above which quantized linears run their dense copies (None:
    no dense copies, one regime). `two_row_minimum`: run a 1-row step as that row twice, for models
    whose 1-row step would run a dense 16-bit linear (below)."""

    MIN_TABLE_WIDTH = 2  # width 1 would be specialized (a graph of its own): pad tables to >= 2 blocks

    def __init__(self, model: LlamaForCausalLM, block_size: int, packed_max_rows: int | None = None,
                 two_row_minimum: bool = False) -> None:
        self.model = model
        self.block_size = block_size
        self.packed_max_rows = packed_max_rows
        self.two_row_minimum = two_row_minimum
        self.warm = False
        self.fn = torch.compile(decode_forward, fullgraph=True, dynamic=False,
                                options={"freezing": True, "cpp_wrapper": True})

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 kv_caches: list[tuple[torch.Tensor, torch.Tensor]], slot_mapping: torch.Tensor,
                 block_tables: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
        if block_tables.shape[1] < self.MIN_TABLE_WIDTH:  # padding blocks are never read (context_lens)
            block_tables = torch.nn.functional.pad(block_tables, (0, self.MIN_TABLE_WIDTH - block_tables.shape[1]))
        if self.two_row_minimum and input_ids.shape[0] == 1:
            # The compiled graph's dense 16-bit linear rounds a lone row differently from a row among
            # others (REPORT SD, "One row or many"). The same row twice writes the same K/V into
            # the same slot, and costs little where rows are memory-bound.
            ids, pos, slots, tables, lens = (torch.cat([t, t]) for t in (input_ids, positions, slot_mapping,
                                                                          block_tables, context_lens))
            return self(ids, pos, kv_caches, slots, tables, lens)[:1]
        self._mark_rows((input_ids, positions, slot_mapping, block_tables, context_lens))
        torch._dynamo.maybe_mark_dynamic(block_tables, 1)
        args = (self.model, input_ids, positions, kv_caches, slot_mapping, block_tables, context_lens, self.block_size)
        if not self.warm:
            return self.fn(*args)
        # Warmed up: every input that can vary is a dynamic size, so only the guards that tell the
        # graphs apart need evaluating (the full check, over hundreds of weight and KV tensors, is
        # 1.4 ms of a 9.7 ms batch-1 step; what skipping saves was within this VM's drift: REPORT
        # S2). A step that matches no graph runs eager, never a minutes-long compile mid-serving
        # (under skip_guard_eval_unsafe that case raises before running anything: caught below).
        try:
            with torch.compiler.set_stance("eager_on_recompile", skip_guard_eval_unsafe=True):
                return self.fn(*args)
        except RuntimeError as e:  # guards are checked before anything runs: nothing was written yet
            if "Recompilation" not in str(e):
                raise
            log.warning("a decode step of %d rows matches no compiled graph; running it eager", input_ids.shape[0])
            return decode_forward(*args)

    def _mark_rows(self, tensors: tuple[torch.Tensor, ...]) -> None:
        """Dim 0 of every input is the step's row count: one unbacked size, ranged to its regime
        (dynamo guards the range, so each regime gets its graph and batch 1 no graph of its own)."""
        lo, hi, cut = 1, None, self.packed_max_rows
        if cut is not None:
            lo, hi = (1, cut) if tensors[0].shape[0] <= cut else (cut + 1, None)
        mark = _mark_unbacked()
        for t in tensors:
            if mark is not None:
                mark(t, 0, shape_id="rows", min=lo, max=hi)
            else:
                torch._dynamo.maybe_mark_dynamic(t, 0)

    @torch.inference_mode()  # as the runner's steps are: graphs are guarded on it
    def warm_up(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], index_dtype: torch.dtype,
                batch_sizes: list[int], scratch_block: int) -> float:
        """Compile (or load from the caches) the graph of each batch size; returns seconds. The dummy
        steps touch only `scratch_block`, so this may run on a thread while the engine serves."""
        start = time.perf_counter()
        for b in batch_sizes:
            args = dummy_decode_inputs(b, kv_caches[0][0].device, index_dtype, scratch_block, self.block_size)
            ids, positions, slots, tables, lens = args
            self(ids, positions, kv_caches, slots, tables, lens)
        self.warm = True
        seconds = time.perf_counter() - start
        log.info("compiled decode step ready for batch sizes %s in %.1fs", batch_sizes, seconds)
        return seconds


class BackgroundCompile:
    """The compiled step built on a thread of its own while the engine serves eagerly; the runner
    adopts it between two steps (`ModelRunner.adopt_compiled`), so no step changes path midway.

    Safe to run beside serving: the warm-up's dummy steps touch only the scratch block; tracing
    reads the model and never writes it; dynamo's and inductor's modes are thread-local and the
    engine thread never enters a compiled function before adoption. The thread is niced, and so
    are the compiler processes it starts, so the eager steps keep the cores they need. A build
    that fails leaves the engine eager, with a warning: slower, never down."""

    def __init__(self, build: Callable[[], tuple[CompiledDecode, float]]) -> None:
        self.started = time.monotonic()
        self.result: CompiledDecode | None = None
        self.error: BaseException | None = None
        self.seconds = 0.0  # launch of the build to its end
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(build,), name="tinyserve-compile", daemon=True)
        self._thread.start()

    def _run(self, build: Callable[[], tuple[CompiledDecode, float]]) -> None:
        with contextlib.suppress(OSError, AttributeError):  # Linux: this thread only
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        try:
            result, _ = build()
            log.info("full speed: the compiled decode step is built, %.0fs after its build began in the "
                     "background; the next decode step runs it", time.monotonic() - self.started)
            self.result = result
        except Exception as e:  # the engine stays eager: slower, never down
            self.error = e
            log.warning("building the compiled decode step failed; serving stays eager (%s: %s)",
                        type(e).__name__, e)
        finally:
            self.seconds = time.monotonic() - self.started
            self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)
