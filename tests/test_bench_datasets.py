"""Dataset samplers on the real packaged ShareGPT data, with a cheap word-level tokenizer stub."""

import re
import warnings

import pytest

from tinyserve_lab.datasets import (
    first_exchange,
    iter_json_array,
    load_sharegpt,
    sample_mixed,
    sample_multi_turn,
    sample_random,
    sample_shared_prefix,
    sample_sharegpt,
    sharegpt_path,
    uniform_lengths,
)


class WordTokenizer:
    """Token = whitespace-separated word; ids round-trip through words 'w<id>'. Specials: 0 and 1."""

    vocab_size = 1000
    all_special_ids = [0, 1]

    def encode(self, text: str) -> list[int]:
        return [int(w[1:]) if re.fullmatch(r"w\d+", w) else 2 for w in text.split()]

    def decode(self, ids: list[int]) -> str:
        return " ".join(f"w{i}" for i in ids)


class CharTokenizer:
    """Cheapest length stand-in for ShareGPT tests: about 4 characters per token."""

    def encode(self, text: str) -> list[int]:
        return [0] * (len(text) // 4)


TOK = WordTokenizer()
CHEAP = CharTokenizer()


def test_packaged_sharegpt_parses_despite_truncation():
    assert sharegpt_path().is_file()
    convs = load_sharegpt()
    assert 17_000 < len(convs) < 18_500  # ~17.6k complete conversations before the cut
    assert all(isinstance(turns, tuple) for _, turns in convs[:100])


def test_iter_json_array_stops_at_truncation():
    assert list(iter_json_array('[{"a": 1}, {"b": [2, 3]},\n {"c": "unfinis')) == [{"a": 1}, {"b": [2, 3]}]
    assert list(iter_json_array("[1, 2]")) == [1, 2]
    assert list(iter_json_array("[]")) == []


def test_first_exchange_skips_leading_gpt_turn():
    assert first_exchange([("gpt", "x"), ("human", "q"), ("gpt", "a"), ("human", "q2")]) == ("q", "a")
    assert first_exchange([("human", "q"), ("human", "q2")]) is None


def test_sharegpt_sampling_respects_filters_and_lengths():
    reqs = sample_sharegpt(CHEAP, 300, seed=0)
    assert len(reqs) == 300
    for r in reqs:
        assert 4 <= r.prompt_len <= 1024 and r.expected_output_len >= 4
        assert r.prompt_len + r.expected_output_len <= 2048
        assert r.prompt_len == len(CHEAP.encode(r.prompt))
        assert r.messages == [{"role": "user", "content": r.prompt}]
    tight = sample_sharegpt(CHEAP, 200, seed=1, min_len=8, max_prompt_len=64, max_total_len=128)
    assert len(tight) == 200
    for r in tight:
        assert 8 <= r.prompt_len <= 64 and r.expected_output_len >= 8
        assert r.prompt_len + r.expected_output_len <= 128
    fixed = sample_sharegpt(CHEAP, 50, seed=0, fixed_output_len=7)
    assert {r.expected_output_len for r in fixed} == {7}


def test_sharegpt_sampling_is_seeded():
    a = [r.prompt for r in sample_sharegpt(CHEAP, 50, seed=3)]
    assert a == [r.prompt for r in sample_sharegpt(CHEAP, 50, seed=3)]
    assert a != [r.prompt for r in sample_sharegpt(CHEAP, 50, seed=4)]


def test_sharegpt_large_pool_and_shortfall_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        everything = sample_sharegpt(CHEAP, 10**6, seed=0)
    assert len(everything) > 10_000  # most of the ~17.6k first exchanges pass the default filters
    assert any("only" in str(w.message) for w in caught)


def test_multi_turn_conversations():
    convs = sample_multi_turn(CHEAP, 20, seed=0, min_turns=2, max_turns=3, max_total_len=1500)
    assert len(convs) == 20
    assert len({c.id for c in convs}) == 20
    for c in convs:
        assert 2 <= len(c.turns) <= 3
        total = sum(len(CHEAP.encode(t.user)) + t.expected_output_len for t in c.turns)
        assert total <= 1500
        assert all(t.expected_output_len == len(CHEAP.encode(t.reference_reply)) for t in c.turns)
    again = sample_multi_turn(CHEAP, 20, seed=0, max_turns=3, max_total_len=1500)
    assert [c.id for c in again] == [c.id for c in convs]


def test_uniform_lengths_bounds():
    import numpy as np

    lens = uniform_lengths(np.random.default_rng(0), 100, 0.25, 2000)
    assert lens.min() == 75 and lens.max() == 125
    assert set(uniform_lengths(np.random.default_rng(0), 10, 0.0, 5)) == {10}
    with pytest.raises(ValueError):
        uniform_lengths(np.random.default_rng(0), 10, 1.0, 5)


def test_random_dataset_shape_and_seed():
    reqs = sample_random(TOK, 40, input_len=64, output_len=16, range_ratio=0.5, seed=0)
    assert len(reqs) == 40
    assert all(32 <= r.prompt_len <= 96 and 8 <= r.expected_output_len <= 24 for r in reqs)
    assert all(r.prompt_len == len(TOK.encode(r.prompt)) for r in reqs)
    words = {w for r in reqs for w in r.prompt.split()}
    assert "w0" not in words and "w1" not in words  # special ids never sampled
    assert len({r.prompt_len for r in reqs}) > 5
    assert [r.prompt for r in sample_random(TOK, 40, 64, 16, 0.5, seed=0)] == [r.prompt for r in reqs]
    assert [r.prompt for r in sample_random(TOK, 40, 64, 16, 0.5, seed=1)] != [r.prompt for r in reqs]


def test_shared_prefix_dataset():
    reqs = sample_shared_prefix(TOK, 10, prefix_len=200, question_len=8, output_len=5, seed=0)
    prefix = reqs[0].messages[0]["content"]
    assert len(TOK.encode(prefix)) == 200
    assert all(r.prompt.startswith(prefix + "\n\n") and r.messages[0]["content"] == prefix for r in reqs)
    questions = [r.messages[1]["content"] for r in reqs]
    assert len(set(questions)) == 10
    assert all(r.prompt_len == 208 and r.expected_output_len == 5 for r in reqs)
    two = sample_shared_prefix(TOK, 6, prefix_len=50, question_len=4, num_prefixes=2, seed=0)
    prefixes = [r.messages[0]["content"] for r in two]
    assert prefixes[0::2] == [prefixes[0]] * 3 and prefixes[1::2] == [prefixes[1]] * 3
    assert prefixes[0] != prefixes[1]


def test_mixed_dataset_has_its_share_of_long_documents():
    reqs = sample_mixed(TOK, 40, long_fraction=0.25, long_len=300, short_len=20, output_len=7, seed=0)
    lens = [r.prompt_len for r in reqs]
    assert sum(n >= 150 for n in lens) == 10 and all(10 <= n <= 30 or 150 <= n <= 450 for n in lens)
    assert [n >= 150 for n in lens] != [True] * 10 + [False] * 30  # shuffled, not grouped
    assert all(r.expected_output_len == 7 for r in reqs)
    assert [r.prompt for r in sample_mixed(TOK, 40, 0.25, 300, 20, 7, seed=0)] == [r.prompt for r in reqs]
    with pytest.raises(ValueError, match="long_fraction"):
        sample_mixed(TOK, 4, 1.5, 300, 20)
