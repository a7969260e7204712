"""The compiled decode step: the steps where every sequence decodes one token (the steady state of
serving), run by AOTInductor-compiled shared objects, one per batch-size regime, cached on disk.

Why compiled: a batch-1 step of a small model is ~60 small ops per layer, each paying dispatcher and
Python overhead that dwarfs its arithmetic on a CPU. Inductor fuses the elementwise work (RoPE,
SwiGLU, residuals, norms) into generated C++ loops, and AOTInductor calls every kernel from C++: no
Python and no guards per step. Matmuls, the quantized kernels and the attention op stay the library
kernels they are (our native ones reached through their registered ops).

Why ahead of time: `torch.export` + `aoti_compile_and_package` make each graph a package on disk
(`artifact_dir`), keyed by everything that shapes it: the model's structure (config, weight names,
shapes, dtypes), the mode and its packed/dense crossover, the attention back end, the device and
CPU features, the torch version, and the source of the code that traces. A later start loads it in
milliseconds instead of re-tracing for a minute. The weights are graph *inputs*, not constants
folded in: a package is a few MB whatever the model's size, the model's own tensors are used (no
second copy in memory), and one package serves every checkpoint of the same shape.

Shapes: the row count is a dynamic dimension ranged to its regime: 1 row up to the quantized linears'
measured packed/dense crossover, and (where dense copies exist) every count above it, the branch
between the two kernels decided at trace time by the range. One graph per regime also means a row
computes alike in a step of one row and of many (no specialized batch-1 graph), which speculation's
greedy identity rests on. Block-table width and KV pool size are dynamic too. Prefill and mixed
steps run eager: their shapes vary too much to be worth graphs, and their matmuls are big enough that
overhead is not their cost.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import functools
import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from tinyserve.attention.base import AttentionMetadata
from tinyserve.layers.packed import int8_in_graph
from tinyserve.models.llama import LlamaForCausalLM
from tinyserve.system import cpu_flags, cpu_model

log = logging.getLogger(__name__)
M = TypeVar("M", bound=nn.Module)
ARTIFACT_VERSION = 1  # bump when the packages' layout or calling convention changes
# The code a graph is traced through: any change to these files makes a new key.
_TRACED = ("models", "layers", "attention", "kv/quant.py", "worker/compiled.py")


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


def regimes(packed_max_rows: int | None, top: int) -> list[tuple[int, int]]:
    """Row ranges (lo, hi), one graph each, that cover every decode step of 1..`top` rows: split at the
    packed/dense crossover where quantized linears keep dense copies (None: no split)."""
    if packed_max_rows is None or not 1 <= packed_max_rows < top:
        return [(1, top)]
    return [(1, packed_max_rows), (packed_max_rows + 1, top)]


def _weights(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The tensors the graph takes as inputs, in a fixed order: parameters, then buffers (tied ones once)."""
    return [*model.named_parameters(), *model.named_buffers()]


def _code_digest() -> str:
    root = Path(__file__).resolve().parents[1]  # src/tinyserve
    h = hashlib.sha256()
    for part in _TRACED:
        files = sorted((root / part).rglob("*")) if (root / part).is_dir() else [root / part]
        for f in files:
            if f.suffix in (".py", ".cpp", ".h") and f.is_file():
                h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def artifact_key(model: LlamaForCausalLM, kv: torch.Tensor, index_dtype: torch.dtype, block_size: int,
                 packed_max_rows: int | None) -> dict[str, Any]:
    """Everything that shapes the compiled graphs (the packages' cache key, kept beside them as key.json)."""
    device = kv.device
    return {
        "version": ARTIFACT_VERSION, "torch": torch.__version__, "device": str(device),
        "machine": (torch.cuda.get_device_name(device) if device.type == "cuda"
                    else f"{cpu_model()}|{' '.join(sorted(cpu_flags()))}"),
        "config": repr(model.cfg), "attention": model.attention.name, "block_size": block_size,
        "kv": [list(kv.shape[1:]), str(kv.dtype)], "index_dtype": str(index_dtype),
        "packed_max_rows": packed_max_rows,
        "weights": hashlib.sha256(repr([(n, tuple(t.shape), str(t.dtype)) for n, t in _weights(model)])
                                  .encode()).hexdigest(),
        "code": _code_digest(),
    }


class CompiledDecode:
    """`decode_forward` as one AOTInductor package per row regime (`regimes`), called with the model's
    own tensors. `two_row_minimum`: run a 1-row step as that row twice, for models whose 1-row step
    would run a dense 16-bit linear (below). A step no regime covers runs eager."""

    MIN_TABLE_WIDTH = 2  # tables are padded to >= 2 blocks: export treats a dimension of 1 as a constant

    def __init__(self, model: LlamaForCausalLM, block_size: int, packed_max_rows: int | None, top: int,
                 two_row_minimum: bool = False) -> None:
        self.model = model
        self.block_size = block_size
        self.packed_max_rows = packed_max_rows
        self.regimes = regimes(packed_max_rows, top)
        self.two_row_minimum = two_row_minimum
        self.weights = [t for _, t in _weights(model)]
        self.fns: list[Callable[[list[torch.Tensor]], list[torch.Tensor]]] = []

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 kv_caches: list[tuple[torch.Tensor, torch.Tensor]], slot_mapping: torch.Tensor,
                 block_tables: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
        if block_tables.shape[1] < self.MIN_TABLE_WIDTH:  # padding blocks are never read (context_lens)
            block_tables = torch.nn.functional.pad(block_tables, (0, self.MIN_TABLE_WIDTH - block_tables.shape[1]))
        rows = input_ids.shape[0]
        if self.two_row_minimum and rows == 1:
            # A dense 16-bit linear rounds a lone row differently from a row among others (oneDNN
            # picks another kernel: REPORT SD, "One row or many"). The same row twice writes the
            # same K/V into the same slot, and costs little where rows are memory-bound.
            ids, pos, slots, tables, lens = (torch.cat([t, t]) for t in (input_ids, positions, slot_mapping,
                                                                          block_tables, context_lens))
            return self(ids, pos, kv_caches, slots, tables, lens)[:1]
        for (lo, hi), fn in zip(self.regimes, self.fns):
            if lo <= rows <= hi:
                kv = [t for pair in kv_caches for t in pair]
                return fn([*self.weights, input_ids, positions, *kv, slot_mapping, block_tables, context_lens])[0]
        log.warning("a decode step of %d rows matches no compiled graph; running it eager", rows)
        return decode_forward(self.model, input_ids, positions, kv_caches, slot_mapping, block_tables, context_lens,
                              self.block_size)

    def load(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], index_dtype: torch.dtype,
             scratch_block: int, cache: Path) -> bool:
        """Load every regime's package from `cache` (milliseconds) and run each once; False, with nothing
        loaded, if any is missing or unreadable."""
        start = time.perf_counter()
        fns = [_load(cache / f"rows-{lo}-{hi}.pt2") for lo, hi in self.regimes]
        if any(fn is None for fn in fns):
            return False
        self.fns = [fn for fn in fns if fn is not None]
        self._run_each(kv_caches, index_dtype, scratch_block)
        log.info("compiled decode step for rows %s loaded from %s in %.2fs", self.regimes, cache,
                 time.perf_counter() - start)
        return True

    def prepare(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], index_dtype: torch.dtype,
                scratch_block: int, cache: Path) -> tuple[CompiledDecode, float]:
        """Load each regime's package from `cache`, building the ones missing (or unreadable) there; then
        run each once on `scratch_block`, which no sequence holds. Returns itself, ready, and the seconds
        it took."""
        start = time.perf_counter()
        built = []
        fns = []
        for lo, hi in self.regimes:
            path = cache / f"rows-{lo}-{hi}.pt2"
            fn = _load(path)
            if fn is None:
                self._build(kv_caches, index_dtype, scratch_block, lo, hi, path)
                built.append(f"{lo}-{hi}")
                fn = _load(path)
                if fn is None:
                    raise RuntimeError(f"the package just built at {path} does not load")
            fns.append(fn)
        self.fns = fns
        self._run_each(kv_caches, index_dtype, scratch_block)
        seconds = time.perf_counter() - start
        log.info("compiled decode step for rows %s ready in %.1fs (%s)", self.regimes, seconds,
                 f"compiled {', '.join(built)} into {cache}" if built else f"loaded from {cache}")
        return self, seconds

    @torch.inference_mode()
    def _run_each(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], index_dtype: torch.dtype,
                  scratch_block: int) -> None:
        """One step of each regime on the scratch block: a package that loads but cannot run fails here,
        before it serves anyone."""
        for lo, _ in self.regimes:
            rows = 2 if self.two_row_minimum and lo == 1 else lo
            args = dummy_decode_inputs(rows, kv_caches[0][0].device, index_dtype, scratch_block, self.block_size)
            self(args[0], args[1], kv_caches, *args[2:])

    def _build(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], index_dtype: torch.dtype,
               scratch_block: int, lo: int, hi: int, path: Path) -> None:
        """Export the step for `lo`..`hi` rows and compile it to `path` (atomically: a reader never sees
        half a package). Traced through a copy of the model whose own tensors are meta placeholders:
        export swaps a module's tensors while it traces, and the weights are the graph's inputs anyway."""
        from torch.export import Dim
        from torch.nn.utils.stateless import _reparametrize_module

        log.info("compiling the decode step for %d-%d rows (once: later starts load it)", lo, hi)
        shadow = _meta_copy(self.model)
        int8_in_graph(shadow)  # int8 compute (--int8-compute): the copies it made serve this graph's products
        names = [n for n, _ in _weights(self.model)]
        block_size = self.block_size

        class Step(nn.Module):
            def forward(self, weights, ids, positions, kv, slots, tables, lens):  # noqa: ANN001
                with _reparametrize_module(shadow, dict(zip(names, weights)), tie_weights=True):
                    return decode_forward(shadow, ids, positions, kv, slots, tables, lens, block_size)

        rows = Dim("rows", min=lo, max=hi) if hi > lo else None
        sample = min(max(lo, 2), hi)  # an example of 1 would be taken for a constant
        ids, positions, slots, tables, lens = dummy_decode_inputs(sample, kv_caches[0][0].device, index_dtype,
                                                                  scratch_block, block_size)
        by_rows = {0: rows} if rows is not None else None
        width = Dim("width", min=self.MIN_TABLE_WIDTH, max=max(self.MIN_TABLE_WIDTH + 1, 1 << 20))
        blocks = Dim("blocks", min=2, max=1 << 30)
        shapes = {"weights": [None] * len(names), "ids": by_rows, "positions": by_rows,
                  "kv": [({0: blocks}, {0: blocks}) for _ in kv_caches], "slots": by_rows,
                  "tables": {0: rows, 1: width} if rows is not None else {1: width}, "lens": by_rows}
        ep = torch.export.export(Step(), (self.weights, ids, positions, kv_caches, slots, tables, lens),
                                 dynamic_shapes=shapes, strict=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.{threading.get_ident()}.pt2")
        try:
            torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp))
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)


def _meta_copy(model: M) -> M:
    """The model's structure with every parameter and buffer a meta tensor: no memory, no sharing."""
    memo: dict[int, Any] = {}
    for t in (*model.parameters(), *model.buffers()):
        empty = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(empty, requires_grad=False) if isinstance(t, nn.Parameter) else empty
    return copy.deepcopy(model, memo)


def _load(path: Path) -> Callable[[list[torch.Tensor]], list[torch.Tensor]] | None:
    """The package's boxed runner (a list of flat inputs in, outputs out), or None when there is none;
    an unreadable one (a crash while it was written by a tool that does not rename, a disk error, a
    library that no longer loads it) is deleted with a warning, to be built again."""
    if not path.is_file():
        return None
    try:
        # The loader itself: torch._inductor's wrapper would first import all of inductor (a second).
        # Single-threaded: one caller at a time, the engine's thread.
        return torch._C._aoti.AOTIModelPackageLoader(str(path), "model", True, 1, -1).boxed_run
    except Exception as e:
        log.warning("ignoring the unreadable compiled package %s (%s: %s); building it again", path,
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        with contextlib.suppress(OSError):
            path.unlink()
        return None


def artifact_dir(root: Path, key: dict[str, Any]) -> Path:
    """Where the packages of `key` live: a directory named by its hash, with key.json saying what it is."""
    text = json.dumps(key, sort_keys=True)
    out = root / f"decode-{hashlib.sha256(text.encode()).hexdigest()[:20]}"
    if not (out / "key.json").is_file():
        with contextlib.suppress(OSError):
            out.mkdir(parents=True, exist_ok=True)
            tmp = out / f".key.{os.getpid()}.json"
            tmp.write_text(json.dumps(key, indent=1, sort_keys=True))
            tmp.replace(out / "key.json")
    return out


class BackgroundCompile:
    """The compiled step's packages built by a child process (`python -m tinyserve.worker.build_step`)
    while the engine serves eagerly; the runner loads them between two steps once it is done
    (`ModelRunner.adopt_compiled`), so no step changes path midway.

    A process, not a thread: tracing is tens of seconds of pure Python, and on a thread it held the
    GIL the engine's eager steps need between their ops (a first request's TTFT of 1.8 s, REPORT S3).
    The child is niced, so the engine keeps the cores it needs; it loads its own copy of the weights
    (memory for the duration of the build) and writes into the same cache, atomically. A build that
    fails leaves the engine eager, with a warning: slower, never down. A server that exits first stops
    the child."""

    def __init__(self, request: dict[str, Any]) -> None:
        self.started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "tinyserve.worker.build_step", json.dumps(request)],
                                     stdin=subprocess.DEVNULL, preexec_fn=functools.partial(os.nice, 10))
        atexit.register(self.cancel)

    def done(self) -> bool:
        return self.proc.poll() is not None

    @property
    def ok(self) -> bool:
        return self.proc.poll() == 0

    def cancel(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
