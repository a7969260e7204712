"""CUDA graphs for decode steps (worker/cuda_graphs.py), their logic on a CPU: buckets, padding, the
static buffers every graph shares, captures counted by a stand-in capture, and the engine's tokens
unchanged when its decode steps go through the pool. The real capture runs in scripts/gpu_check.sh."""

from __future__ import annotations

import pytest
import torch

from tinyserve import LLM, SamplingParams
from tinyserve.config import EngineConfig
from tinyserve.worker.cuda_graphs import GraphPool, cuda_capture, pick, row_buckets, width_buckets

from conftest import TINY

pytestmark = pytest.mark.usefixtures("restore_torch_threads")


class FakeCapture:
    """Records each capture; its 'replay' reruns the step, which reads the static buffers as a graph would."""

    def __init__(self) -> None:
        self.captures = 0

    def __call__(self, fn):
        self.captures += 1
        fn()
        return fn


def _step(ids, pos, slots, tables, lens):
    """A row-wise stand-in for the decode forward: each row's inputs side by side."""
    return torch.stack([ids, pos, slots, tables.sum(1), lens, torch.full_like(ids, tables.shape[1])], 1).float()


def _inputs(rows: int, width: int, base: int = 0):
    ids = torch.arange(rows) + 100 + base
    tables = torch.arange(rows * width).view(rows, width) + base
    return ids, ids + 1, ids * 4, tables, torch.full((rows,), 3 + base)


def test_buckets():
    assert row_buckets(32) == [1, 2, 4, 8, 16, 24, 32]
    assert row_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert row_buckets(1) == [1]
    assert width_buckets(2) == [2]
    assert width_buckets(10) == [2, 4, 8, 10]
    assert [pick([1, 2, 4, 8], n) for n in (1, 3, 8, 9)] == [1, 4, 8, None]


def test_a_step_is_padded_to_its_bucket_and_replayed_from_shared_static_buffers():
    capture = FakeCapture()
    pool = GraphPool(_step, capture, max_rows=16, max_width=16, pad_block=99, block_size=4,
                     index_dtype=torch.long, device=torch.device("cpu"))
    ids, pos, slots, tables, lens = _inputs(3, 3)
    out = pool(ids, pos, slots, tables, lens)
    assert capture.captures == 1 and list(pool.graphs) == [(4, 4)]
    assert out is not None and out.shape == (3, 6)
    padded_tables = torch.cat([tables, torch.full((3, 1), 99)], 1)  # columns past the width: the pad block
    torch.testing.assert_close(out, _step(ids, pos, slots, padded_tables, lens))
    # rows past the step decode token 0 at position 0 into the pad block, context 1
    assert pool.ids[3] == 0 and pool.positions[3] == 0 and pool.slots[3] == 99 * 4 and pool.lens[3] == 1
    assert bool((pool.tables(4, 4)[3] == 99).all())

    again = _inputs(4, 4, base=7)  # same bucket: replayed with the new inputs, not captured again
    torch.testing.assert_close(pool(*again), _step(*again))
    assert capture.captures == 1

    big = _inputs(9, 5)
    torch.testing.assert_close(pool(*big), _step(big[0], big[1], big[2], torch.cat(
        [big[3], torch.full((9, 3), 99)], 1), big[4]))
    assert capture.captures == 2 and (16, 8) in pool.graphs
    # one set of buffers, sized for the largest bucket, for every graph; each bucket's tables contiguous
    assert pool.flat_tables.shape == (16 * 16,)
    assert pool.tables(16, 8).is_contiguous() and pool.tables(16, 8).data_ptr() == pool.flat_tables.data_ptr()

    assert pool(*_inputs(17, 2)) is None  # more rows than any bucket: the caller runs it eager
    assert pool(*_inputs(2, 17)) is None  # a wider table than any bucket
    assert capture.captures == 2


def test_a_real_capture_replays_new_inputs(device):
    """On a GPU (--device cuda): torch.cuda.CUDAGraph captures, and replays read the static buffers."""
    if device == "cpu":
        pytest.skip("CUDA graphs need a GPU (scripts/gpu_check.sh runs this with --device cuda)")
    pool = GraphPool(_step, cuda_capture(), max_rows=8, max_width=8, pad_block=99, block_size=4,
                     index_dtype=torch.long, device=torch.device(device))
    for base in (0, 5):
        args = [t.to(device) for t in _inputs(3, 4, base)]
        torch.testing.assert_close(pool(*args), _step(*args))
    assert list(pool.graphs) == [(4, 4)]


def test_cuda_graphs_are_off_on_a_cpu_and_refused_there():
    assert EngineConfig().cuda_graphs is False
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        EngineConfig(cuda_graphs=True)


def test_the_engine_decodes_through_the_pool_with_the_same_tokens(tiny_llama_dir, caplog):
    """The runner's wiring: pure decode steps go through the pool (padded, on the scratch block), prefills
    do not, and the greedy tokens are the eager engine's."""
    from tinyserve.worker.served_model import graph_pool

    prompts = [[5, 77, 913, 4000, 21], [9, 10, 11], [2000, 3000, 4000, 12, 13, 14, 15]]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in LLM(str(tiny_llama_dir), **TINY).generate(prompts, params)]
    llm = LLM(str(tiny_llama_dir), **TINY, block_size=4)  # contexts of up to 19 tokens: tables 2 to 5 blocks
    e = llm.engine
    capture = FakeCapture()
    e.runner.graphs = graph_pool(e.runner, e.attention, max_rows=4, max_len=e.max_len, capture=capture)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert got == want
    assert not [r for r in caplog.records if r.levelname == "WARNING"]  # no step failed and was retried
    keys = list(e.runner.graphs.graphs)  # one capture per bucket: 3 rows padded to 4, widths 2, 4, 8
    assert keys == [(4, 2), (4, 4), (4, 8)] and capture.captures == 3, keys
