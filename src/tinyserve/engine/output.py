"""Sequences -> what callers see: a whole `RequestOutput` (offline) or, for a stream, each sequence's
`SeqDelta` of what is new since its last report.

Both views read a `Sequence` the same way (visible text, token ids, logprobs, prompt logprobs, finish)
in one place, so an offline result and a concatenated stream cannot drift apart. Everything here runs
on whichever thread owns the engine; what it returns is detached from the sequences it was built from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from tinyserve.engine.sequence import Sequence, TokenLogprobs
from tinyserve.outputs import CompletionOutput, RequestOutput


@dataclass(frozen=True)
class SeqDelta:
    """What one of a request's n sequences produced since the last update."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" once finished
    stop_reason: int | str | None = None
    error: str | None = None
    # When asked for: the prompt's logprobs, one per prompt token (the first None), once, with the first
    # token (the prompt is fully scored by the step that samples it).
    prompt_logprobs: list[TokenLogprobs | None] | None = None


def prompt_logprobs(seq: Sequence) -> list[TokenLogprobs | None] | None:
    """A sequence's prompt logprobs scored so far, the first prompt token's None; None unless asked."""
    return None if seq.params.prompt_logprobs is None else [None, *seq.prompt_logprobs]


def request_output(request_id: str, seqs: list[Sequence], text: Callable[[int], str]) -> RequestOutput:
    """The request's n sequences as one `RequestOutput` (its prompt logprobs are the first sample's), the
    logprobs in vLLM's shape (`text` decodes each token they name)."""
    first = seqs[0]
    scored = prompt_logprobs(first)
    return RequestOutput(
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
                logprobs=[lp.as_vllm(text) for lp in s.logprobs] if s.params.logprobs is not None else None,
                cumulative_logprob=sum(lp.logprob for lp in s.logprobs) if s.params.logprobs is not None else None,
            )
            for s in seqs
        ],
        finished=all(s.finished for s in seqs),
        prompt_logprobs=None if scored is None else [None if lp is None else lp.as_vllm(text) for lp in scored],
        num_cached_tokens=first.num_cached_tokens or 0,
    )


@dataclass
class DeltaTracker:
    """What each of one request's sequences has already reported, so each delta carries only the new."""

    sent_text: dict[int, int] = field(default_factory=dict)
    sent_tokens: dict[int, int] = field(default_factory=dict)
    sent_lps: dict[int, int] = field(default_factory=dict)
    reported_finish: set[int] = field(default_factory=set)

    def deltas(self, seqs: list[Sequence]) -> list[SeqDelta]:
        return [d for s in seqs if (d := self.delta(s)) is not None]

    def delta(self, seq: Sequence) -> SeqDelta | None:
        """What `seq` has that it has not reported (text held back for a stop string stays back); None
        if nothing, and the finish is reported once."""
        i = seq.index
        text = seq.visible_text()
        t0, k0, l0 = self.sent_text.get(i, 0), self.sent_tokens.get(i, 0), self.sent_lps.get(i, 0)
        finish = seq.finished and i not in self.reported_finish
        if len(text) <= t0 and len(seq.output_token_ids) <= k0 and not finish:
            return None
        self.sent_text[i], self.sent_tokens[i] = len(text), len(seq.output_token_ids)
        self.sent_lps[i] = len(seq.logprobs)
        if finish:
            self.reported_finish.add(i)
        return SeqDelta(
            index=i,
            text=text[t0:],
            token_ids=list(seq.output_token_ids[k0:]),
            logprobs=list(seq.logprobs[l0:]),
            finish_reason=seq.finish_reason if finish else None,
            stop_reason=seq.stop_reason if finish else None,
            error=seq.error if finish else None,
            prompt_logprobs=prompt_logprobs(seq) if k0 == 0 and seq.output_token_ids else None,
        )
