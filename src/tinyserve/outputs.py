"""What generation returns, with vLLM's names and shapes (`out.outputs[0].text`, `.token_ids`,
`.finish_reason`, `.logprobs[i][token_id].logprob`), so code written for vLLM reads it unchanged.

Plain types only, low in the import graph (it imports nothing from the engine): engine/output.py
builds them from sequences; the engine, the server and users all import them from here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Logprob:
    """vLLM's: a token's logprob under the raw model distribution (before penalties and temperature), its
    rank there (1 = the most likely) and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# Per position, token id -> Logprob: the position's own token (sampled, or the prompt's) and the top N.
SampleLogprobs = list[dict[int, Logprob]]
PromptLogprobs = list[dict[int, Logprob] | None]  # the first prompt token has none (nothing precedes it)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" | None while running
    stop_reason: int | str | None = None
    logprobs: SampleLogprobs | None = None  # when asked for (SamplingParams.logprobs)
    cumulative_logprob: float | None = None  # the sum of the sampled tokens' logprobs, when they were asked for


@dataclass
class RequestOutput:

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: PromptLogprobs | None = None  # when asked for (SamplingParams.prompt_logprobs)
    num_cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache (vLLM's name)
