"""What generation returns, with vLLM's names (`out.outputs[0].text`, `.token_ids`, `.finish_reason`).

Plain types only, low in the import graph (it imports nothing from the engine): engine/output.py
builds them from sequences; the engine, the server and users all import them from here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Logprob:
    """A token's logprob under the raw model distribution, and the top N at its position."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the top-N (token id, logprob) at this position


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" | None while running
    stop_reason: int | str | None = None
    logprobs: list[Logprob] | None = None


@dataclass
class RequestOutput:
    """`prompt_logprobs` (when the request asked for them) has vLLM's shape as far as our types allow:
    one entry per prompt token, the first None (no position precedes it). Where vLLM's entry is a
    dict token id -> Logprob(logprob, rank, decoded_token) holding the prompt token and the top N,
    ours is the same `Logprob(token_id, logprob, top)` that generated tokens get: the same numbers,
    without rank or decoded text."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[Logprob | None] | None = None
    num_cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache (vLLM's name)
