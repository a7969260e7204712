"""Tensor-parallel ranks as processes: rank 0 is the engine's own process; ranks 1..N-1 are workers.

The scheduler, the sampler and everything else stay in rank 0. Each step, rank 0 packs the batch as
usual (worker/runner.py) and sends every worker the packed tensors and the step's layout over a pipe
(`StepBatch`: token ids, positions, KV slots and block tables: kilobytes); every rank then runs the
same forward over its slice of the model (parallel/tp.py), meeting the others in the collectives
(gloo on a CPU, NCCL on CUDA, via `torch.distributed`), and rank 0 alone receives the gathered logits.
CPU ranks on x86-64 Linux make the collectives that fit in shared memory instead (parallel/shm.py: a
decode-sized all-reduce 5-25x cheaper than gloo's loopback on a loaded 2-core machine, a TP=2 batch-1
decode step of SmolLM2-135M 2-2.5x faster, docs/results/tp); $TINYSERVE_TP_ALLREDUCE=gloo keeps them on gloo.

Workers are started with `torch.multiprocessing` (spawn) and join the process group through a file
store in a private directory, on the loopback. Failure is never a hang: a worker that fails to load
reports why and the engine does not start; a worker that dies is seen by a watcher thread (its process
sentinel) and by the next step, which raises `EngineFatalError` (the server's /health turns 503 and it
exits non-zero); a collective that loses its peer mid-step raises, and one that waits longer than
`COLLECTIVE_TIMEOUT` times out (the shared-memory ones check both while they spin). A worker whose
rank 0 vanishes sees its pipe close and exits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tinyserve.attention.base import BatchLayout
from tinyserve.config import EngineConfig, ModelConfig
from tinyserve.errors import EngineFatalError
from tinyserve.parallel import shm
from tinyserve.parallel.tp import Partition, TensorParallel
from tinyserve.worker.runner import PreparedBatch, SeqView

log = logging.getLogger(__name__)
COLLECTIVE_TIMEOUT = timedelta(seconds=60)  # a step's collectives are per layer: milliseconds apart
START_TIMEOUT = 600.0  # seconds for a worker to load its slice (a large model on a cold disk)


@dataclass
class StepBatch:
    """What a worker needs of a step: the packed tensors and the layout its back end builds metadata from."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    layout: BatchLayout
    sample_idx: torch.Tensor
    num_sampling: int  # sequences that sample (only whether there are any matters to a worker)
    prompt_idx: torch.Tensor | None

    @classmethod
    def of(cls, b: PreparedBatch) -> StepBatch:
        return cls(b.input_ids, b.positions, b.layout, b.sample_idx, len(b.sampling), b.prompt_idx)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to build its slice as rank 0 builds its own."""

    config: dict[str, Any]  # the EngineConfig, as a dict (it crosses a process boundary)
    world: int
    store: str  # the file store's path
    max_len: int
    num_blocks: int
    max_decode_rows: int
    shm: str | None  # the shared-memory file's path (None: gloo alone)
    shm_slot_bytes: int


def init_process_group(device: str, store: str, rank: int, world: int) -> None:
    """Join the group: gloo on a CPU, NCCL on CUDA; the rendezvous is a file, the traffic the loopback."""
    if sys.platform == "linux" and Path("/sys/class/net/lo").exists():
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    backend = "gloo" if device == "cpu" else "nccl"
    dist.init_process_group(backend, store=dist.FileStore(store, world), rank=rank, world_size=world,
                            timeout=COLLECTIVE_TIMEOUT)


def join_shm(path: str | None, rank: int, world: int, slot_bytes: int,
             alive: Callable[[], bool]) -> shm.ShmComm | None:
    """Map the shared-memory file once every rank is in the group, then (a barrier: every rank has it
    mapped) rank 0 unlinks it: the mappings keep it, and nothing is left in /dev/shm whatever happens next."""
    if path is None:
        return None
    comm = shm.ShmComm(path, rank, world, slot_bytes, COLLECTIVE_TIMEOUT.total_seconds(), alive)
    dist.barrier()
    if rank == 0:
        os.unlink(path)
    return comm


def rank_device(device: str, rank: int) -> str:
    """One GPU per rank on CUDA (cuda:rank); every rank on the CPU shares it."""
    return device if device == "cpu" else f"cuda:{rank}"


class Ranks:
    """Rank 0's handle on the workers: starts them, sends each step, notices when one is gone."""

    def __init__(self, config: EngineConfig, mc: ModelConfig, max_len: int, num_blocks: int,
                 max_decode_rows: int) -> None:
        """Start ranks 1..N-1 loading their slices (in parallel with rank 0's own: the group is joined in
        `wait_ready`, once every rank has loaded, so no rank waits for another's imports)."""
        world = config.tensor_parallel_size
        if dist.is_initialized():
            raise ValueError("tensor_parallel_size > 1 starts its own process group; this process already "
                             "has one (torchrun?): run the engine in a process of its own")
        for rank in range(world):  # every rank's partition fails here, before a process starts
            Partition.of(mc, rank, world)
        self._dir = tempfile.mkdtemp(prefix="tinyserve-tp-")
        self._device = config.device
        # The largest all-reduce: a step's every token's hidden state, in the activations' dtype.
        slot = config.max_num_batched_tokens * mc.hidden_size * config.torch_dtype.itemsize
        shm_path = shm.create(world, slot, self._dir) if shm.supported(config.device) else None
        self._spec = spec = WorkerSpec(dataclasses.asdict(config), world, str(Path(self._dir) / "store"), max_len,
                                       num_blocks, max_decode_rows, shm_path, slot)
        ctx = mp.get_context("spawn")
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        self._closing = False
        self.lost: str | None = None  # why a worker is gone, once one is
        self.on_lost: Callable[[str], None] | None = None  # called on the watcher thread
        for rank in range(1, world):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(spec, rank, theirs), name=f"tinyserve-tp{rank}", daemon=True)
            proc.start()
            theirs.close()
            self._conns.append(ours)
            self._procs.append(proc)
            log.info("tensor-parallel rank %d: process %d", rank, proc.pid)
        self.tp = TensorParallel(Partition.of(mc, 0, world))  # its shared memory is joined in wait_ready

    def wait_ready(self) -> None:
        """Block until every worker has loaded its slice (a ValueError naming the first that failed), then
        join the process group and the shared memory with them."""
        for rank, (conn, proc) in enumerate(zip(self._conns, self._procs), start=1):
            if not conn.poll(START_TIMEOUT):
                self.close()
                raise ValueError(f"tensor-parallel rank {rank} did not load its slice within {START_TIMEOUT:.0f}s")
            try:
                status, detail = conn.recv()
            except EOFError:
                status, detail = "error", f"it exited with status {proc.exitcode}"
            if status != "loaded":
                self.close()
                raise ValueError(f"tensor-parallel rank {rank} could not start: {detail}")
        sentinels = [p.sentinel for p in self._procs]
        try:
            spec = self._spec
            init_process_group(self._device, spec.store, 0, spec.world)
            self.tp.shm = join_shm(spec.shm, 0, spec.world, spec.shm_slot_bytes, lambda: not wait(sentinels, 0))
        except Exception:
            self.close()
            raise
        threading.Thread(target=self._watch, name="tinyserve-tp-watch", daemon=True).start()

    def step(self, batch: PreparedBatch) -> None:
        """Send every worker this step (they run its forward with rank 0)."""
        self.check()
        msg = StepBatch.of(batch)
        try:
            for conn in self._conns:
                conn.send(msg)
        except OSError as e:
            raise EngineFatalError(f"a tensor-parallel rank is gone: {e}") from e

    def check(self) -> None:
        """EngineFatalError if a worker is gone."""
        for rank, proc in enumerate(self._procs, start=1):
            if not proc.is_alive() and self.lost is None:
                self.lost = f"tensor-parallel rank {rank} exited with status {proc.exitcode}"
        if self.lost is not None:
            raise EngineFatalError(self.lost)

    def _watch(self) -> None:
        """Wait on the workers' sentinels; the first to end while the engine runs is reported."""
        ended = wait([p.sentinel for p in self._procs])
        if self._closing:
            return
        rank, proc = next((r, p) for r, p in enumerate(self._procs, start=1) if p.sentinel in ended)
        proc.join(5)  # reaped: its exit status is known
        self.lost = f"tensor-parallel rank {rank} exited with status {proc.exitcode}"
        log.critical("%s: the engine cannot go on", self.lost)
        if self.on_lost is not None:
            self.on_lost(self.lost)

    def close(self) -> None:
        """Stop the workers (a clean exit, then a kill after 10 s) and leave the group."""
        if self._closing:
            return
        self._closing = True
        for conn in self._conns:
            with contextlib.suppress(OSError):  # already gone
                conn.send(None)
        for proc in self._procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        if self.tp.shm is not None:
            self.tp.shm.close()
        if self._spec.shm is not None:  # unlinked at set-up unless it failed first
            Path(self._spec.shm).unlink(missing_ok=True)
        if dist.is_initialized():
            dist.destroy_process_group()
        shutil.rmtree(self._dir, ignore_errors=True)


def _worker_main(spec: WorkerSpec, rank: int, conn: Connection) -> None:
    """A worker rank: build the slice, say so, then run every step rank 0 sends until told to stop."""
    from tinyserve.models.loader import model_config, resolve_model
    from tinyserve.worker.served_model import serve_model

    parent = os.getppid()  # rank 0: once it is gone, this process has another parent
    try:
        config = EngineConfig(**spec.config)
        assert config.num_threads is not None
        torch.set_num_threads(config.num_threads)
        src = resolve_model(config.model)
        mc = model_config(src)
        tp = TensorParallel(Partition.of(mc, rank, spec.world))
        config = dataclasses.replace(config, device=rank_device(config.device, rank))
        served = serve_model(config, src, mc, config.quantization, spec.max_len, spec.num_blocks,
                             spec.max_decode_rows, compile="off", tp=tp)
    except BaseException as e:  # rank 0 raises it as the reason the engine did not start
        conn.send(("error", f"{type(e).__name__}: {e}"))
        sys.exit(1)
    conn.send(("loaded", None))
    # rank 0 joins once every rank has loaded
    init_process_group(config.device, spec.store, rank, spec.world)
    comm = tp.shm = join_shm(spec.shm, rank, spec.world, spec.shm_slot_bytes, lambda: os.getppid() == parent)
    runner = served.runner
    with torch.inference_mode():
        while True:
            try:
                msg = conn.recv()
            except EOFError:  # rank 0 is gone
                break
            if msg is None:
                break
            b: StepBatch = msg
            meta = runner.model.attention.build(b.layout)
            # Placeholders for the sampling sequences: a worker computes their logits' share, never samples.
            runner.forward(PreparedBatch(b.input_ids, b.positions, b.layout, meta, b.sample_idx,
                                         [SeqView([], [])] * b.num_sampling, b.prompt_idx, []))
    if comm is not None:
        comm.close()
    if dist.is_initialized():
        dist.destroy_process_group()
