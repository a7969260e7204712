"""The KV memory hierarchy below the pool: a swap space for preempted sequences, and a disk tier for
the prefix cache.

The scheduler decides (engine/scheduler.py); this class moves the bytes, at the moment of the decision:
- **Swap.** A preempted sequence's blocks are copied out before they are freed, and copied into fresh
  blocks when it is admitted again, so it resumes with the very K/V it had (no recompute, no change of
  numerics). The copies run between steps, on the engine's thread, and touch only blocks that no other
  sequence holds at that moment: a victim's blocks are not handed out before the step that freed them
  runs its forward, and a resumed or loaded sequence's fresh blocks are its own. Swapped K/V lives in
  host memory (on a CPU that is the same RAM as the pool: the copy is cheaper than recomputing, by the
  ablation in docs/REPORT.md); `swap_space_gb` bounds it, and a sequence that does not fit is
  recomputed instead.
- **Disk.** Every block the prefix cache registers is also written, off the step loop, to files under
  `kv_offload_path` (kv/disk_tier.py), named by its chained content hash within a namespace of what
  else its bytes depend on (model, weights, dtype, KV format, block size). A prompt whose prefix is no
  longer in the pool (evicted, or the process restarted, or another replica computed it) loads those
  blocks instead of prefilling them. Written through as blocks fill rather than at eviction: the copy
  out is the same either way, and a crash loses only the writes in flight.
On a GPU the host side of both copies is the CPU's memory and the rest is unchanged.

A block's bytes are all of one block id's rows: every layer's K and V, `[L, 2, block_size, H, W]`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from tinyserve.kv.block_hash import BlockHash
from tinyserve.kv.disk_tier import DiskTier
from tinyserve.kv.quant import copy_rows


@dataclass
class Traffic:
    """Blocks moved one way between the pool and a tier, their bytes, and the time the copies took."""

    blocks: int = 0
    bytes: int = 0
    seconds: float = 0.0


TIER_DIRECTIONS = (("swap", "out"), ("swap", "in"), ("disk", "out"), ("disk", "in"))


@dataclass
class TierStats:
    traffic: dict[tuple[str, str], Traffic] = field(default_factory=lambda: {k: Traffic() for k in TIER_DIRECTIONS})
    swap_fallbacks: int = 0  # preemptions recomputed because the swap space was full
    swap_declined: int = 0  # preemptions recomputed because recomputing measured cheaper than the copies


class KVTiers:
    def __init__(self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], swap_space_bytes: int,
                 disk: DiskTier | None = None) -> None:
        self.kv_caches = kv_caches
        k0 = kv_caches[0][0]
        self.block_shape = (len(kv_caches), 2, *k0.shape[1:])
        self.dtype = k0.dtype
        self.block_nbytes = int(torch.Size(self.block_shape).numel()) * k0.element_size()
        self.swap_capacity = swap_space_bytes // self.block_nbytes  # in blocks
        self.swapped: dict[object, torch.Tensor] = {}  # a preempted sequence -> its blocks' bytes
        self.swap_used = 0
        self.disk = disk
        self.stats = TierStats()

    # -- the pool's bytes ------------------------------------------------------------------------
    def read(self, blocks: list[int]) -> torch.Tensor:
        """A host copy of `blocks`: [n, L, 2, block_size, H, W], each block contiguous."""
        idx = torch.tensor(blocks, device=self.kv_caches[0][0].device)
        out = torch.empty((len(blocks), *self.block_shape), dtype=self.dtype)
        for layer, (k, v) in enumerate(self.kv_caches):
            out[:, layer, 0] = k.index_select(0, idx).cpu()
            out[:, layer, 1] = v.index_select(0, idx).cpu()
        return out

    def write(self, blocks: list[int], data: torch.Tensor) -> None:
        """Put `data` (as `read` returns it) into `blocks`."""
        device = self.kv_caches[0][0].device
        idx = torch.tensor(blocks, device=device)
        data = data.to(device)
        for layer, (k, v) in enumerate(self.kv_caches):
            copy_rows(k, idx, data[:, layer, 0])
            copy_rows(v, idx, data[:, layer, 1])

    def _count(self, tier: str, direction: str, blocks: int, started: float) -> None:
        t = self.stats.traffic[tier, direction]
        t.blocks += blocks
        t.bytes += blocks * self.block_nbytes
        t.seconds += time.perf_counter() - started

    # -- swap ------------------------------------------------------------------------------------
    def swap_out(self, key: object, blocks: list[int]) -> bool:
        """Copy a preempted sequence's `blocks` out (before the caller frees them); False, copying
        nothing, when the swap space cannot hold them: the sequence is then recomputed."""
        assert key not in self.swapped, "a swapped sequence is waiting, not preempted again"
        if self.swap_used + len(blocks) > self.swap_capacity:
            self.stats.swap_fallbacks += 1
            return False
        started = time.perf_counter()
        self.swapped[key] = self.read(blocks)
        self.swap_used += len(blocks)
        self._count("swap", "out", len(blocks), started)
        return True

    def swap_seconds_per_block(self) -> float | None:
        """What a swapped block has cost, out and back in (measured means); None until both were seen."""
        out, back = self.stats.traffic["swap", "out"], self.stats.traffic["swap", "in"]
        if not (out.blocks and back.blocks):
            return None
        return out.seconds / out.blocks + back.seconds / back.blocks

    def is_swapped(self, key: object) -> bool:
        return key in self.swapped

    def swapped_blocks(self, key: object) -> int:
        return self.swapped[key].shape[0]

    def swap_in(self, key: object, blocks: list[int]) -> None:
        """Copy a resumed sequence's K/V into its fresh `blocks` (as many as it swapped out)."""
        started = time.perf_counter()
        data = self.swapped.pop(key)
        self.swap_used -= data.shape[0]
        self.write(blocks, data)
        self._count("swap", "in", len(blocks), started)

    def drop(self, key: object) -> None:
        """Forget a swapped sequence that will not resume (finished, aborted, failed)."""
        data = self.swapped.pop(key, None)
        if data is not None:
            self.swap_used -= data.shape[0]

    # -- disk ------------------------------------------------------------------------------------
    def on_disk(self, hashes: list[BlockHash]) -> int:
        """How many of `hashes`, from the first, the disk tier holds."""
        if self.disk is None:
            return 0
        n = 0
        while n < len(hashes) and self.disk.contains(hashes[n]):
            n += 1
        return n

    def load(self, hashes: list[BlockHash], blocks: list[int]) -> int:
        """Load the blocks of `hashes` into `blocks`, in order, up to the first that is missing or
        corrupt (another replica evicted it, a torn write); how many were loaded."""
        assert self.disk is not None
        started = time.perf_counter()
        parts = []
        for h in hashes:
            payload = self.disk.load(h)
            if payload is None:
                break
            parts.append(torch.frombuffer(bytearray(payload), dtype=self.dtype).view(self.block_shape))
        if parts:
            self.write(blocks[: len(parts)], torch.stack(parts))
            self._count("disk", "in", len(parts), started)
        return len(parts)

    def offload(self, hashes: list[BlockHash], blocks: list[int]) -> None:
        """Queue newly computed full blocks for the disk tier (`save` skips those it holds); the files are
        written on its own thread, so the step pays only for the copy out of the pool."""
        if self.disk is None or not blocks:
            return
        started = time.perf_counter()
        raw = self.read(blocks).view(len(blocks), -1).view(torch.uint8).numpy()
        for h, row in zip(hashes, raw):
            self.disk.save(h, memoryview(row))
        self._count("disk", "out", len(blocks), started)

    def close(self) -> None:
        """Finish the queued writes (a clean shutdown keeps every block computed so far)."""
        if self.disk is not None:
            self.disk.close()
