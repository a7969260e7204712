"""Collectives through shared memory for ranks on one host: what gloo costs, without the sockets.

At TP=2 a batch-1 decode step of SmolLM2-135M makes 62 all-reduces of ~2.7 KB; gloo over the loopback
takes ~840 µs each (~60% of the step), almost all of it system calls and wake-ups. Here every rank maps
one file and a collective is: copy the tensor into this rank's slot, raise this rank's arrival flag,
spin until every rank's flag is up, then read the slots.

Layout: one 64-byte line per rank holding its arrival flag (a line each: no false sharing between the
spinning ranks), then two banks of `world` slots of `slot_bytes` each. Collective n uses bank n % 2.

Invariants:
- Every rank makes the same collectives in the same order with the same shapes (the model's forward
  does), so the call counter, the bank and the shm-or-gloo choice agree on every rank without talking.
- Double buffering makes one wait per collective enough: a rank writes bank n % 2 again at call n + 2
  only after passing call n + 1's wait, i.e. after every rank arrived at n + 1 and so finished reading
  call n.
- The flag is one byte (a byte store is never torn): (n + 1) mod 256 once the rank has arrived at call
  n. While a rank waits at call n a peer can be at most one call ahead, so a peer has arrived iff its
  flag is target or target + 1 (mod 256).
- Results are bitwise identical on every rank: each sums the same slots in rank order with the same
  elementwise ops (in the tensor's dtype, as gloo adds: bf16 rounds after each add).

Memory ordering: x86-64 is TSO: stores become visible in program order, loads are not reordered with
older loads, and it is multi-copy atomic (so a copy finished by torch's worker threads, which join the
calling thread through a barrier, is visible before the flag the caller stores after it). The slot copy
(ordinary stores; glibc's non-temporal memcpy path ends with an sfence) therefore lands before the flag,
and a rank that sees every flag then reads complete slots; a rank's reads of call n land before its flag
for call n + 1. The compiler cannot move them either: each is a separate call from the interpreter into
torch or CPython. Weaker memory models (arm64, POWER) would need explicit fences that Python cannot
issue, so `supported()` is x86-64 Linux only and elsewhere the ranks keep gloo.

Never a hang: the spin loop yields the core after `SPINS` tries (two ranks may share one) and every
`CHECK_EVERY` tries checks a deadline (the collective timeout) and `alive()` (the peers are still
there), raising RuntimeError otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)
LINE = 64  # bytes: a cache line per arrival flag
# Tries before each further one yields the core. Few: with two ranks on two cores that a neighbour's
# process shares, one rank often waits for the other to get a core, and spinning only delays it. Measured
# (2 ranks, [1, 576] bf16, median µs per call): 64 tries ~75, 8 ~46, 0 ~35 while a neighbour held a core;
# ~5 for all three while both cores were free (a yield with nothing else to run returns at once).
SPINS = 8
CHECK_EVERY = 1024  # tries between deadline and liveness checks (~ms once yielding)
ENV = "TINYSERVE_TP_ALLREDUCE"  # "gloo" keeps every collective on gloo (the ablation); default "shm"


def supported(device: str) -> bool:
    """Whether the CPU ranks use shared memory: Linux on x86-64 (TSO, see above), not turned off by $ENV."""
    choice = os.environ.get(ENV, "shm")
    if choice not in ("shm", "gloo"):
        raise ValueError(f"${ENV} must be shm or gloo; got {choice!r}")
    return (choice == "shm" and device == "cpu" and sys.platform == "linux"
            and platform.machine() in ("x86_64", "AMD64"))


def _data_offset(world: int) -> int:
    return -(-world * LINE // 4096) * 4096  # the slots start on a page


def create(world: int, slot_bytes: int, fallback_dir: str) -> str | None:
    """Rank 0: a zeroed file for `world` ranks in /dev/shm (tmpfs: no write-back) or else `fallback_dir`;
    its path, or None (logged) where the space is not there. The pages are reserved now: a full tmpfs
    fails here instead of killing a rank with SIGBUS at its first write."""
    slot_bytes = -(-slot_bytes // LINE) * LINE
    size = _data_offset(world) + 2 * world * slot_bytes
    shm = Path("/dev/shm")
    fd, path = tempfile.mkstemp(prefix="tinyserve-tp-", suffix=".shm",
                                dir=shm if shm.is_dir() and os.access(shm, os.W_OK) else fallback_dir)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        os.unlink(path)
        log.warning("no room for %d MiB of shared memory (%s): tensor parallelism all-reduces over gloo",
                    size >> 20, e)
        return None
    finally:
        os.close(fd)
    return path


class ShmComm:
    """One rank's view of the shared file: all-reduce and gather for CPU tensors up to `slot_bytes`."""

    def __init__(self, path: str, rank: int, world: int, slot_bytes: int, timeout: float,
                 alive: Callable[[], bool]) -> None:
        """Map `path` (made by `create` with the same world and slot_bytes). `alive()`: whether the
        peers can still arrive (rank 0: its workers run; a worker: its parent, rank 0, does)."""
        if world < 2:
            raise ValueError(f"shared-memory collectives need two ranks or more; got {world}")
        self.rank, self.world, self.timeout, self.alive = rank, world, timeout, alive
        self.slot_bytes = -(-slot_bytes // LINE) * LINE
        with open(path, "r+b") as f:
            self._mm = mmap.mmap(f.fileno(), 0)
        self._flags = memoryview(self._mm)[: world * LINE]
        base = _data_offset(world)
        self._data = torch.frombuffer(self._mm, dtype=torch.uint8, offset=base,
                                      count=2 * world * self.slot_bytes).view(2, world, self.slot_bytes)
        # (dtype, elements) -> each bank's slots as 1-D views: a decode step's ~60 collectives share
        # one size, and building views costs microseconds a call (a prefill's sizes vary: bounded)
        self._views: dict[tuple[torch.dtype, int], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self._calls = 0

    def fits(self, x: torch.Tensor) -> bool:
        """Whether `x` goes through shared memory (a larger one goes through gloo: the same answer on every rank)."""
        return x.device.type == "cpu" and x.numel() * x.element_size() <= self.slot_bytes

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks in place: slot 0 + slot 1 + ... in rank order, the same bits on every rank."""
        flat = x.reshape(-1)  # a view of x where x is contiguous; else a copy, written back below
        slots = self._exchange(flat)
        torch.add(slots[0], slots[1], out=flat)  # a + b: the same bits as copying a and adding b
        for q in range(2, self.world):
            flat.add_(slots[q])
        if flat.data_ptr() != x.data_ptr():
            x.copy_(flat.view(x.shape))
        return x

    def gather(self, x: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's `x` (equal shapes), in rank order, on rank 0; None elsewhere. The tensors are
        views of the shared slots: valid until rank 0's next collective."""
        slots = self._exchange(x.reshape(-1))
        return [s.view(x.shape) for s in slots] if self.rank == 0 else None

    def _exchange(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Write `flat` into this rank's slot, arrive, wait for every rank: the bank's slots, in rank order."""
        n, self._calls = self._calls, self._calls + 1
        key = (flat.dtype, flat.numel())
        banks = self._views.get(key)
        if banks is None:
            if len(self._views) >= 64:
                self._views.clear()
            data = self._data.view(flat.dtype)[:, :, : flat.numel()]
            banks = self._views[key] = (list(data[0].unbind()), list(data[1].unbind()))
        slots = banks[n & 1]
        slots[self.rank].copy_(flat)
        self._arrive_and_wait((n + 1) & 0xFF)
        return slots

    def _arrive_and_wait(self, target: int) -> None:
        flags = self._flags
        flags[self.rank * LINE] = target  # after the slot's stores (TSO), so a peer that sees it reads them
        pending = [q * LINE for q in range(self.world) if q != self.rank]
        tries, deadline = 0, 0.0
        while True:
            pending = [i for i in pending if (flags[i] - target) & 0xFF > 1]  # 0 or 1: arrived (see above)
            if not pending:
                return
            tries += 1
            if tries > SPINS:
                os.sched_yield()
            if tries % CHECK_EVERY == 0:
                now = time.monotonic()
                deadline = deadline or now + self.timeout
                if now > deadline:
                    raise RuntimeError(f"shared-memory collective: rank {self.rank} waited {self.timeout:g}s "
                                       f"for ranks {[i // LINE for i in pending]}")
                if not self.alive():
                    raise RuntimeError(f"shared-memory collective: rank {self.rank}'s peers are gone")

    def close(self) -> None:
        """Unmap the file (the mapping outlives this where a gathered view is still held; it goes with it)."""
        self._views.clear()
        del self._data
        self._flags.release()
        with contextlib.suppress(BufferError):  # a gathered view still holds it
            self._mm.close()
