"""Sampling: seeds, greedy, top-k / top-p / min-p support, penalties (unit and through the engine)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from tinyserve import LLM, SamplingParams
from tinyserve.engine.sampler import Sampler, apply_penalties, filter_logits

from conftest import TINY, top_logprobs  # noqa: E402  (one engine thread for tiny models)

pytestmark = pytest.mark.usefixtures("restore_torch_threads")


INF = float("inf")
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), **TINY, num_kv_blocks=160, block_size=4, max_num_seqs=64)


def _ids(out, i=0):
    return out.outputs[i].token_ids


# -- filter_logits on hand-made logits ---------------------------------------------------------
# probabilities 0.5, 0.2, 0.15, 0.1, 0.05 in a shuffled order: token 3 > 0 > 4 > 1 > 2
_P = torch.tensor([0.2, 0.1, 0.05, 0.5, 0.15])
_ORDER = [3, 0, 4, 1, 2]


def _filter(top_k=0, top_p=1.0, min_p=0.0, logits=None):
    logits = _P.log()[None] if logits is None else logits
    rows = logits.shape[0]
    return filter_logits(
        logits.clone(),
        torch.tensor([top_k] * rows),
        torch.tensor([top_p] * rows),
        torch.tensor([min_p] * rows),
    )


def _kept(row: torch.Tensor) -> set[int]:
    return set(torch.isfinite(row).nonzero().flatten().tolist())


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 100])
def test_filter_top_k_keeps_exactly_the_k_largest(k):
    out = _filter(top_k=k)[0]
    assert _kept(out) == set(_ORDER[: min(k, 5)])
    kept = torch.isfinite(out)
    assert torch.equal(out[kept], _P.log()[kept])  # survivors are untouched
    assert torch.all(out[~kept] == -INF)


@pytest.mark.parametrize(
    "top_p,expected",
    [(0.45, 1), (0.6, 2), (0.75, 3), (0.9, 4), (0.99, 5), (1.0, 5)],
)
def test_filter_top_p_keeps_the_smallest_nucleus(top_p, expected):
    # nucleus = smallest prefix (by prob) whose mass reaches top_p: cumulative 0.5, 0.7, 0.85, 0.95, 1.0
    assert _kept(_filter(top_p=top_p)[0]) == set(_ORDER[:expected])


@pytest.mark.parametrize("min_p,expected", [(0.0, 5), (0.05, 5), (0.15, 4), (0.25, 3), (0.35, 2), (0.5, 1), (1.0, 1)])
def test_filter_min_p_keeps_p_at_least_min_p_times_pmax(min_p, expected):
    # thresholds min_p * 0.5 against probs 0.5, 0.2, 0.15, 0.1, 0.05 (no value sits on a boundary)
    assert _kept(_filter(min_p=min_p)[0]) == set(_ORDER[:expected])


def test_filter_top_p_applies_to_the_top_k_renormalized_distribution():
    # top_k=3 renormalizes to 0.588, 0.235, 0.176: mass before the 3rd is 0.82 >= 0.8, so 2 survive;
    # top_p=0.8 alone keeps 3 (mass before the 3rd is only 0.7).
    assert _kept(_filter(top_p=0.8)[0]) == set(_ORDER[:3])
    assert _kept(_filter(top_k=3, top_p=0.8)[0]) == set(_ORDER[:2])


def test_filter_rows_are_independent_and_off_means_off():
    logits = torch.stack([_P.log(), _P.log().flip(0), _P.log(), torch.zeros(5)])
    out = filter_logits(
        logits.clone(),
        torch.tensor([2, 0, 0, 0]),
        torch.tensor([1.0, 0.6, 1.0, 1.0]),
        torch.tensor([0.0, 0.0, 0.35, 0.0]),
    )
    assert _kept(out[0]) == {3, 0}
    assert _kept(out[1]) == {4 - 3, 4 - 0}  # flipped row: nucleus of 0.6 = the two largest
    assert _kept(out[2]) == {3, 0}
    assert torch.equal(out[3], logits[3])  # a row with every filter off is unchanged
    assert _kept(out[3]) == set(range(5))


def test_filter_always_keeps_the_argmax():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    out = filter_logits(logits.clone(), torch.tensor([1, 0, 0, 1, 0, 0]), torch.tensor([1.0, 1e-6, 1.0, 0.1, 1.0, 1.0]),
                        torch.tensor([0.0, 0.0, 1.0, 0.9, 0.0, 0.0]))
    for r in range(6):
        assert torch.isfinite(out[r, logits[r].argmax()])
    assert _kept(out[0]) == {int(logits[0].argmax())}
    assert _kept(out[1]) == {int(logits[1].argmax())}


# -- penalties on a hand-made sequence ---------------------------------------------------------
def _seq(prompt, output, **params):
    return SimpleNamespace(params=SamplingParams(**params), token_ids=list(prompt) + list(output),
                           output_token_ids=list(output), grammar=None)


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5, -1.0, 3.0])
    apply_penalties(logits, _seq([0], [1, 1, 3], repetition_penalty=2.0))
    # seen (prompt + output): 0, 1, 3
    assert torch.allclose(logits, torch.tensor([1.0, -4.0, 1.0, 0.25, -1.0, 3.0]))


def test_repetition_penalty_below_one_encourages():
    logits = torch.tensor([2.0, -2.0, 1.0])
    apply_penalties(logits, _seq([0], [1], repetition_penalty=0.5))
    assert torch.allclose(logits, torch.tensor([4.0, -1.0, 1.0]))


def test_presence_and_frequency_penalties_follow_openai():
    # OpenAI: logit[j] -= count[j] * frequency + (count[j] > 0) * presence, counting generated tokens only
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5, -1.0, 3.0])
    apply_penalties(logits, _seq([0, 5], [1, 1, 3, 1], presence_penalty=0.5, frequency_penalty=0.25))
    expected = torch.tensor([2.0, -2.0 - 3 * 0.25 - 0.5, 1.0, 0.5 - 0.25 - 0.5, -1.0, 3.0])
    assert torch.allclose(logits, expected)


def test_negative_presence_penalty_and_no_output_is_a_no_op():
    logits = torch.tensor([1.0, 2.0, 3.0])
    apply_penalties(logits, _seq([0, 1, 2], [], presence_penalty=1.0, frequency_penalty=1.0))
    assert torch.equal(logits, torch.tensor([1.0, 2.0, 3.0]))
    apply_penalties(logits, _seq([0], [2], presence_penalty=-1.0))
    assert torch.equal(logits, torch.tensor([1.0, 2.0, 4.0]))


def test_sampler_applies_penalties_per_row_and_min_tokens_bans_stops():
    sampler = Sampler(eos_token_ids=(2,), seed=0, device=torch.device("cpu"))
    logits = torch.tensor([
        [0.0, 1.0, 5.0, 4.0, 3.0],  # EOS (2) is argmax, but min_tokens forbids it; so is stop id 3
        [0.0, 1.0, 5.0, 4.0, 3.0],  # same row, no constraint: argmax
        [0.0, 1.0, 5.0, 4.0, 3.0],  # token 2 already generated twice: 5 - 2*2 = 1 < 4
        [0.0, 1.0, 5.0, 4.0, 3.0],  # ignore_eos: EOS is not banned by min_tokens, stop ids are
    ])
    seqs = [
        _seq([0], [1], temperature=0, min_tokens=3, stop_token_ids=[3]),
        _seq([0], [1], temperature=0),
        _seq([0], [2, 2], temperature=0, frequency_penalty=2.0),
        _seq([0], [1], temperature=0, min_tokens=3, stop_token_ids=[3], ignore_eos=True),
    ]
    for s in seqs:
        s.generator = None
    tokens, lps = sampler(logits, seqs)
    assert tokens == [4, 2, 3, 2]
    assert lps == [None] * 4


# -- through the engine ---------------------------------------------------------------------------
def test_same_seed_same_tokens_across_calls_and_batches(llm):
    sp = SamplingParams(temperature=1.0, seed=1234, max_tokens=8, ignore_eos=True)
    solo = _ids(llm.generate(PROMPT, sp)[0])
    assert len(solo) == 8
    assert _ids(llm.generate(PROMPT, sp)[0]) == solo
    # batched with unseeded and differently seeded neighbours, in a different position
    outs = llm.generate(
        ["Once upon a time", PROMPT, "zzz", "A longer prompt with several more tokens than the others"],
        [SamplingParams(temperature=1.0, max_tokens=8), sp, SamplingParams(temperature=0.7, seed=5, max_tokens=3),
         SamplingParams(temperature=0, max_tokens=10)],
    )
    assert _ids(outs[1]) == solo
    # a different seed gives a different sample (8 draws from ~49k tokens)
    other = _ids(llm.generate(PROMPT, SamplingParams(temperature=1.0, seed=1235, max_tokens=8, ignore_eos=True))[0])
    assert other != solo


def test_unseeded_requests_vary(llm):
    sp = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True)
    assert _ids(llm.generate(PROMPT, sp)[0]) != _ids(llm.generate(PROMPT, sp)[0])


def test_n_samples_use_seeds_seed_plus_i(llm):
    out = llm.generate(PROMPT, SamplingParams(n=3, temperature=1.0, seed=77, max_tokens=6, ignore_eos=True))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    samples = [c.token_ids for c in out.outputs]
    assert len({tuple(s) for s in samples}) == 3
    for i in range(3):
        single = llm.generate(PROMPT, SamplingParams(temperature=1.0, seed=77 + i, max_tokens=6, ignore_eos=True))[0]
        assert _ids(single) == samples[i]


def test_greedy_ignores_seed_and_is_argmax(llm):
    outs = [
        llm.generate(PROMPT, SamplingParams(temperature=0, seed=s, max_tokens=10, logprobs=3, ignore_eos=True))[0]
        for s in (None, 1, 2)
    ]
    assert _ids(outs[0]) == _ids(outs[1]) == _ids(outs[2])
    for tok, lp in zip(_ids(outs[0]), outs[0].outputs[0].logprobs):
        top = top_logprobs(lp, 3)
        assert top[0][0] == tok and lp[tok].rank == 1  # the raw distribution's argmax
        assert lp[tok].logprob == pytest.approx(top[0][1])
        assert len(top) == 3 and top[0][1] >= top[1][1] >= top[2][1]
    c = outs[0].outputs[0]  # vLLM's cumulative_logprob: the sampled tokens' logprobs summed
    assert c.cumulative_logprob == pytest.approx(sum(lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)))


# -- the support of top-k / top-p / min-p, sampled many times --------------------------------
@pytest.fixture(scope="module")
def top20(llm):
    """The raw next-token distribution's top 20 (ids, probabilities) after PROMPT."""
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=1, logprobs=20))[0]
    top = top_logprobs(out.outputs[0].logprobs[0], 20)
    assert len(top) == 20
    ids = [t for t, _ in top]
    probs = [math.exp(lp) for _, lp in top]
    return ids, probs


def _sample64(llm, **kw):
    out = llm.generate(PROMPT, SamplingParams(n=64, max_tokens=1, temperature=1.0, logprobs=20, seed=99, **kw))[0]
    assert len(out.outputs) == 64
    return [c.token_ids[0] for c in out.outputs], out


def _widest_gap(probs, lo=2, hi=12):
    """k in [lo, hi) where probs[k-1] / probs[k] is largest: the cut that float noise cannot blur."""
    return max(range(lo, hi), key=lambda k: probs[k - 1] / probs[k])


def test_unfiltered_sampling_leaves_the_top_of_the_distribution(llm, top20):
    """Positive control: without a filter, 64 draws from this flat distribution land outside the top 5."""
    ids, _ = top20
    tokens, _ = _sample64(llm)
    assert any(t not in ids[:5] for t in tokens)


@pytest.mark.parametrize("k", [1, 5])
def test_top_k_support(llm, top20, k):
    ids, _ = top20
    tokens, out = _sample64(llm, top_k=k)
    assert set(tokens) <= set(ids[:k])
    if k > 1:
        assert len(set(tokens)) > 1
    # the reported logprobs are the raw model's, whatever the filter
    assert [t for t, _ in top_logprobs(out.outputs[5].logprobs[0], 20)] == ids


def test_top_p_support(llm, top20):
    ids, probs = top20
    cum = [sum(probs[: i + 1]) for i in range(20)]
    k = _widest_gap(probs)
    top_p = (cum[k - 2] + cum[k - 1]) / 2  # mass of the first k-1 < top_p <= mass of the first k
    tokens, _ = _sample64(llm, top_p=top_p)
    assert set(tokens) <= set(ids[:k])
    assert len(set(tokens)) > 1


def test_min_p_support(llm, top20):
    ids, probs = top20
    k = _widest_gap(probs)
    min_p = (probs[k - 1] + probs[k]) / 2 / probs[0]  # exactly the top k satisfy p >= min_p * p_max
    tokens, _ = _sample64(llm, min_p=min_p)
    for t in tokens:
        assert t in ids[:20]
        assert probs[ids.index(t)] >= min_p * probs[0]
    assert len(set(tokens)) > 1


def test_low_temperature_concentrates_on_the_argmax(llm, top20):
    ids, probs = top20
    assert math.log(probs[0] / probs[1]) / 1e-3 > 30  # the runner-up's weight is below e^-30
    out = llm.generate(PROMPT, SamplingParams(n=16, max_tokens=1, temperature=1e-3, seed=3))[0]
    assert {c.token_ids[0] for c in out.outputs} == {ids[0]}


# -- penalties through the engine (the runner's logits are inference tensors: edited in place) --
def test_presence_and_frequency_penalties_through_the_engine(llm):
    """Greedy with penalties picks argmax(raw logprob - penalties) at every step, computed here from the
    raw top-20 logprobs (a shift of logits is a shift of logprobs)."""
    pres, freq = 0.3, 0.2
    sp = SamplingParams(temperature=0, max_tokens=12, logprobs=20, ignore_eos=True,
                        presence_penalty=pres, frequency_penalty=freq)
    c = llm.generate(PROMPT, sp)[0].outputs[0]
    assert c.finish_reason == "length" and len(c.token_ids) == 12
    for i, (tok, lp) in enumerate(zip(c.token_ids, c.logprobs)):
        seen = c.token_ids[:i]
        scores = {t: v - freq * seen.count(t) - pres * (t in seen) for t, v in top_logprobs(lp, 20)}
        assert tok == max(scores, key=scores.get)
    plain = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0]
    assert plain.token_ids[0] == c.token_ids[0]  # nothing generated yet: no penalty on the first token


def test_repetition_penalty_and_min_tokens_run_through_the_engine(llm):
    for kw in (dict(repetition_penalty=1.3), dict(min_tokens=3), dict(frequency_penalty=1.0, temperature=0.8, seed=1)):
        c = llm.generate(PROMPT, SamplingParams(max_tokens=6, temperature=kw.pop("temperature", 0), **kw))[0].outputs[0]
        assert c.finish_reason in ("length", "stop") and c.token_ids, (kw, c)
        assert c.finish_reason != "error"
