"""What generation returns, with vLLM's names (`out.outputs[0].text`, `.token_ids`, `.finish_reason`)."""

from __future__ import annotations

from dataclasses import dataclass

from tinyserve.engine.sequence import Logprob, Sequence


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

    @classmethod
    def from_seqs(cls, request_id: str, seqs: list[Sequence]) -> "RequestOutput":
        first = seqs[0]
        return cls(
            request_id=request_id,
            prompt=first.prompt,
            prompt_token_ids=first.prompt_token_ids,
            outputs=[
                CompletionOutput(
                    index=s.index,
                    text=s.output_text,
                    token_ids=list(s.output_token_ids),
                    finish_reason=s.finish_reason,
                    stop_reason=s.stop_reason,
                    logprobs=list(s.logprobs) if s.params.logprobs is not None else None,
                )
                for s in seqs
            ],
            finished=all(s.finished for s in seqs),
            prompt_logprobs=seq_prompt_logprobs(first),
        )


def seq_prompt_logprobs(seq: Sequence) -> list[Logprob | None] | None:
    """A sequence's prompt logprobs scored so far, in `RequestOutput.prompt_logprobs`' shape; None unless asked."""
    return None if seq.params.prompt_logprobs is None else [None, *seq.prompt_logprobs]
