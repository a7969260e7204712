"""The shared-memory collectives (parallel/shm.py) between real processes.

2 and 3 spawned ranks make many all-reduces and gathers of fp32/bf16 tensors of varying sizes through
`TensorParallel` (so the shm-or-gloo choice is the engine's): the shared-memory ones equal the rank-order
sum bit for bit on every rank, the ones over the slot go through gloo and are still right. A peer that
dies mid-way, or never comes, makes the survivor raise in seconds instead of hanging.
"""

from __future__ import annotations

import os
import time
from multiprocessing.connection import wait
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tinyserve.parallel import shm
from tinyserve.parallel.tp import Partition, TensorParallel, split

pytestmark = pytest.mark.skipif(not shm.supported("cpu"), reason="shared-memory collectives: x86-64 Linux")
SLOT = 4096  # bytes: 1024 fp32 or 2048 bf16 elements fit
CALLS = 100
VOCAB = 301  # splits unevenly: the gather pads


def _case(i: int, rank: int) -> torch.Tensor:
    """Call i's input on `rank` (the same shape on every rank; every 7th a transposed, non-contiguous view)."""
    g = torch.Generator().manual_seed(i)
    dtype = (torch.float32, torch.bfloat16)[i % 2]
    rows = int(torch.randint(1, 5, (), generator=g))
    cols = int(torch.randint(1, 1000, (), generator=g))  # up to 4 x 999 x 4 bytes: some over the slot
    g.manual_seed(i * 1000 + rank)
    x = torch.randn(rows, cols, generator=g).to(dtype)
    return x.t().contiguous().t() if i % 7 == 0 else x


def _partition(rank: int, world: int) -> Partition:
    return Partition(rank, world, (0, 1), (0, 1), (0, 1), split(VOCAB, world)[rank], VOCAB)


def _rank_main(rank: int, world: int, tmp: str, path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(f"{tmp}/store", world), rank=rank, world_size=world)
    comm = shm.ShmComm(path, rank, world, SLOT, 20.0, lambda: True)
    dist.barrier()
    tp = TensorParallel(_partition(rank, world), shm=comm)
    sums, gathers = [], []
    for i in range(CALLS):
        sums.append(tp.all_reduce(_case(i, rank)).clone())
        if i % 10 == 0:  # logits: [rows, this rank's vocabulary], gathered on rank 0
            lo, hi = tp.part.vocab
            gathers.append(tp.gather_vocab(torch.arange(lo, hi, dtype=torch.float32).repeat(1 + i % 3, 1)))
    torch.save({"sums": sums, "gathers": gathers}, f"{tmp}/out{rank}.pt")
    comm.close()
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_sum_in_rank_order_bit_for_bit_and_fall_back_to_gloo_above_the_slot(tmp_path, world):
    path = shm.create(world, SLOT, str(tmp_path))
    assert path is not None
    try:
        mp.spawn(_rank_main, args=(world, str(tmp_path), path), nprocs=world, join=True)
    finally:
        os.unlink(path)
    outs = [torch.load(tmp_path / f"out{r}.pt") for r in range(world)]
    via_shm = 0
    for i in range(CALLS):
        inputs = [_case(i, r) for r in range(world)]
        want = inputs[0].clone()
        for x in inputs[1:]:
            want += x
        got = [o["sums"][i] for o in outs]
        if want.numel() * want.element_size() <= SLOT:
            via_shm += 1
            assert all(torch.equal(g, want) for g in got), i  # the rank-order sum, on every rank
        else:  # gloo: its own order of addition
            tol = 0 if world == 2 else 2e-2 if want.dtype == torch.bfloat16 else 1e-5
            assert all(torch.allclose(g, want, atol=tol, rtol=tol) for g in got), i
    assert 0.3 * CALLS < via_shm < CALLS  # both paths taken
    for i, g in enumerate(outs[0]["gathers"]):
        assert torch.equal(g, torch.arange(VOCAB, dtype=torch.float32).repeat(1 + 10 * i % 3, 1))
    assert all(g.numel() == 0 for o in outs[1:] for g in o["gathers"])


def _die_after(path: str, calls: int) -> None:
    comm = shm.ShmComm(path, 1, 2, SLOT, 20.0, lambda: True)
    for _ in range(calls):
        comm.all_reduce(torch.ones(8))
    os._exit(3)  # mid-run, as a crash: no clean-up


def test_a_dead_peer_makes_the_survivor_raise_not_hang(tmp_path):
    path = shm.create(2, SLOT, str(tmp_path))
    assert path is not None
    peer = mp.get_context("spawn").Process(target=_die_after, args=(path, 50), daemon=True)
    peer.start()
    # rank 0's liveness check, as worker/tp_ranks.py makes it: the peer's sentinel
    comm = shm.ShmComm(path, 0, 2, SLOT, 60.0, lambda: not wait([peer.sentinel], 0))
    for _ in range(50):
        assert torch.equal(comm.all_reduce(torch.ones(8)), torch.full((8,), 2.0))
    os.unlink(path)  # both have it mapped
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="peers are gone"):
        comm.all_reduce(torch.ones(8))
    assert time.monotonic() - start < 5
    peer.join(5)
    assert peer.exitcode == 3
    comm.close()


def test_the_environment_keeps_gloo_or_refuses_a_typo(monkeypatch):
    monkeypatch.setenv(shm.ENV, "gloo")
    assert not shm.supported("cpu")
    monkeypatch.setenv(shm.ENV, "shm")
    assert shm.supported("cpu") and not shm.supported("cuda")
    monkeypatch.setenv(shm.ENV, "nccl")
    with pytest.raises(ValueError, match="must be shm or gloo"):
        shm.supported("cpu")


def test_a_peer_that_never_comes_times_out(tmp_path):
    path = shm.create(2, SLOT, str(tmp_path))
    assert path is not None
    comm = shm.ShmComm(path, 0, 2, SLOT, 0.5, lambda: True)
    Path(path).unlink()
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"waited 0.5s for ranks \[1\]"):
        comm.all_reduce(torch.ones(8))
    assert time.monotonic() - start < 3
    comm.close()
