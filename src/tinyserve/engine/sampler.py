"""Batched sampling: penalties -> (greedy | temperature -> top-k/top-p/min-p -> draw) -> logprobs.

Rows that need nothing special take the cheap path: greedy rows are one argmax; the sort that
top-k/top-p require runs only on the rows that asked for them. Draws use the exponential race
(argmax p_i / E_i with E_i ~ Exp(1)), which samples from p exactly and lets each seeded request
draw from its own torch.Generator, so its tokens do not depend on its batch neighbours.
Logprobs, like vLLM's default, are those of the raw model distribution (before penalties and
temperature), for sampled tokens and, when asked, for prompt tokens alike.
A sequence with a grammar (structured outputs) has its rows masked to the tokens the grammar allows
after penalties, before any choice: greedy, sampled and speculative rows alike (a draft the grammar
forbids has probability 0, so verification rejects it).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence as Sequence_

import torch

from tinyserve.engine.sequence import Sequence, TokenLogprobs
from tinyserve.sampling import SamplingParams
from tinyserve.speculative.verify import accept_greedy, accept_sampled
from tinyserve.structured.grammar import Grammars


def apply_penalties(logits: torch.Tensor, seq: Sequence, extra: Sequence_[int] = ()) -> None:
    """In place on one row: repetition (prompt + output, HF/vLLM style), presence and frequency (output).
    `extra`: tokens taken as already output (the drafts before a speculative row)."""
    p = seq.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor([*seq.token_ids, *extra], device=logits.device).unique()
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    output = [*seq.output_token_ids, *extra]
    if (p.presence_penalty or p.frequency_penalty) and output:
        counts = torch.bincount(torch.tensor(output, device=logits.device), minlength=logits.shape[0])
        logits -= p.frequency_penalty * counts[: logits.shape[0]] + p.presence_penalty * (counts[: logits.shape[0]] > 0)


def token_logprobs(logprobs: torch.Tensor, tokens: list[int], top_ns: list[int]) -> list[TokenLogprobs]:
    """Row i of a log-softmaxed [R, vocab] tensor: tokens[i]'s value and rank, and the top top_ns[i].
    One gather, one comparison and one topk for all rows: prompt scoring asks for hundreds at once.
    A token's rank counts the tokens at least as likely as it, itself included (vLLM's)."""
    picked = logprobs.gather(-1, torch.tensor(tokens, device=logprobs.device)[:, None])
    ranks = (logprobs >= picked).sum(-1).tolist()
    vals, ids = (t.tolist() for t in logprobs.topk(max(top_ns), -1))
    return [TokenLogprobs(tok, lp, rank, list(zip(ids[i][:n], vals[i][:n])))
            for i, (tok, lp, rank, n) in enumerate(zip(tokens, picked[:, 0].tolist(), ranks, top_ns))]


def prompt_logprobs(logits: torch.Tensor, spans: list[tuple[Sequence, range]]) -> list[list[TokenLogprobs]]:
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
    def __init__(self, eos_token_ids: tuple[int, ...], seed: int, device: torch.device,
                 grammars: Grammars | None = None) -> None:
        self.eos_token_ids = list(eos_token_ids)
        self.generator = torch.Generator(device=device).manual_seed(seed)  # for unseeded requests
        self.grammars = grammars

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[TokenLogprobs | None]]:
        """One token per row (row i is seqs[i]'s next position)."""
        tokens, lps = self.sample(logits, seqs, [[] for _ in seqs], [None] * len(seqs))
        return [t[0] for t in tokens], [lp[0] for lp in lps]

    # The runner's logits are inference tensors; penalties and bans edit them in place, which torch
    # allows only inside inference mode.
    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, seqs: list[Sequence], drafts: list[list[int]],
               draft_probs: list[torch.Tensor | None]) -> tuple[list[list[int]], list[list[TokenLogprobs | None]]]:
        """The tokens each sequence emits this step. Sequence i owns 1 + len(drafts[i]) consecutive
        rows: its next position, then one per draft (verified by speculative/verify.py; `draft_probs[i]` is
        the draft's distribution per draft, None for a point mass). A plain sequence emits one token,
        a speculating one its accepted drafts plus one. Each row is processed as if the drafts before
        it had been output (penalties, min_tokens), so speculation changes no distribution."""
        rows = [(i, d[:j]) for i, d in enumerate(drafts) for j in range(len(d) + 1)]  # (seq, drafts before)
        want_lp = [r for r, (i, _) in enumerate(rows) if seqs[i].params.logprobs is not None]
        raw_logprobs = logits[want_lp].log_softmax(-1) if want_lp else None  # a copy: before the edits below
        for r, (i, before) in enumerate(rows):
            p = seqs[i].params
            if p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
                apply_penalties(logits[r], seqs[i], before)
            # Too early to end: ban stopping (a grammar decides for itself when its output is complete).
            if seqs[i].grammar is None and len(seqs[i].output_token_ids) + len(before) < p.min_tokens:
                assert p.stop_token_ids is not None  # a list after SamplingParams.__post_init__
                banned = p.stop_token_ids + ([] if p.ignore_eos else self.eos_token_ids)
                logits[r, banned] = float("-inf")
        if any(seq.grammar is not None for seq in seqs):
            self._mask(logits, seqs, drafts)
        argmax = logits.argmax(-1).tolist()
        rand = [r for r, (i, _) in enumerate(rows) if not seqs[i].params.greedy]
        probs = self.probs(logits[rand], [seqs[rows[r][0]].params for r in rand]) if rand else logits[:0]
        at = {r: j for j, r in enumerate(rand)}  # a random row's index in `probs`

        tokens: list[list[int]] = []
        first = 0  # the sequence's first row
        for i, seq in enumerate(seqs):
            d = drafts[i]
            if seq.params.greedy:
                tokens.append(accept_greedy(argmax[first : first + len(d) + 1], d))
            elif d:
                p_rows = probs[[at[r] for r in range(first, first + len(d) + 1)]]
                tokens.append(accept_sampled(p_rows, draft_probs[i], d, seq.generator or self.generator))
            else:
                tokens.append([])  # drawn below, all plain rows at once
            first += len(d) + 1
        plain = [r for r in rand if not drafts[rows[r][0]]]
        if plain:
            plain_probs = probs if len(plain) == len(rand) else probs[[at[r] for r in plain]]  # no copy without drafts
            for r, tok in zip(plain, self._race(plain_probs, [seqs[rows[r][0]] for r in plain]).tolist()):
                tokens[rows[r][0]] = [tok]
        return tokens, self._logprobs(raw_logprobs, want_lp, rows, seqs, tokens)

    def _mask(self, logits: torch.Tensor, seqs: list[Sequence], drafts: list[list[int]]) -> None:
        """Each constrained sequence's rows to what its grammar allows there: row j is the state after
        drafts[:j], reached by walking the drafts and rolling back. Rows past a draft the grammar refuses
        stay unmasked: verification stops at that draft, so they emit nothing."""
        assert self.grammars is not None  # a sequence has a grammar only where the engine has Grammars
        t0 = time.perf_counter()
        bitmask = self.grammars.new_bitmask(logits.shape[0])
        targets: list[int] = []
        first = 0
        for seq, d in zip(seqs, drafts):
            m = seq.grammar
            if m is not None:
                m.fill(bitmask, first)
                targets.append(first)
                walked = 0
                while walked < len(d) and m.accept(d[walked]):
                    walked += 1
                    m.fill(bitmask, first + walked)
                    targets.append(first + walked)
                m.rollback(walked)
            first += len(d) + 1
        self.grammars.apply(logits, targets, bitmask)
        self.grammars.mask_seconds += time.perf_counter() - t0

    def _logprobs(self, raw: torch.Tensor | None, want_lp: list[int], rows: list[tuple[int, list[int]]],
                  seqs: list[Sequence], tokens: list[list[int]]) -> list[list[TokenLogprobs | None]]:
        """Each emitted token's Logprob from its row's raw distribution (emitted token j sits at row j)."""
        lps: list[list[TokenLogprobs | None]] = [[None] * len(t) for t in tokens]
        if raw is None:
            return lps
        picked = [(n, r, rows[r][0], len(rows[r][1])) for n, r in enumerate(want_lp)
                  if len(rows[r][1]) < len(tokens[rows[r][0]])]  # rows past the first rejection emit nothing
        found = token_logprobs(raw[[n for n, *_ in picked]], [tokens[i][j] for _, _, i, j in picked],
                               [seqs[i].params.logprobs or 0 for _, _, i, _ in picked])
        for (_, _, i, j), lp in zip(picked, found):
            lps[i][j] = lp
        return lps

    def probs(self, logits: torch.Tensor, params: Sequence_[SamplingParams]) -> torch.Tensor:
        """The distribution each row samples from: temperature, then top-k / top-p / min-p."""
        dev = logits.device
        temp = torch.tensor([p.temperature for p in params], device=dev)
        logits = filter_logits(
            logits / temp[:, None],
            torch.tensor([p.top_k for p in params], device=dev),
            torch.tensor([p.top_p for p in params], device=dev),
            torch.tensor([p.min_p for p in params], device=dev),
        )
        return logits.softmax(-1)

    def _race(self, probs: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        noise = torch.empty_like(probs)
        for i, seq in enumerate(seqs):
            noise[i].exponential_(generator=seq.generator or self.generator)
        return (probs / noise).argmax(-1)
