"""Batched sampling: penalties -> (greedy | temperature -> top-k/top-p/min-p -> draw) -> logprobs.

Rows that need nothing special take the cheap path: greedy rows are one argmax; the sort that
top-k/top-p require runs only on the rows that asked for them. Draws use the exponential race
(argmax p_i / E_i with E_i ~ Exp(1)), which samples from p exactly and lets each seeded request
draw from its own torch.Generator, so its tokens do not depend on its batch neighbours.
Logprobs, like vLLM's default, are those of the raw model distribution (before penalties and
temperature), for sampled tokens and, when asked, for prompt tokens alike.
"""

from __future__ import annotations

import itertools

import torch

from tinyserve.engine.sequence import Sequence
from tinyserve.outputs import Logprob


def apply_penalties(logits: torch.Tensor, seq: Sequence) -> None:
    """In place on one row: repetition (prompt + output, HF/vLLM style), presence and frequency (output)."""
    p = seq.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(seq.token_ids, device=logits.device).unique()
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and seq.output_token_ids:
        counts = torch.bincount(torch.tensor(seq.output_token_ids, device=logits.device), minlength=logits.shape[0])
        logits -= p.frequency_penalty * counts[: logits.shape[0]] + p.presence_penalty * (counts[: logits.shape[0]] > 0)


def token_logprobs(logprobs: torch.Tensor, tokens: list[int], top_ns: list[int]) -> list[Logprob]:
    """Row i of a log-softmaxed [R, vocab] tensor as a Logprob: tokens[i]'s value and the top top_ns[i].
    One gather and one topk for all rows: prompt scoring asks for hundreds at once."""
    picked = logprobs.gather(-1, torch.tensor(tokens, device=logprobs.device)[:, None])[:, 0].tolist()
    vals, ids = (t.tolist() for t in logprobs.topk(max(top_ns), -1))
    return [Logprob(tok, lp, list(zip(ids[i][:n], vals[i][:n])))
            for i, (tok, lp, n) in enumerate(zip(tokens, picked, top_ns))]


def prompt_logprobs(logits: torch.Tensor, spans: list[tuple[Sequence, range]]) -> list[list[Logprob]]:
    """Per span, the Logprobs of the prompt tokens its positions score (position p scores token p + 1)."""
    if not spans:
        return []
    targets = [seq.prompt_token_ids[p + 1] for seq, pos in spans for p in pos]
    top_ns = [seq.params.prompt_logprobs or 0 for seq, pos in spans for _ in pos]
    flat = iter(token_logprobs(logits.log_softmax(-1), targets, top_ns))
    return [list(itertools.islice(flat, len(pos))) for _, pos in spans]


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) what top-k / top-p / min-p exclude; rows are independent. top_k 0 = off."""
    if bool((min_p > 0).any()):
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p[:, None] * probs.max(-1, keepdim=True).values, float("-inf"))
    if bool((top_k > 0).any()) or bool((top_p < 1).any()):
        sorted_logits, order = logits.sort(-1, descending=True)
        rank = torch.arange(logits.shape[-1], device=logits.device)[None, :]
        k = torch.where(top_k > 0, top_k, logits.shape[-1])
        drop = rank >= k[:, None]
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop |= ((probs.cumsum(-1) - probs) >= top_p[:, None]) & (top_p[:, None] < 1)
        kept = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, kept)
    return logits


class Sampler:
    def __init__(self, eos_token_ids: tuple[int, ...], seed: int, device: torch.device) -> None:
        self.eos_token_ids = list(eos_token_ids)
        self.generator = torch.Generator(device=device).manual_seed(seed)  # for unseeded requests

    # The runner's logits are inference tensors; penalties and bans edit them in place, which torch
    # allows only inside inference mode.
    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[Logprob | None]]:
        want_lp = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        raw_logprobs = logits[want_lp].log_softmax(-1) if want_lp else None  # a copy: before the edits below
        for i, seq in enumerate(seqs):
            p = seq.params
            if p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
                apply_penalties(logits[i], seq)
            if len(seq.output_token_ids) < p.min_tokens:  # too early to end: ban every way of stopping
                assert p.stop_token_ids is not None  # a list after SamplingParams.__post_init__
                banned = p.stop_token_ids + ([] if p.ignore_eos else self.eos_token_ids)
                logits[i, banned] = float("-inf")
        tokens = logits.argmax(-1)
        rand = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if rand:
            tokens[rand] = self._draw(logits[rand], [seqs[i] for i in rand])
        token_list = tokens.tolist()
        lps: list[Logprob | None] = [None] * len(seqs)
        if raw_logprobs is not None:
            rows = token_logprobs(raw_logprobs, [token_list[i] for i in want_lp],
                                  [seqs[i].params.logprobs or 0 for i in want_lp])
            for i, lp in zip(want_lp, rows):
                lps[i] = lp
        return token_list, lps

    def _draw(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        dev = logits.device
        temp = torch.tensor([s.params.temperature for s in seqs], device=dev)
        logits = filter_logits(
            logits / temp[:, None],
            torch.tensor([s.params.top_k for s in seqs], device=dev),
            torch.tensor([s.params.top_p for s in seqs], device=dev),
            torch.tensor([s.params.min_p for s in seqs], device=dev),
        )
        probs = logits.softmax(-1)
        noise = torch.empty_like(probs)
        for i, seq in enumerate(seqs):
            noise[i].exponential_(generator=seq.generator or self.generator)
        return (probs / noise).argmax(-1)
