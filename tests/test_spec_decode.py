"""Speculative decoding: the config, the proposers, the acceptance rule's exactness (greedy: the same
tokens; sampled: the target's distribution), and the engine with speculation on giving exactly the
tokens it gives with it off (fp32, tiny random models), batched, staggered, preempted, prefix-cached,
with nothing leaked."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from tinyserve import LLM, SamplingParams
from tinyserve.config import SpeculativeConfig
from tinyserve.speculative.controller import DraftPolicy, expected_tokens
from tinyserve.speculative.cost import StepCost
from tinyserve.speculative.ngram import propose_ngram
from tinyserve.speculative.verify import accept_greedy, accept_sampled

from conftest import TINY, make_tiny_checkpoint  # noqa: E402

pytestmark = pytest.mark.usefixtures("restore_torch_threads")

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
LOOP_VOCAB = 48  # the test models only ever output ids below this: their text repeats, as real text does
_rng = random.Random(0)
PROMPTS: list[str | list[int]] = [[_rng.randrange(3, LOOP_VOCAB) for _ in range(n)] for n in (5, 19, 30)]
PROMPTS.append("hello there, general kenobi")
# Exactness tests fix k: the adaptive controller's choice rests on timings (it may rightly decide that
# a draft as slow as the target never pays), which a test must not depend on.
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "adaptive": False}


# -- the config -----------------------------------------------------------------------------------
@pytest.mark.parametrize("value, field", [
    ('{"method": "ngram"}', "num_speculative_tokens"),
    ({"method": "magic", "num_speculative_tokens": 2}, "method"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 5, "prompt_lookup_max": 3},
     "prompt_lookup_min"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "model"),
    ({"method": "ngram", "num_speculative_tokens": 2, "typo": 1}, "typo"),
    ({"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 0}, "disable_by_batch_size"),
    ("{not json", "JSON"),
])
def test_bad_configs_name_their_field(value, field):
    with pytest.raises(ValueError, match=field):
        SpeculativeConfig.parse(value)


def test_config_from_json_and_a_model_alone_means_a_draft_model():
    cfg = SpeculativeConfig.parse('{"model": "/m", "num_speculative_tokens": 3}')
    assert cfg is not None and (cfg.method, cfg.model, cfg.num_speculative_tokens) == ("draft_model", "/m", 3)
    assert SpeculativeConfig.parse(None) is None


# -- proposers and the rule -----------------------------------------------------------------------
def test_ngram_takes_the_latest_match_of_the_longest_suffix():
    assert propose_ngram([1, 2, 3, 9, 1, 2, 3, 7, 2, 3], 2, 3, 1) == [7, 2]  # "2 3" last seen before "7"
    assert propose_ngram([1, 2, 3, 4, 5], 3, 3, 1) == []  # nothing repeats
    assert propose_ngram([5, 5, 5, 5], 3, 2, 1) == [5, 5, 5]  # a run continues past the end of the copy
    assert propose_ngram([1, 2, 1, 2], 5, 2, 1) == [1, 2, 1, 2, 1]
    # Token ids whose bytes straddle an aligned match must not count.
    assert propose_ngram([256, 1, 0, 0, 0, 256, 1], 2, 2, 1) == [0, 0]
    assert propose_ngram([7, 8, 9, 8], 2, 3, 2) == []  # a one-token match is below prompt_lookup_min


def test_greedy_acceptance_is_the_targets_argmax_run():
    assert accept_greedy([5, 6, 7, 8], [5, 6, 7]) == [5, 6, 7, 8]  # all accepted + bonus
    assert accept_greedy([5, 6, 7, 8], [5, 9, 7]) == [5, 6]  # first mismatch replaced by the target's
    assert accept_greedy([4, 6, 7, 8], [5, 6, 7]) == [4]


def test_draft_length_weighs_acceptance_against_the_measured_step():
    # A memory-bound step: 5 rows cost what 1 does; then a row is 20% of one, beyond 8 rows linear.
    target = StepCost({1: 1.0, 2: 1.0, 5: 1.0, 8: 1.6, 16: 3.2})
    policy = DraftPolicy(k_max=4, adaptive=True, target=target)
    assert policy.best_k([0.9]) == 4  # free rows, good acceptance: draft all
    assert policy.best_k([0.0]) == 0  # nothing is accepted: off
    assert policy.best_k([0.9] * 8) == 0, "at batch 8, k more rows per sequence cost more than they return"
    slow_draft = DraftPolicy(k_max=4, adaptive=True, target=target, draft=StepCost({1: 0.6}))
    assert slow_draft.best_k([0.5]) == 0 and slow_draft.best_k([0.95]) > 0
    assert math.isclose(expected_tokens(0.5, 3), 1 + 0.5 + 0.25 + 0.125)
    seq = object()
    for _ in range(20):
        policy.update(seq, drafted=4, accepted=0)
    assert policy.choose([seq]) == 0, "a sequence that never accepts stops drafting"
    ks = [policy.choose([seq]) for _ in range(32)]
    assert ks.count(4) == 2 and ks.count(0) == 30, "and probes again now and then, with the k that would pay best"
    assert policy.rate(object()) < 0.05, "a new sequence starts from the rate pooled over the others"
    big = [object() for _ in range(8)]
    assert [policy.choose(big) for _ in range(40)].count(0) == 40, "no probing where the batch rules it out"
    assert DraftPolicy(k_max=3, adaptive=False).choose([seq]) == 3


def test_a_new_sequence_of_a_predictable_workload_drafts_from_its_first_step():
    """The pooled rate is the prior: sequences that accepted everything make the next one draft at once,
    where the fixed prior alone (0.5) would keep it off until probes had raised its own rate."""
    target = StepCost({1: 1.0, 2: 1.25, 3: 1.5, 4: 1.9, 5: 2.3})  # a packed kernel: rows cost
    draft = StepCost({1: 0.5, 2: 0.55})
    policy = DraftPolicy(k_max=4, adaptive=True, target=target, draft=draft)
    assert policy.choose([object()]) == 0, "the first sequence: the prior alone does not pay"
    for _ in range(10):
        seq = object()
        policy.update(seq, drafted=3, accepted=3)
        policy.forget(set())
    assert policy.choose([object()]) > 0


def test_the_draft_cost_counts_the_two_tokens_a_full_acceptance_leaves_unseen():
    """After every draft is accepted, the draft's first step feeds two tokens per sequence; a draft
    whose kernel pays per row makes that step dearer, and k = 1 stops paying sooner."""
    target = StepCost({1: 1.0, 2: 1.1, 32: 2.8})
    flat = DraftPolicy(k_max=1, adaptive=True, target=target, draft=StepCost({1: 0.2, 16: 0.8, 32: 0.8}))
    steep = DraftPolicy(k_max=1, adaptive=True, target=target, draft=StepCost({1: 0.2, 16: 0.8, 32: 1.6}))
    rates = [0.95] * 16
    assert flat.best_k(rates) == 1 and steep.best_k(rates) == 0


# -- tiny models: the target and a bad draft --------------------------------------------------------
def make_looping_checkpoint(path: Path, seed: int) -> Path:
    """A tiny random model whose LM head can only pick the first LOOP_VOCAB ids (the other rows are
    zero, so lose to the best of 48 random logits): its greedy text repeats within a few dozen
    tokens, which gives prompt lookup something to find and a draft model something to get right."""
    from safetensors.torch import load_file, save_file

    make_tiny_checkpoint(path, "llama", seed=seed)
    weights = load_file(path / "model.safetensors")
    weights["lm_head.weight"][LOOP_VOCAB:] = 0
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory) -> Path:
    return make_looping_checkpoint(tmp_path_factory.mktemp("spec-target"), seed=0)


@pytest.fixture(scope="module")
def bad_draft_dir(tmp_path_factory) -> Path:
    """Another random model of the same shape and vocabulary: a draft that is mostly wrong."""
    return make_looping_checkpoint(tmp_path_factory.mktemp("spec-draft"), seed=7)


def _probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Rows of logits as the sampler's distributions (temperature, then top-k / top-p)."""
    from tinyserve.engine.sampler import filter_logits

    n = logits.shape[0]
    return filter_logits(logits / temperature, torch.full((n,), top_k), torch.full((n,), top_p),
                         torch.zeros(n)).softmax(-1)


@pytest.fixture(scope="module")
def target_and_draft_rows(target_dir, bad_draft_dir) -> tuple[torch.Tensor, torch.Tensor]:
    """The tiny target's and the bad draft's next-token distributions at the last three positions of
    one prompt: p with temperature 0.8, top-k 8, top-p 0.9 (what a request asks); q as the draft
    samples, with temperature 1 and top-k 8 (its support is not p's)."""
    from tinyserve_lab.quality import window_logits

    ids = PROMPTS[1]
    rows = [window_logits(LLM(str(d), **TINY).engine, ids)[-3:] for d in (target_dir, bad_draft_dir)]
    p, q = _probs(rows[0], 0.8, 8, 0.9), _probs(rows[1][:2], 1.0, 8, 1.0)
    # Only tokens either distribution can emit: the rule is the same on them, and draws are fast.
    keep = ((p > 0).any(0) | (q > 0).any(0)).nonzero()[:, 0]
    return p[:, keep], q[:, keep]


def _tv(counts: torch.Tensor, p: torch.Tensor) -> float:
    return 0.5 * float((counts / counts.sum() - p).abs().sum())


def _first_tokens(rule, p: torch.Tensor, q: torch.Tensor | None, drafts: list[int] | None, trials: int,
                  seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(p.shape[1])
    for _ in range(trials):
        d = drafts if q is None else [int(torch.multinomial(q[i], 1, generator=g)) for i in range(2)]
        counts[rule(p, q, d, g)[0]] += 1
    return counts


def _shifted_rows(p, q, drafts, g):
    """The rule with an off-by-one: each draft judged against the next position's distribution."""
    return accept_sampled(torch.cat([p[1:], p[-1:]]), q, drafts, g)


def _swapped(p, q, drafts, g):
    """The rule with p and q confused: accept with min(1, q/p), resample from max(0, q - p)."""
    return accept_sampled(torch.cat([q, p[-1:]]), p[:-1], drafts, g)


@pytest.mark.parametrize("point_mass", [False, True])
def test_sampled_tokens_follow_the_target_distribution_with_a_bad_draft(target_and_draft_rows, point_mass):
    """A draft far from the target (another model, or an n-gram point mass on the target's second
    choice): the first emitted token must still be distributed as p[0]. 6,000 draws over a few
    tokens put the TV noise near 0.01; the bound 0.05 fails the rule's classic slips (checked)."""
    p, q = target_and_draft_rows
    assert 2 <= int((p[0] > 0).sum()) <= 8
    second = int(p[0].topk(2).indices[1])  # a point mass on the target's second choice: often rejected
    drafts = [second, int(p[1].argmax())] if point_mass else None
    q = None if point_mass else q
    counts = _first_tokens(accept_sampled, p, q, drafts, 6000, seed=0)
    assert _tv(counts, p[0]) < 0.05, (counts, p[0])
    assert float(counts[p[0] == 0].sum()) == 0, "a token top-k / top-p removed was emitted"
    for slip in (_shifted_rows,) if point_mass else (_shifted_rows, _swapped):
        wrong = _first_tokens(slip, p, q, drafts, 6000, seed=0)
        assert _tv(wrong, p[0]) > 0.05, f"the bound would not catch {slip.__name__}"


def test_the_second_token_follows_its_row_once_the_first_is_accepted(target_and_draft_rows):
    p, q = target_and_draft_rows
    g = torch.Generator().manual_seed(1)
    d0 = int(p[0].argmax())  # a first draft the target likes, so it is often accepted
    counts = torch.zeros(p.shape[1])
    for _ in range(6000):
        out = accept_sampled(p, q, [d0, int(torch.multinomial(q[1], 1, generator=g))], g)
        if len(out) >= 2:
            counts[out[1]] += 1
    assert counts.sum() > 1000 and _tv(counts, p[1]) < 0.05


# -- the engine ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(target_dir) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in LLM(str(target_dir), **TINY).generate(PROMPTS, GREEDY)]


def _methods(target_dir: Path, bad_draft_dir: Path) -> dict[str, dict]:
    return {
        "ngram": NGRAM,
        "draft-same": {"model": str(target_dir), "num_speculative_tokens": 3, "adaptive": False},
        "draft-bad": {"model": str(bad_draft_dir), "num_speculative_tokens": 3, "adaptive": False},
        "self-int4": {"method": "self", "num_speculative_tokens": 3, "adaptive": False},
        "ngram-adaptive": {**NGRAM, "adaptive": True},  # drafts or not, as its measured costs say
    }


def _assert_nothing_held(llm: LLM) -> None:
    e = llm.engine
    assert e.blocks.num_free == e.num_blocks and not any(e.blocks.ref_counts)
    draft = getattr(e.spec.proposer, "blocks", None)
    if draft is not None:
        assert draft.num_free == draft.num_blocks and not e.spec.proposer.kv, "draft KV leaked"


@pytest.mark.parametrize("method", ["ngram", "draft-same", "draft-bad", "self-int4", "ngram-adaptive"])
def test_greedy_tokens_identical_with_speculation(target_dir, bad_draft_dir, reference, method):
    cfg = _methods(target_dir, bad_draft_dir)[method]
    llm = LLM(str(target_dir), **TINY, speculative_config=cfg)
    got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
    assert got == reference
    stats = llm.engine.spec.stats
    _assert_nothing_held(llm)
    if method == "ngram-adaptive":
        return
    assert stats.num_draft_tokens > 0
    if method == "draft-same":  # the target as its own draft: every draft is accepted
        assert stats.num_accepted_tokens == stats.num_draft_tokens
    else:
        assert stats.num_accepted_tokens < stats.num_draft_tokens
    _assert_nothing_held(llm)


def test_staggered_arrivals_preemption_and_prefix_cache(target_dir, bad_draft_dir):
    """Requests join while others speculate, in a pool small enough to preempt, with prefix caching on:
    every request's tokens are the ones it gets alone without speculation, step by step."""
    kw = dict(**TINY, num_kv_blocks=14, block_size=4, max_num_batched_tokens=32)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    prompts = [*PROMPTS, PROMPTS[1] + [5, 6], PROMPTS[2] + [7]]  # shared prefixes
    want = [o.outputs[0].token_ids for o in LLM(str(target_dir), **kw, enable_prefix_caching=False)
            .generate(prompts, params)]
    for cfg in (NGRAM, {"model": str(bad_draft_dir), "num_speculative_tokens": 3, "adaptive": False}):
        llm = LLM(str(target_dir), **kw, speculative_config=cfg)
        e = llm.engine
        seqs = []
        for i, prompt in enumerate(prompts):
            seqs += e.add_request(f"r{i}", prompt, params)
            e.step()
        while e.has_unfinished():
            e.step()
        assert [s.output_token_ids for s in seqs] == want
        assert sum(s.num_preemptions for s in seqs) > 0, "the pool was meant to force preemption"
        assert e.spec.stats.num_draft_tokens > 0
        _assert_nothing_held(llm)


def test_stops_and_logprobs_inside_an_accepted_run(target_dir, reference):
    """A stop token or max_tokens reached in the middle of an accepted run ends the output there, and
    each emitted token carries its own logprob, as without speculation."""
    llm = LLM(str(target_dir), **TINY, speculative_config={"model": str(target_dir), "num_speculative_tokens": 4,
                                                             "adaptive": False})
    base = LLM(str(target_dir), **TINY)
    stop_at = reference[0][5]
    for params in (SamplingParams(temperature=0, max_tokens=7, ignore_eos=True, logprobs=2),
                   SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop_token_ids=[stop_at],
                                  logprobs=1)):
        want = base.generate(PROMPTS[:1], params)[0].outputs[0]
        got = llm.generate(PROMPTS[:1], params)[0].outputs[0]
        assert got.token_ids == want.token_ids and got.finish_reason == want.finish_reason
        assert got.logprobs is not None and want.logprobs is not None
        assert len(got.logprobs) == len(got.token_ids) and all(t in lp for t, lp in zip(got.token_ids, got.logprobs))
        assert all(math.isclose(a[t].logprob, b[t].logprob, abs_tol=1e-4)
                   for t, a, b in zip(got.token_ids, got.logprobs, want.logprobs))
    _assert_nothing_held(llm)


def test_penalties_and_min_tokens_see_the_drafts_before_each_row(target_dir):
    """A repetition penalty changes what greedy picks; speculation must apply it to each verified row
    as if the drafts before it were already output, or the tokens would differ."""
    params = SamplingParams(temperature=0, max_tokens=24, repetition_penalty=1.3, frequency_penalty=0.5,
                            min_tokens=10, stop_token_ids=[11])
    want = [o.outputs[0].token_ids for o in LLM(str(target_dir), **TINY).generate(PROMPTS, params)]
    llm = LLM(str(target_dir), **TINY, speculative_config={"model": str(target_dir), "num_speculative_tokens": 4,
                                                             "adaptive": False})
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)] == want
    assert llm.engine.spec.stats.num_accepted_tokens > 0


def test_seeded_sampling_is_reproducible_and_keeps_going(target_dir, bad_draft_dir):
    cfg = {"model": str(bad_draft_dir), "num_speculative_tokens": 3, "adaptive": False}
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, max_tokens=16, seed=3, n=2, ignore_eos=True)

    def run() -> list[list[list[int]]]:
        llm = LLM(str(target_dir), **TINY, speculative_config=cfg)
        return [[o.token_ids for o in r.outputs] for r in llm.generate(PROMPTS[:2], params)]

    first = run()
    assert first == run() and all(len(t) == 16 for r in first for t in r)


def test_a_draft_with_another_vocabulary_is_refused(target_dir, tmp_path):
    other = make_tiny_checkpoint(tmp_path / "other", "llama", vocab_size=1000)
    with pytest.raises(ValueError, match="vocabulary"):
        LLM(str(target_dir), **TINY, speculative_config={"model": str(other), "num_speculative_tokens": 2})
