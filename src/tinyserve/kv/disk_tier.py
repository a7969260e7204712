"""The prefix cache's second tier: full KV blocks kept as files, found by their content hash.

The KV pool forgets a block as soon as its slot is handed out again, and everything when the process
ends. A block's bytes depend only on its identity (kv/block_hash.py) and on what `namespace` names
(model, dtype, KV format, block size), so they can be kept anywhere and reused by anyone who computes
the same identity: here, one file per block under `root/<namespace>/<2 hex>/<hash hex>.kv`. Files
outlive the process (a restart finds its prefixes again) and are shared by the replicas that share
the directory, with no coordination beyond what the filesystem gives:
- Atomic rename: a block is written to a temporary name in its final directory, then `os.replace`d
  onto its final name, so a reader sees either no file or a whole one, never a half-written one.
- Checksum: a header (magic, version, hash, length, crc32) is checked on every load, so a file torn
  by a crash, truncated, or corrupted on disk is detected, removed and reported as a miss; it never
  reaches the pool as KV.
- LRU: the tier keeps its files under `capacity_bytes` by removing the least recently used ones.
- Replicas: each replica's index is its own view of the directory (built by a scan at start-up).
  A block another replica wrote since is found by `contains` on an index miss (one `exists` call)
  and adopted. A replica may evict a file another is about to read: `load` then just misses.
  Eviction is per replica against its own view, so the directory as a whole may hold more than one
  replica's capacity when replicas write different blocks.

Writes are asynchronous (one writer thread) so the engine's step never waits on the disk; loads are
synchronous because the caller needs the bytes now. The module speaks bytes only (no torch): the
caller turns the pool's blocks into buffers and back.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import struct
import threading
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from tinyserve.kv.block_hash import BlockHash

logger = logging.getLogger(__name__)

_MAGIC = b"TSKV"
_VERSION = 1
# magic, format version, block hash, payload length, crc32 of the payload. Little-endian with no
# padding ("<"), so the file reads the same on any host that shares the directory.
_HEADER = struct.Struct("<4sH32sQI")
_SUFFIX = ".kv"
_TMP_MARK = ".tmp."  # `<hash hex>.kv.tmp.<pid>.<thread id>`: never matches the `*.kv` of a final file


@dataclass
class DiskTierStats:
    """What the tier did, for metrics. Byte counts are whole files (header + payload): the disk I/O done.
    The engine's thread updates the load-side fields and the writer thread the write-side ones, so no
    field has two writers."""

    hits: int = 0  # blocks loaded
    misses: int = 0  # lookups that found no file
    corrupt: int = 0  # files found torn or corrupt (and removed)
    evictions: int = 0  # files removed to stay under capacity
    bytes_read: int = 0
    bytes_written: int = 0
    read_seconds: float = 0.0
    write_seconds: float = 0.0  # spent by the writer thread
    blocks_written: int = 0


def namespace(*parts: object) -> str:
    """A short stable id of what a block's bytes depend on besides its tokens: model identity, dtype,
    KV format, block size... Blocks of two namespaces never alias. repr() never yields a raw NUL, so
    joining on one keeps ("a", "b") and ("a\\x00b",) apart."""
    return hashlib.sha256("\0".join(repr(p) for p in parts).encode()).hexdigest()[:16]


def _remove(path: Path) -> None:
    """Delete a file without failing the caller: a file already gone (another replica evicted it) is
    fine, and one that cannot be removed (permissions) is only worth a warning to a cache."""
    try:
        path.unlink(missing_ok=True)
    except OSError as e:
        logger.warning("disk KV tier: cannot remove %s: %s", path, e)


class DiskTier:
    def __init__(self, root: str | os.PathLike[str], namespace: str, capacity_bytes: int, block_nbytes: int) -> None:
        self.stats = DiskTierStats()
        self._dir = Path(root) / namespace
        self._capacity = capacity_bytes
        self._block_nbytes = block_nbytes
        self._file_nbytes = _HEADER.size + block_nbytes
        # hash -> file size, least recently used first. Guarded by `_lock` (the writer thread adds and
        # evicts while the engine's thread looks up); the lock is held for dict operations only.
        self._index: OrderedDict[BlockHash, int] = OrderedDict()
        self._num_bytes = 0  # sum of the index's sizes, kept with it under `_lock`
        self._pending: set[BlockHash] = set()  # queued or being written: a second save is a no-op
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[BlockHash, bytes] | None] = queue.Queue()
        self._writer: threading.Thread | None = None
        # A tier that cannot hold one file is inert. It does not even scan: evicting down to a capacity
        # below one file would delete every block the replicas sharing the directory wrote.
        self._disabled = capacity_bytes < self._file_nbytes
        if self._disabled:
            logger.warning("disk KV tier at %s: capacity %d B is below one block file (%d B); it keeps nothing",
                           self._dir, capacity_bytes, self._file_nbytes)
            return
        self._scan()

    def _path(self, h: BlockHash) -> Path:
        name = h.hex()
        return self._dir / name[:2] / (name + _SUFFIX)

    def _scan(self) -> None:
        """Rebuild the index from the directory, oldest file first, so a restart keeps the LRU order
        approximately (by mtime: loads are not recorded on disk)."""
        found: list[tuple[float, BlockHash, int]] = []
        for path in self._dir.glob("*/*"):
            try:
                if _TMP_MARK in path.name:
                    # A crashed writer's leftover. (A replica writing right now loses its temporary file
                    # too: its rename fails, is logged, and that block is simply not cached.)
                    _remove(path)
                elif path.name.endswith(_SUFFIX):
                    h = bytes.fromhex(path.name[:-len(_SUFFIX)])
                    if len(h) == 32:
                        st = path.stat()
                        found.append((st.st_mtime, h, st.st_size))
            except (OSError, ValueError):  # removed meanwhile, or a name that is not ours: not indexed
                continue
        found.sort(key=lambda f: f[0])
        with self._lock:
            for _, h, size in found:
                self._index[h] = size
                self._num_bytes += size
        self._evict_to_capacity()

    def _forget(self, h: BlockHash) -> None:
        with self._lock:
            size = self._index.pop(h, None)
            if size is not None:
                self._num_bytes -= size

    def _adopt(self, h: BlockHash, size: int) -> None:
        """Index a file (as most recently used) unless it is indexed already."""
        with self._lock:
            if h not in self._index:
                self._index[h] = size
                self._num_bytes += size

    def _evict_to_capacity(self) -> None:
        victims: list[BlockHash] = []
        with self._lock:
            while self._num_bytes > self._capacity and self._index:
                h, size = self._index.popitem(last=False)
                self._num_bytes -= size
                victims.append(h)
        for h in victims:  # file I/O outside the lock
            _remove(self._path(h))
        self.stats.evictions += len(victims)

    @property
    def num_bytes(self) -> int:
        """Bytes of the files in this tier's index (its view, not the directory's total)."""
        return self._num_bytes

    def contains(self, h: BlockHash) -> bool:
        """Whether a block can probably be loaded (a file may still vanish or prove corrupt before
        `load`). On an index miss the filesystem is asked: another replica may have written it."""
        if self._disabled:
            return False
        with self._lock:
            if h in self._index:
                return True
        try:
            size = os.stat(self._path(h)).st_size
        except OSError:  # missing, or the directory unusable now (removed, replaced by a file): a miss
            return False
        self._adopt(h, size)
        return True

    def load(self, h: BlockHash) -> bytes | None:
        """The block's payload, or None if there is no good file for it. Synchronous: the caller
        needs the bytes before it can use the prefix."""
        if self._disabled:
            self.stats.misses += 1
            return None
        path = self._path(h)
        start = time.perf_counter()
        try:
            with open(path, "rb") as f:
                # One byte more than a good file has, so that a longer file is caught without reading it all.
                data = f.read(self._file_nbytes + 1)
        except OSError as e:
            if not isinstance(e, FileNotFoundError):
                logger.warning("disk KV tier: cannot read %s: %s", path, e)
            self._forget(h)  # evicted by another replica, or unreadable: either way not ours to count
            self.stats.misses += 1
            return None
        problem = self._check(h, data)
        if problem is not None:
            # Removed at once, so each bad file is warned about once; a later save writes a good one.
            logger.warning("disk KV tier: removing %s: %s", path, problem)
            _remove(path)
            self._forget(h)
            self.stats.corrupt += 1
            return None
        with self._lock:
            if h in self._index:
                self._index.move_to_end(h)
            else:  # written by another replica and not seen by `contains` yet
                self._index[h] = len(data)
                self._num_bytes += len(data)
        self.stats.hits += 1
        self.stats.bytes_read += len(data)
        self.stats.read_seconds += time.perf_counter() - start
        return data[_HEADER.size:]

    def _check(self, h: BlockHash, data: bytes) -> str | None:
        """Why `data` is not a good file for block `h`, or None if it is."""
        if len(data) < _HEADER.size:
            return f"{len(data)} bytes, shorter than the header"
        magic, version, file_hash, length, crc = _HEADER.unpack_from(data)
        if magic != _MAGIC:
            return "bad magic"
        if version != _VERSION:
            return f"format version {version}, expected {_VERSION}"
        if file_hash != h:
            return "header names another block"
        if length != self._block_nbytes:
            return f"payload length {length}, expected {self._block_nbytes}"
        if len(data) - _HEADER.size != length:
            return f"{len(data) - _HEADER.size} payload bytes present, header says {length}"
        if zlib.crc32(memoryview(data)[_HEADER.size:]) != crc:
            return "checksum mismatch"
        return None

    def save(self, h: BlockHash, payload: bytes | memoryview) -> None:
        """Queue a block for writing and return at once: the engine's step must not wait on the disk.
        The payload is copied before returning, so the caller may reuse its buffer right away."""
        nbytes = memoryview(payload).nbytes
        if nbytes != self._block_nbytes:
            raise ValueError(f"payload of {nbytes} bytes, the tier stores blocks of {self._block_nbytes}")
        if self._disabled:
            return
        with self._lock:
            # Blocks are immutable content: one that is stored or on its way needs nothing more.
            if h in self._index or h in self._pending:
                return
            self._pending.add(h)
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_loop, name="disk-kv-writer", daemon=True)
                self._writer.start()
        data = payload if isinstance(payload, bytes) else memoryview(payload).tobytes()
        self._queue.put((h, data))

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:  # close()'s sentinel
                self._queue.task_done()
                return
            h, payload = item
            try:
                self._write(h, payload)
            except Exception:  # disk full, permissions...: the cache just lacks this block
                logger.exception("disk KV tier: cannot write block %s", h.hex())
            finally:
                with self._lock:
                    self._pending.discard(h)  # after `_write` indexed it: no gap where a save would re-queue
                self._queue.task_done()

    def _write(self, h: BlockHash, payload: bytes) -> None:
        start = time.perf_counter()
        final = self._path(h)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f"{final.name}{_TMP_MARK}{os.getpid()}.{threading.get_ident()}")
        header = _HEADER.pack(_MAGIC, _VERSION, h, len(payload), zlib.crc32(payload))
        try:
            with open(tmp, "wb") as f:
                f.write(header)
                f.write(payload)
            # No fsync: a file torn by a power loss fails its checksum and is dropped, which a cache can afford.
            os.replace(tmp, final)
        except BaseException:
            _remove(tmp)
            raise
        size = len(header) + len(payload)
        self._adopt(h, size)
        self._evict_to_capacity()  # the new file is the most recent, and one file fits: it stays
        self.stats.blocks_written += 1
        self.stats.bytes_written += size
        self.stats.write_seconds += time.perf_counter() - start

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for the queued writes (e.g. before a replica is expected to see them); True if drained."""
        deadline = None if timeout is None else time.monotonic() + timeout
        # Queue.join() without its unbounded wait: the queue's own condition, notified by task_done().
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                if deadline is None:
                    self._queue.all_tasks_done.wait()
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    self._queue.all_tasks_done.wait(remaining)
        return True

    def close(self) -> None:
        """Write what is queued and stop the writer thread. A later save starts a new one."""
        self.flush()
        with self._lock:
            writer, self._writer = self._writer, None
        if writer is not None:
            self._queue.put(None)
            writer.join()
