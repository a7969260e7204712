"""The disk tier of the prefix cache: round trips, sharing between instances, corruption, LRU, failures."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import pytest

from tinyserve.kv.disk_tier import DiskTier, namespace

NBYTES = 64
HEADER = 4 + 2 + 32 + 8 + 4  # magic, version, hash, length, crc32
FILE = HEADER + NBYTES
NS = namespace("test-model", "float32", "bf16-kv", 16)


def h(i: int) -> bytes:
    return hashlib.sha256(str(i).encode()).digest()


def payload(i: int) -> bytes:
    return hashlib.sha256(b"p" + str(i).encode()).digest() * (NBYTES // 32)


def path_of(root: Path, block: bytes, ns: str = NS) -> Path:
    return root / ns / block.hex()[:2] / f"{block.hex()}.kv"


def tier(root: Path, files: int = 100, ns: str = NS) -> DiskTier:
    return DiskTier(root, ns, capacity_bytes=files * FILE, block_nbytes=NBYTES)


def test_round_trip(tmp_path: Path) -> None:
    t = tier(tmp_path)
    t.save(h(1), payload(1))
    assert t.flush(timeout=5)
    assert path_of(tmp_path, h(1)).stat().st_size == FILE
    assert t.contains(h(1))
    assert t.load(h(1)) == payload(1)
    assert t.load(h(2)) is None
    s = t.stats
    assert (s.hits, s.misses, s.corrupt, s.blocks_written) == (1, 1, 0, 1)
    assert s.bytes_written == s.bytes_read == t.num_bytes == FILE
    t.close()
    t.close()  # idempotent


def test_shared_between_instances_not_namespaces(tmp_path: Path) -> None:
    live = tier(tmp_path)  # a replica already running: its index does not have the block
    writer = tier(tmp_path)
    writer.save(h(1), payload(1))
    writer.close()
    restarted = tier(tmp_path)  # finds it by its scan
    assert restarted.num_bytes == FILE
    assert restarted.load(h(1)) == payload(1)
    assert live.num_bytes == 0
    assert live.contains(h(1))  # found on disk, adopted
    assert live.num_bytes == FILE
    assert live.load(h(1)) == payload(1)

    other = tier(tmp_path, ns=namespace("test-model", "float16", "bf16-kv", 16))
    assert not other.contains(h(1))
    assert other.load(h(1)) is None
    assert other.stats.misses == 1


def _flip_payload_byte(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:-1])


def _wrong_hash(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[6:38] = h(999)
    p.write_bytes(bytes(data))


@pytest.mark.parametrize(("damage", "reason"), [(_flip_payload_byte, "checksum"), (_truncate, "payload bytes present"),
                                                (_wrong_hash, "another block")])
def test_corrupt_file_is_removed_and_tier_recovers(tmp_path: Path, damage, reason: str, caplog) -> None:
    t = tier(tmp_path)
    t.save(h(1), payload(1))
    t.flush()
    p = path_of(tmp_path, h(1))
    damage(p)
    with caplog.at_level(logging.WARNING, logger="tinyserve.kv.disk_tier"):
        assert t.load(h(1)) is None
    assert not p.exists()
    assert t.stats.corrupt == 1 and t.stats.hits == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and reason in warnings[0]
    assert not t.contains(h(1))
    t.save(h(1), payload(1))  # not deduped away: the bad file left the index
    t.flush()
    assert t.load(h(1)) == payload(1)
    t.close()


def test_lru_eviction(tmp_path: Path) -> None:
    t = tier(tmp_path, files=3)
    for i in range(1, 5):
        t.save(h(i), payload(i))
        t.flush()
    assert not path_of(tmp_path, h(1)).exists()
    assert all(path_of(tmp_path, h(i)).exists() for i in (2, 3, 4))
    assert t.stats.evictions == 1 and t.num_bytes == 3 * FILE

    assert t.load(h(2)) == payload(2)  # now most recent: 3 is the oldest
    t.save(h(5), payload(5))
    t.flush()
    assert not path_of(tmp_path, h(3)).exists()
    assert all(path_of(tmp_path, h(i)).exists() for i in (2, 4, 5))
    assert t.stats.evictions == 2 and t.num_bytes == 3 * FILE
    t.close()


def test_dedupe(tmp_path: Path) -> None:
    t = tier(tmp_path)
    t.save(h(1), payload(1))
    t.save(h(1), payload(1))  # still queued
    t.flush()
    t.save(h(1), payload(1))  # already indexed
    t.flush()
    assert t.stats.blocks_written == 1
    assert t.load(h(1)) == payload(1)
    t.close()


def test_construction_cleans_tmp_and_evicts_down(tmp_path: Path) -> None:
    t = tier(tmp_path)
    for i in range(1, 4):
        t.save(h(i), payload(i))
    t.close()
    for age, i in ((300, 1), (200, 2), (100, 3)):  # block 1 the oldest, whatever the clock's resolution
        os.utime(path_of(tmp_path, h(i)), (0, path_of(tmp_path, h(i)).stat().st_mtime - age))
    tmp = path_of(tmp_path, h(1)).with_name(f"{h(1).hex()}.kv.tmp.123.456")
    tmp.write_bytes(b"half a block")

    small = tier(tmp_path, files=2)
    assert not tmp.exists()
    assert not path_of(tmp_path, h(1)).exists()
    assert small.stats.evictions == 1 and small.num_bytes == 2 * FILE
    assert small.load(h(2)) == payload(2) and small.load(h(3)) == payload(3)


def test_bad_length_and_tiny_capacity(tmp_path: Path, caplog) -> None:
    t = tier(tmp_path)
    with pytest.raises(ValueError):
        t.save(h(1), b"x" * (NBYTES - 1))
    with caplog.at_level(logging.WARNING, logger="tinyserve.kv.disk_tier"):
        tiny = DiskTier(tmp_path, NS, capacity_bytes=FILE - 1, block_nbytes=NBYTES)
    assert any("below one block file" in r.getMessage() for r in caplog.records)
    tiny.save(h(1), payload(1))
    assert tiny.flush(timeout=5)
    assert not (tmp_path / NS).exists()
    assert tiny.load(h(1)) is None and not tiny.contains(h(1))
    tiny.close()


def test_writer_error_is_contained(tmp_path: Path, monkeypatch, caplog) -> None:
    def disk_full(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    t = tier(tmp_path)
    monkeypatch.setattr(os, "replace", disk_full)
    with caplog.at_level(logging.ERROR, logger="tinyserve.kv.disk_tier"):
        t.save(h(1), payload(1))
        assert t.flush(timeout=5)
    assert any("cannot write" in r.getMessage() for r in caplog.records)
    assert t.load(h(1)) is None
    assert list((tmp_path / NS).glob("*/*")) == []  # the temporary file is cleaned up too
    assert t.stats.blocks_written == 0

    monkeypatch.undo()
    t.save(h(1), payload(1))  # same writer thread, and the failed block is not deduped away
    t.save(h(2), payload(2))
    assert t.flush(timeout=5)
    assert t.load(h(1)) == payload(1) and t.load(h(2)) == payload(2)
    assert t.stats.blocks_written == 2
    t.close()


def test_caller_may_reuse_buffer(tmp_path: Path) -> None:
    t = tier(tmp_path)
    buf = bytearray(payload(1))
    t.save(h(1), buf)
    buf[:] = b"\0" * NBYTES
    view = memoryview(bytearray(payload(2)))
    t.save(h(2), view)
    view[:4] = b"junk"
    t.flush()
    assert t.load(h(1)) == payload(1)
    assert t.load(h(2)) == payload(2)
    t.close()
