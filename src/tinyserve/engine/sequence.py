"""One request's state: its tokens, how many of them are in the KV cache, and its lifecycle.

WAITING -> RUNNING -> (PREEMPTED -> WAITING -> RUNNING ...) -> FINISHED(reason)

The invariant the whole engine leans on: `token_ids[:num_computed]` have their K/V in the blocks of
`block_table`; the rest still have to be fed through the model. A decode step feeds exactly one
token (the last sampled one); a prefill chunk feeds several. Preemption frees the blocks: swapped
out first (the default), the sequence keeps num_computed and gets its K/V back on resume; recomputed,
num_computed = 0 and the prompt *and* the tokens generated so far are fed again.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tinyserve.kv.block_hash import BlockHash, extend_block_hashes
from tinyserve.outputs import Logprob
from tinyserve.sampling import SamplingParams
from tinyserve.structured.grammar import Matcher
from tinyserve.tokenizer import IncrementalDetokenizer


@dataclass(frozen=True)
class TokenLogprobs:
    """One position's logprobs as the sampler found them, under the raw model distribution: its token's
    (sampled, or the prompt's), that token's rank (1 = the most likely), and the top N."""

    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]  # (token id, logprob), most likely first

    def as_vllm(self, text: Callable[[int], str]) -> dict[int, Logprob]:
        """vLLM's entry: token id -> Logprob, the position's own token first, then the top N by rank."""
        entry = {self.token_id: Logprob(self.logprob, self.rank, text(self.token_id))}
        for rank, (t, lp) in enumerate(self.top, 1):
            entry.setdefault(t, Logprob(lp, rank, text(t)))
        return entry


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)  # identity semantics: two requests are never 'equal'
class Sequence:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    max_len: int  # prompt + output may not exceed this (the model context / KV capacity)
    arrival_time: float = field(default_factory=time.monotonic)
    index: int = 0  # which of the request's n samples this is
    priority: int = 0  # lower is served sooner under the priority policy (vLLM's convention)

    status: Status = Status.WAITING
    token_ids: list[int] = field(init=False)
    output_token_ids: list[int] = field(default_factory=list)
    output_text: str = ""
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)  # of prompt tokens 1, 2, ... scored so far
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # the stop string / token id that ended it
    generator: torch.Generator | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    error: str | None = None  # set when finish_reason == "error": what to tell the client
    num_preemptions: int = 0
    num_cached_tokens: int | None = None  # prompt tokens found in the prefix cache at first admission
    block_hashes: list[BlockHash] = field(default_factory=list)  # identities of the full blocks so far
    # Speculation (speculative/): the tokens drafted for this step, fed after the last sampled token and
    # verified by it; the draft's distribution over each ([k, vocab]; None: point masses). Empty
    # outside a step, and never part of token_ids until accepted.
    spec_token_ids: list[int] = field(default_factory=list)
    spec_draft_probs: torch.Tensor | None = None
    # Structured outputs: where this sequence stands in its grammar, advanced by every emitted token.
    grammar: Matcher | None = None

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.status = Status.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
        self.finish_time = time.monotonic()

    def visible_text(self) -> str:
        """Text safe to show now: while running, a tail that could be the start of a stop string is
        held back, so a stream never shows text that the stop string later cuts off."""
        stops = self.params.stop_strings
        if self.finished or not stops:
            return self.output_text
        hold = max(map(len, stops)) - 1
        return self.output_text[: max(0, len(self.output_text) - hold)]

    def prompt_positions_to_score(self, lo: int, hi: int) -> range:
        """Positions in [lo, hi) whose logits give a prompt logprob not yet recorded (none unless asked).

        Position p scores prompt token p + 1, so the last prompt position (it samples) never does; a
        prefix recomputed after preemption was scored the first time and is not scored again."""
        if self.params.prompt_logprobs is None:
            return range(0)
        return range(max(lo, len(self.prompt_logprobs)), min(hi, self.num_prompt_tokens - 1))

    def full_block_hashes(self, block_size: int, num_tokens: int) -> list[BlockHash]:
        """The prefix-cache identities of the full blocks among the first `num_tokens` tokens."""
        extend_block_hashes(self.block_hashes, self.token_ids, block_size, num_tokens)
        return self.block_hashes[: num_tokens // block_size]

    def max_output_tokens(self) -> int:
        room = self.max_len - self.num_prompt_tokens
        return room if self.params.max_tokens is None else min(room, self.params.max_tokens)
