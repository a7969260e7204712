"""CUDA graphs for pure decode steps: captured per (rows, table width) bucket, replayed with static inputs.

Why: a decode step of a small model is a few hundred small kernels; on a GPU their launches, not their
arithmetic, set a batch-1 step's time. A captured graph launches them all at once. Where the AOTInductor
step (worker/compiled.py) serves, it is used instead; graphs serve the eager decode forward otherwise
(`--compile off`, a failed build, a build still running in the background).

How: a graph replays fixed addresses and shapes, so every step's inputs are copied into one set of static
buffers, sized for the largest bucket and shared by all graphs (each captures views of their leading
elements: a bucket's block table is the first rows x width of one flat buffer, contiguous as the paged
kernel and the gather want it), and a step is padded up to its bucket: extra rows decode token 0 at position 0 into the
scratch block, which no sequence holds, and extra table columns point there too (masked by the context
lengths). Rows are bucketed as vLLM does (1, 2, 4, then multiples of 8), table widths by powers of two,
so a step reads at most twice the blocks it needs. A bucket is captured when a step first needs it,
with that step's own inputs (the warm-up runs write the step's K/V, the same values the replay writes
again). A step larger than every bucket runs eager. Padding changes a GEMM's row count, so a row's
rounding may differ from the eager step's (reduced precision: as close as the kernels allow).

The bucket choice, padding and buffer reuse are plain tensor code, tested on a CPU with a fake capture
(`Capture`); `cuda_capture` is the real one.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)
DecodeStep = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Replay = Callable[[], torch.Tensor]
Capture = Callable[[Callable[[], torch.Tensor]], Replay]  # fn -> a replay recomputing fn's output in place
MIN_WIDTH = 2  # the compiled step's minimum table width too: both read the same tables


def row_buckets(max_rows: int) -> list[int]:
    """1, 2, 4, then multiples of 8, below `max_rows`; then `max_rows` itself."""
    return sorted({b for b in (1, 2, 4, *range(8, max_rows, 8)) if b < max_rows} | {max_rows})


def width_buckets(max_width: int) -> list[int]:
    """Powers of two from MIN_WIDTH, the last one capped at `max_width` (the longest table)."""
    out = [MIN_WIDTH]
    while out[-1] < max_width:
        out.append(min(out[-1] * 2, max_width))
    return out


def pick(buckets: list[int], n: int) -> int | None:
    """The smallest bucket holding `n`; None above the largest."""
    i = bisect.bisect_left(buckets, n)
    return buckets[i] if i < len(buckets) else None


def cuda_capture() -> Capture:
    """Captures on the current CUDA device, all into one memory pool (the graphs replay one at a time, and
    each output is copied out before the next replay), after warm-up runs on a side stream (lazy
    initializations and library workspaces must not be captured)."""
    pool = torch.cuda.graph_pool_handle()

    def capture(fn: Callable[[], torch.Tensor]) -> Replay:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = fn()

        def replay() -> torch.Tensor:
            graph.replay()
            return out

        return replay

    return capture


class GraphPool:
    """Decode steps of up to `max_rows` rows and `max_width` table blocks, replayed from graphs."""

    def __init__(self, step: DecodeStep, capture: Capture, max_rows: int, max_width: int, pad_block: int,
                 block_size: int, index_dtype: torch.dtype, device: torch.device) -> None:
        self.step, self.capture = step, capture
        self.rows, self.widths = row_buckets(max_rows), width_buckets(max(max_width, MIN_WIDTH))
        self.pad_block, self.pad_slot = pad_block, pad_block * block_size
        r, w = self.rows[-1], self.widths[-1]

        def zeros(*shape: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        # the static inputs: ids, positions, slots, block tables, context lengths
        self.ids, self.positions, self.slots = zeros(r), zeros(r), zeros(r)
        self.flat_tables, self.lens = zeros(r * w, dtype=index_dtype), zeros(r, dtype=index_dtype)
        self.graphs: dict[tuple[int, int], Replay] = {}

    def tables(self, b: int, w: int) -> torch.Tensor:
        """The [b, w] block tables of bucket (b, w): a contiguous view of the shared flat buffer."""
        return self.flat_tables[: b * w].view(b, w)

    def bucket(self, rows: int, width: int) -> tuple[int, int] | None:
        b, w = pick(self.rows, rows), pick(self.widths, width)
        return None if b is None or w is None else (b, w)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                 block_tables: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor | None:
        """The step's logits [rows, vocab] from its bucket's graph (captured now if new); None when no
        bucket holds it (the caller runs it eager)."""
        n, width = block_tables.shape
        key = self.bucket(n, width)
        if key is None:
            return None
        b, w = key
        self._fill(n, b, w, input_ids, positions, slot_mapping, block_tables, context_lens)
        replay = self.graphs.get(key)
        if replay is None:
            log.info("capturing the decode step for %d rows, %d blocks per table", b, w)
            views = (self.ids[:b], self.positions[:b], self.slots[:b], self.tables(b, w), self.lens[:b])
            replay = self.graphs[key] = self.capture(lambda: self.step(*views))
        return replay()[:n].clone()  # the graph's output is overwritten by its next replay

    def _fill(self, n: int, b: int, w: int, input_ids: torch.Tensor, positions: torch.Tensor,
              slot_mapping: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor) -> None:
        """The step into the static buffers' first n rows; rows n..b and columns past its width padded."""
        width, tables = block_tables.shape[1], self.tables(b, w)
        self.ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slots[:n].copy_(slot_mapping)
        tables[:n, :width].copy_(block_tables)
        tables[:n, width:].fill_(self.pad_block)
        self.lens[:n].copy_(context_lens)
        self.ids[n:b].zero_()
        self.positions[n:b].zero_()
        self.slots[n:b].fill_(self.pad_slot)
        tables[n:].fill_(self.pad_block)
        self.lens[n:b].fill_(1)
