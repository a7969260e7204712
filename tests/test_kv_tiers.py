"""The KV tiers below the pool (kv/tiers.py) on a tiny random model in fp32 (exact): swap on preemption
against recompute and against an unpressured run, a full swap space, an abort while swapped; the disk
tier across engines sharing a directory (a restart), after eviction from the pool, with a corrupt file,
and in another namespace."""

from __future__ import annotations

import shutil

import pytest
import torch

from tinyserve import LLM, SamplingParams
from tinyserve.kv.block_hash import extend_block_hashes

from conftest import TINY

pytestmark = pytest.mark.usefixtures("restore_torch_threads")

GREEDY = dict(temperature=0, ignore_eos=True)
PROMPTS = ["The quick brown fox", "a b c d e", "Hello there, friend", "one two three four five six"]


def _fed(llm, monkeypatch) -> list[int]:
    """Tokens fed to the model by each step, recorded as the engine runs."""
    fed: list[int] = []
    real = llm.engine.runner.execute

    def execute(seqs, num_tokens):
        fed.append(sum(num_tokens))
        return real(seqs, num_tokens)

    monkeypatch.setattr(llm.engine.runner, "execute", execute)
    return fed


def _tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def _traffic(llm, tier: str, way: str) -> int:
    return llm.engine.tiers.stats.traffic[tier, way].blocks


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    roomy = LLM(str(tiny_llama_dir), **TINY, num_kv_blocks=128, block_size=4)
    return _tokens(roomy.generate(PROMPTS, SamplingParams(max_tokens=24, **GREEDY)))


def _pressured(tiny_llama_dir, prefill_seconds_per_token: float | None = None, **kw) -> LLM:
    """10 blocks of 4 = 40 tokens for four requests of ~30 tokens each: preemption is certain. The
    prefill's cost, which decides swap or recompute once a swap was measured, is pinned (None: never
    measured, so always swap) rather than left to this machine's timings."""
    llm = LLM(str(tiny_llama_dir), **TINY, num_kv_blocks=10, block_size=4, **kw)
    llm.engine._measure_prefill = lambda batch, seconds: None
    llm.engine.scheduler.prefill_seconds_per_token = prefill_seconds_per_token
    return llm


def test_swap_resumes_without_recompute_and_matches_an_unpressured_run(tiny_llama_dir, reference, monkeypatch):
    runs = {}
    for mode in ("swap", "recompute"):
        llm = _pressured(tiny_llama_dir, preemption_mode=mode)
        fed = _fed(llm, monkeypatch)
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=24, **GREEDY))
        assert _tokens(outs) == reference, mode
        runs[mode] = (llm, sum(fed))
        assert llm.engine.tiers.swap_used == 0 and not llm.engine.tiers.swapped
        assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks
    swap, recompute = runs["swap"][0], runs["recompute"][0]
    assert _traffic(swap, "swap", "out") > 0 and _traffic(swap, "swap", "out") == _traffic(swap, "swap", "in")
    assert _traffic(recompute, "swap", "out") == 0
    # Every token is fed exactly once when nothing is recomputed: prompts plus all but the last output.
    assert runs["swap"][1] == sum(len(swap.engine.encode_prompt(p)) + 23 for p in PROMPTS)
    assert runs["recompute"][1] > runs["swap"][1]


@pytest.mark.parametrize("prefill_cost", [0.0, 1.0])
def test_swap_or_recompute_by_measured_cost(tiny_llama_dir, reference, prefill_cost):
    """Recompute free (0 s a token): once a swap's copies were measured, later preemptions recompute
    (counted as declined); recompute dear (1 s a token): every preemption swaps. Same tokens either way."""
    llm = _pressured(tiny_llama_dir, prefill_seconds_per_token=prefill_cost, preemption_mode="swap")
    assert _tokens(llm.generate(PROMPTS, SamplingParams(max_tokens=24, **GREEDY))) == reference
    stats = llm.engine.tiers.stats
    assert _traffic(llm, "swap", "out") > 0  # the first is swapped: nothing was measured yet
    if prefill_cost:
        assert stats.swap_declined == 0
    else:
        assert stats.swap_declined > 0 and llm.engine.stats().kv_swap_declined == stats.swap_declined
    assert llm.engine.tiers.swap_used == 0 and llm.engine.blocks.num_free == llm.engine.blocks.num_blocks


def test_the_prefill_cost_is_measured_on_prefill_steps(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), **TINY, num_kv_blocks=64, block_size=4)
    assert llm.engine.scheduler.prefill_seconds_per_token is None
    llm.generate(["x " * 40], SamplingParams(max_tokens=2, **GREEDY))  # one 40-token prefill step
    assert 0 < llm.engine.scheduler.prefill_seconds_per_token < 1


def test_a_full_swap_space_falls_back_to_recompute(tiny_llama_dir, reference):
    llm = _pressured(tiny_llama_dir, preemption_mode="swap", swap_space_gb=1e-9)  # not one block
    assert _tokens(llm.generate(PROMPTS, SamplingParams(max_tokens=24, **GREEDY))) == reference
    assert llm.engine.tiers.stats.swap_fallbacks > 0 and _traffic(llm, "swap", "out") == 0


def test_aborting_a_swapped_out_request_frees_its_swap_space(tiny_llama_dir):
    llm = _pressured(tiny_llama_dir, preemption_mode="swap")
    e = llm.engine
    for i, p in enumerate(PROMPTS):
        e.add_request(str(i), p, SamplingParams(max_tokens=24, **GREEDY))
    for _ in range(200):
        e.step()
        swapped = [s for s in e.scheduler.waiting if e.tiers.is_swapped(s)]
        if swapped:
            break
    assert swapped, "the pool was meant to force a swap"
    e.abort_request(swapped[0].request_id)
    assert not e.tiers.is_swapped(swapped[0])
    while e.has_unfinished():
        e.step()
    assert e.tiers.swap_used == 0 and not e.tiers.swapped


LONG = "the paged cache keeps every block of every prompt it has seen " * 4


def _offloading(tiny_llama_dir, path, **kw) -> LLM:
    return LLM(str(tiny_llama_dir), **TINY, num_kv_blocks=64, block_size=4, kv_offload_path=str(path), **kw)


def test_a_restarted_engine_loads_the_prefix_from_disk(tiny_llama_dir, tmp_path, monkeypatch):
    params = SamplingParams(max_tokens=8, **GREEDY)
    first = _offloading(tiny_llama_dir, tmp_path)
    cold = first.generate(LONG, params)[0]
    n = len(cold.prompt_token_ids)
    assert cold.num_cached_tokens == 0
    first.engine.close()  # the queued writes land
    assert _traffic(first, "disk", "out") == (n + 7) // 4  # every full block computed, the answer's too
    again = _offloading(tiny_llama_dir, tmp_path)
    fed = _fed(again, monkeypatch)
    warm = again.generate(LONG, params)[0]
    assert warm.num_cached_tokens == (n - 1) // 4 * 4 > 0
    assert warm.outputs[0].token_ids == cold.outputs[0].token_ids
    assert fed[0] == n - warm.num_cached_tokens  # only the rest of the prompt was prefilled
    assert _traffic(again, "disk", "in") == warm.num_cached_tokens // 4
    again.engine.close()


def test_a_corrupt_block_file_is_skipped_and_recomputed(tiny_llama_dir, tmp_path):
    params = SamplingParams(max_tokens=8, **GREEDY)
    first = _offloading(tiny_llama_dir, tmp_path)
    cold = first.generate(LONG, params)[0]
    first.engine.close()
    seq_hashes: list[bytes] = []
    extend_block_hashes(seq_hashes, cold.prompt_token_ids, 4, len(cold.prompt_token_ids))
    victim = next(tmp_path.rglob(seq_hashes[3].hex() + ".kv"))  # the 4th block: 3 load, then a recompute
    good = victim.read_bytes()
    data = bytearray(good)
    data[-7] ^= 0xFF
    victim.write_bytes(bytes(data))
    again = _offloading(tiny_llama_dir, tmp_path)
    warm = again.generate(LONG, params)[0]
    assert warm.num_cached_tokens == 3 * 4
    assert warm.outputs[0].token_ids == cold.outputs[0].token_ids
    assert again.engine.stats().kv_offload_corrupt == 1
    again.engine.close()
    # Removed, then written again from the recomputed block (its bits differ in the last place: it was
    # computed as a chunk over a cached prefix), so a third engine loads the whole prefix.
    assert victim.read_bytes() != bytes(data)
    third = _offloading(tiny_llama_dir, tmp_path)
    assert third.generate(LONG, params)[0].num_cached_tokens == (len(cold.prompt_token_ids) - 1) // 4 * 4
    assert third.engine.stats().kv_offload_corrupt == 0
    third.engine.close()


def test_a_prefix_evicted_from_the_pool_comes_back_from_disk(tiny_llama_dir, tmp_path):
    params = SamplingParams(max_tokens=4, **GREEDY)
    llm = LLM(str(tiny_llama_dir), **TINY, num_kv_blocks=24, block_size=4, kv_offload_path=str(tmp_path))
    cold = llm.generate(LONG, params)[0]
    for i in range(6):  # other prompts take every free block: the long prompt's cached blocks are evicted
        llm.generate(f"{i} filler words that are new to the cache each time {i} " * 2, params)
    hashes: list[bytes] = []
    extend_block_hashes(hashes, cold.prompt_token_ids, 4, len(cold.prompt_token_ids))
    assert llm.engine.blocks.match(hashes) == [], "the filler was meant to evict the whole prefix"
    warm = llm.generate(LONG, params)[0]
    assert warm.num_cached_tokens == (len(cold.prompt_token_ids) - 1) // 4 * 4
    assert _traffic(llm, "disk", "in") > 0
    assert warm.outputs[0].token_ids == cold.outputs[0].token_ids
    llm.engine.close()


def test_another_kv_format_does_not_read_the_blocks(tiny_llama_dir, tmp_path):
    params = SamplingParams(max_tokens=4, **GREEDY)
    first = _offloading(tiny_llama_dir, tmp_path)
    first.generate(LONG, params)
    first.engine.close()
    other = _offloading(tiny_llama_dir, tmp_path, kv_cache_dtype="int8")
    assert other.generate(LONG, params)[0].num_cached_tokens == 0
    other.engine.close()


def test_the_disk_tier_needs_the_prefix_cache(tiny_llama_dir, tmp_path):
    with pytest.raises(ValueError, match="enable_prefix_caching"):
        _offloading(tiny_llama_dir, tmp_path, enable_prefix_caching=False)


def test_a_path_that_cannot_hold_the_tier_fails_the_start_and_one_lost_later_is_a_miss(tiny_llama_dir, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    with pytest.raises(ValueError, match="kv_offload_path .* cannot hold the disk tier"):
        _offloading(tiny_llama_dir, a_file)
    root = tmp_path / "tier"
    llm = _offloading(tiny_llama_dir, root)
    llm.engine.close()
    shutil.rmtree(root)
    root.write_text("replaced by a file")  # the directory is gone while serving: misses, not errors
    out = llm.generate(LONG, SamplingParams(max_tokens=4, **GREEDY))[0]
    assert out.outputs[0].finish_reason == "length" and out.num_cached_tokens == 0


def test_a_sequence_with_non_finite_logits_leaves_nothing_findable(tiny_llama_dir, tmp_path, monkeypatch):
    """Its K/V may be what went wrong: no block of it is registered in the pool or written to disk."""
    llm = _offloading(tiny_llama_dir, tmp_path)
    real = llm.engine.runner.execute

    def execute(seqs, num_tokens):
        out = real(seqs, num_tokens)
        out.logits = torch.full_like(out.logits, float("nan"))
        return out

    monkeypatch.setattr(llm.engine.runner, "execute", execute)
    out = llm.generate(LONG, SamplingParams(max_tokens=4, **GREEDY))[0]
    llm.engine.close()
    assert out.outputs[0].finish_reason == "error"
    assert llm.engine.blocks.num_cached == 0 and _traffic(llm, "disk", "out") == 0
    assert not list(tmp_path.rglob("*.kv"))
