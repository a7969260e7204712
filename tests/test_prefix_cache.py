"""Automatic prefix caching: block identities, the pool's sharing and eviction, and the engine giving
exactly the same greedy tokens with the cache on and off (fp32, tiny random model)."""

from __future__ import annotations

import random

import pytest

from tinyserve import LLM, SamplingParams
from tinyserve.kv.block_hash import extend_block_hashes
from tinyserve.kv.block_manager import BlockManager

from conftest import TINY  # noqa: E402

pytestmark = pytest.mark.usefixtures("restore_torch_threads")

BS = 4
GREEDY = dict(temperature=0, ignore_eos=True)


def hashes(tokens: list[int], n: int | None = None) -> list[bytes]:
    out: list[bytes] = []
    extend_block_hashes(out, tokens, BS, len(tokens) if n is None else n)
    return out


# -- block identities -----------------------------------------------------------------------------
def test_block_identity_chains_the_whole_prefix():
    a = hashes([1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert len(a) == 2  # the partial third block has no identity
    b = hashes([9, 9, 9, 9, 5, 6, 7, 8])
    assert a[1] != b[1], "same tokens after a different prefix must not alias"
    assert hashes([1, 2, 3, 4, 5, 6, 7, 8]) == a
    grown = hashes([1, 2, 3, 4], 4)
    extend_block_hashes(grown, [1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0], BS, 12)  # extends, keeps the first
    assert grown[:2] == a and len(grown) == 3


# -- the pool -----------------------------------------------------------------------------------
def cached_pool(num_blocks: int = 4) -> tuple[BlockManager, list[bytes], list[int]]:
    """A pool holding one table of two full, registered blocks (tokens 0..7)."""
    bm = BlockManager(num_blocks=num_blocks, block_size=BS)
    h = hashes(list(range(8)))
    a: list[int] = []
    bm.grow(a, 8)
    bm.register(a, h, 0, 2)
    return bm, h, a


def test_match_take_and_register_share_the_longest_cached_prefix():
    bm = BlockManager(num_blocks=8, block_size=BS)
    toks = list(range(12))
    h = hashes(toks)
    a: list[int] = []
    bm.grow(a, 12)
    bm.register(a, h, 0, 2)  # only the first two blocks are computed so far
    assert bm.match(h) == a[:2] and bm.match(hashes([0, 1, 2, 3, 9, 9, 9, 9])) == a[:1]
    assert bm.match(hashes([7, 7, 7, 7] + toks[4:])) == []
    b: list[int] = []
    assert bm.can_take(a[:2], 12)
    bm.take(b, bm.match(h))
    bm.grow(b, 12)
    assert b[:2] == a[:2] and b[2] != a[2] and [bm.ref_counts[x] for x in b] == [2, 2, 1]
    bm.register(b, h, 2, 3)  # b computed block 2 itself
    bm.register(a, h, 2, 3)  # a computed the same prefix at the same time: b's block stays the cached one
    assert bm.match(h) == b and bm.block_hash[a[2]] is None and bm.num_cached == 3


def test_free_cached_blocks_stay_findable_until_evicted_lru():
    bm, h, a = cached_pool()
    blocks = list(a)
    bm.release(a)
    assert bm.num_free == 4 and bm.usage == 0.0 and bm.match(h) == blocks  # free, still cached
    # Taking a free cached block removes it from the free list.
    b: list[int] = []
    assert bm.can_take(blocks[:1], 4)
    bm.take(b, blocks[:1])
    assert bm.num_free == 3 and bm.ref_counts[blocks[0]] == 1
    # Fresh blocks come from the never-cached ones first (they are older in LRU order), then evict:
    # the released table's tail (block 1) goes before its head (block 0, held here anyway).
    c: list[int] = []
    bm.grow(c, 8)
    assert set(c).isdisjoint(blocks) and bm.match(h) == blocks
    bm.grow(c, 12)
    assert c[-1] == blocks[1] and bm.match(h) == blocks[:1], "the evicted block must be forgotten"
    assert not bm.can_grow(c, 13), "a block held by a sequence is never handed out"
    bm.release(b)
    bm.release(c)
    assert bm.num_free == 4 and all(r == 0 for r in bm.ref_counts)


def test_release_without_keeping_forgets_unshared_blocks():
    bm, h, a = cached_pool()
    b: list[int] = []
    bm.take(b, bm.match(h)[:1])  # b shares block 0 only
    bm.release(a, keep_cached=False)  # a failed: its K/V may be garbage
    assert bm.match(h) == b, "block 0 is still held (computed earlier); block 1 is forgotten"
    bm.release(b)


def test_caching_off_never_matches():
    bm = BlockManager(num_blocks=4, block_size=BS, enable_caching=False)
    h = hashes(list(range(8)))
    a: list[int] = []
    bm.grow(a, 8)
    bm.register(a, h, 0, 2)
    assert bm.match(h) == [] and bm.num_cached == 0


# -- the engine, cache on vs off ----------------------------------------------------------------
@pytest.fixture(scope="module")
def pair(tiny_llama_dir):
    """Two engines on the same weights, identical but for the cache."""
    kw = dict(**TINY, num_kv_blocks=96, block_size=BS)
    return LLM(str(tiny_llama_dir), **kw), LLM(str(tiny_llama_dir), **kw, enable_prefix_caching=False)


def _all_free(llm) -> bool:
    b = llm.engine.blocks
    return b.num_free == b.num_blocks and all(c == 0 for c in b.ref_counts) and not llm.engine.requests


def _rand_prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 40000) for _ in range(n)]


def test_greedy_identical_with_prefix_ending_mid_block_and_fully_cached_prompt(pair):
    cached, plain = pair
    rng = random.Random(1)
    shared = _rand_prompt(rng, 10)  # 2 full blocks + 2 tokens
    prompts = [shared + _rand_prompt(rng, 5), shared + _rand_prompt(rng, 3), shared[:8], shared[:8]]
    params = SamplingParams(max_tokens=12, **GREEDY)
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, params)]
    # One at a time, so each finds what the previous ones left.
    got = [cached.generate(p, params)[0] for p in prompts]
    assert [o.outputs[0].token_ids for o in got] == want
    # Cold, then the two full shared blocks, then a prompt that is entirely cached: 8 tokens = 2
    # blocks, of which the last is recomputed for the logits of the last token.
    assert [o.num_cached_tokens for o in got] == [got[0].num_cached_tokens, 8, 4, 4]
    assert _all_free(cached) and _all_free(plain)


def test_requests_sharing_a_prefix_while_running(pair):
    cached, plain = pair
    rng = random.Random(2)
    shared = _rand_prompt(rng, 16)
    a, b = shared + _rand_prompt(rng, 3), shared + _rand_prompt(rng, 6)
    params = SamplingParams(max_tokens=10, **GREEDY)
    want = [o.outputs[0].token_ids for o in plain.generate([a, b], params)]
    e = cached.engine
    e.add_request("a", a, params)
    e.step()  # a's prompt is computed and cached; a runs on
    seq_b, = e.add_request("b", b, params)
    e.step()
    seq_a, = e.requests["a"]
    assert seq_b.num_cached_tokens == 16 and seq_b.block_table[:4] == seq_a.block_table[:4]
    assert all(e.blocks.ref_counts[x] == 2 for x in seq_a.block_table[:4])
    while e.has_unfinished():
        e.step()
    assert [e.pop_output(r).outputs[0].token_ids for r in ("a", "b")] == want
    assert _all_free(cached)


def test_chunked_prefill_over_a_cached_prefix(tiny_llama_dir):
    rng = random.Random(3)
    shared = _rand_prompt(rng, 30)
    prompts = [shared + _rand_prompt(rng, 9), shared + _rand_prompt(rng, 17)]
    params = SamplingParams(max_tokens=8, **GREEDY)
    kw = dict(**TINY, num_kv_blocks=64, block_size=BS, max_num_batched_tokens=7)  # chunks of 7 tokens
    want = [o.outputs[0].token_ids for o in LLM(str(tiny_llama_dir), **kw, enable_prefix_caching=False)
            .generate(prompts, params)]
    llm = LLM(str(tiny_llama_dir), **kw)
    first = llm.generate(prompts[0], params)[0]
    second = llm.generate(prompts[1], params)[0]
    assert [first.outputs[0].token_ids, second.outputs[0].token_ids] == want
    assert second.num_cached_tokens == 28 and _all_free(llm)


def test_prompt_logprobs_requests_bypass_the_cache(pair):
    cached, plain = pair
    prompt = _rand_prompt(random.Random(4), 13)
    cached.generate(prompt, SamplingParams(max_tokens=2, **GREEDY))
    params = SamplingParams(max_tokens=2, prompt_logprobs=0, **GREEDY)
    got, want = cached.generate(prompt, params)[0], plain.generate(prompt, params)[0]
    assert got.num_cached_tokens == 0 and got.prompt_logprobs == want.prompt_logprobs


def test_stats_count_first_admissions(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), **TINY, num_kv_blocks=32, block_size=BS)
    prompt = _rand_prompt(random.Random(5), 9)
    llm.generate([prompt], SamplingParams(max_tokens=2, **GREEDY))
    llm.generate([prompt], SamplingParams(max_tokens=2, **GREEDY))
    assert (llm.engine.blocks.stats.queries, llm.engine.blocks.stats.hits) == (18, 8)


def test_eviction_under_pool_pressure_with_preemption_matches_cache_off(tiny_llama_dir, monkeypatch):
    """Many requests over a few shared prefixes in a pool that forces eviction and preemption: the
    same greedy tokens as without the cache; every held block of a running sequence carries that
    sequence's own prefix identity (the cache never hands out another prefix's block); every
    reference count returns to 0."""
    rng = random.Random(6)
    roots = [_rand_prompt(rng, rng.randrange(4, 14)) for _ in range(4)]
    prompts = [rng.choice(roots) + _rand_prompt(rng, rng.randrange(1, 7)) for _ in range(14)]
    params = [SamplingParams(max_tokens=rng.randrange(4, 14), **GREEDY) for _ in prompts]
    kw = dict(**TINY, num_kv_blocks=14, block_size=BS, max_num_batched_tokens=24)  # 56 token slots
    want = [o.outputs[0].token_ids for o in LLM(str(tiny_llama_dir), **kw, enable_prefix_caching=False)
            .generate(prompts, params)]
    llm = LLM(str(tiny_llama_dir), **kw)
    e = llm.engine
    seen = {"preempted": 0, "shared": 0, "evicted": 0}
    real_step = e.step
    cached_before: set[bytes] = set()

    def checked_step():
        nonlocal cached_before
        out = real_step()
        bm = e.blocks
        for seq in e.scheduler.running:
            full = seq.num_computed // BS
            for i, block in enumerate(seq.block_table[:full]):
                h = bm.block_hash[block]
                assert h is None or h == seq.full_block_hashes(BS, seq.num_computed)[i], "foreign prefix"
            seen["shared"] += sum(bm.ref_counts[b] > 1 for b in seq.block_table)
        seen["preempted"] = max(seen["preempted"], max((s.num_preemptions for s in e.scheduler.running), default=0))
        seen["evicted"] += len(cached_before - bm.cached.keys())
        cached_before = set(bm.cached)
        return out

    monkeypatch.setattr(e, "step", checked_step)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert got == want
    assert seen["preempted"] and seen["shared"] and seen["evicted"], f"the workload must exercise all three: {seen}"
    assert _all_free(llm)


def test_a_failed_request_leaves_nothing_findable(tiny_llama_dir, monkeypatch):
    """A step that fails after the prompt was cached: the failed sequence's blocks are forgotten
    (its K/V may be what failed), so the next request with that prompt computes it afresh."""
    llm = LLM(str(tiny_llama_dir), **TINY, num_kv_blocks=32, block_size=BS)
    e = llm.engine
    prompt = _rand_prompt(random.Random(7), 13)
    e.add_request("x", prompt, SamplingParams(max_tokens=8, **GREEDY))
    e.step()  # the prompt's 3 full blocks are cached
    assert e.blocks.num_cached == 3
    monkeypatch.setattr(e.runner, "execute", lambda seqs, num_tokens: (_ for _ in ()).throw(RuntimeError("boom")))
    (seq,) = e.step()
    assert seq.finish_reason == "error" and e.blocks.num_cached == 0
    e.pop_output("x")
    monkeypatch.undo()
    assert llm.generate(prompt, SamplingParams(max_tokens=2, **GREEDY))[0].num_cached_tokens == 0
    assert _all_free(llm)
