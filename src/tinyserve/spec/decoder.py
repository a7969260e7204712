"""The engine's speculative decoder: before each step, drafts for the running decodes; after it,
counts what verification accepted (the verification itself is the sampler's, spec/verify.py)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from tinyserve.engine.sequence import Sequence
from tinyserve.spec.config import SpeculativeConfig
from tinyserve.spec.controller import DraftLength
from tinyserve.spec.ngram import propose_ngram

if TYPE_CHECKING:
    from tinyserve.engine.llm_engine import LLMEngine

log = logging.getLogger(__name__)


class Proposer(Protocol):
    def propose(self, seqs: list[Sequence], ks: list[int]) -> None:
        """Set each seqs[i].spec_token_ids to at most ks[i] drafts (and spec_draft_probs)."""

    def forget(self, live: set[Sequence]) -> None:
        """Drop whatever is kept for sequences no longer alive."""


class NgramProposer:
    def __init__(self, cfg: SpeculativeConfig) -> None:
        self.n_max, self.n_min = cfg.prompt_lookup_max, cfg.prompt_lookup_min

    def propose(self, seqs: list[Sequence], ks: list[int]) -> None:
        for seq, k in zip(seqs, ks):
            seq.spec_token_ids = propose_ngram(seq.token_ids, k, self.n_max, self.n_min)

    def forget(self, live: set[Sequence]) -> None:
        pass


@dataclass
class SpecStats:
    """vLLM's counters: verification rounds with drafts, tokens drafted, drafts accepted (and by position)."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_by_position: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verification round: the accepted drafts plus the target's own token."""
        return 1 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0


class SpecDecoder:
    def __init__(self, cfg: SpeculativeConfig, proposer: Proposer) -> None:
        self.cfg = cfg
        self.proposer = proposer
        self.length = DraftLength(cfg.num_speculative_tokens, cfg.adaptive)
        self.stats = SpecStats(accepted_by_position=[0] * cfg.num_speculative_tokens)
        self._drafting_ended: float | None = None  # when the last drafting ended: the target's step follows
        self._step_seconds: float | None = None  # the target's step, measured between draftings

    @classmethod
    def build(cls, cfg: SpeculativeConfig, engine: LLMEngine) -> SpecDecoder:
        if cfg.method == "ngram":
            return cls(cfg, NgramProposer(cfg))
        from tinyserve.spec.draft import DraftModelProposer

        return cls(cfg, DraftModelProposer(cfg, engine))

    def propose(self, running: list[Sequence]) -> None:
        """Drafts for the running decodes that may speculate now (each has room for k + 1 more tokens)."""
        start = time.perf_counter()
        if self._drafting_ended is not None and start - self._drafting_ended < 1.0:  # steps back to back
            gap = start - self._drafting_ended
            self._step_seconds = gap if self._step_seconds is None else 0.8 * self._step_seconds + 0.2 * gap
        decodes = [s for s in running if s.num_uncomputed == 1]
        if self.cfg.disable_by_batch_size is not None and len(decodes) > self.cfg.disable_by_batch_size:
            self._drafting_ended = None
            return
        seqs, ks = [], []
        for seq in decodes:
            room = seq.max_output_tokens() - len(seq.output_token_ids) - 1  # a round emits up to k + 1
            k = min(self.length.k_for(seq), room)
            if k > 0:
                seqs.append(seq)
                ks.append(k)
        if seqs:
            self.proposer.propose(seqs, ks)
        ended = time.perf_counter()
        if seqs and self._step_seconds and self.cfg.method != "ngram":
            per_token = (ended - start) / max(ks)  # one draft forward per drafted position
            self.length.draft_cost = 0.8 * self.length.draft_cost + 0.2 * per_token / self._step_seconds
        self._drafting_ended = ended

    def forget(self, live: set[Sequence]) -> None:
        """Drop the state of every sequence not in `live` (finished, aborted, failed): the engine calls
        this after each step, so a finished sequence's draft K/V goes back at once."""
        self.length.forget(live)
        self.proposer.forget(live)

    def record(self, seq: Sequence, drafted: int, accepted: int) -> None:
        s = self.stats
        s.num_drafts += 1
        s.num_draft_tokens += drafted
        s.num_accepted_tokens += accepted
        for i in range(accepted):
            s.accepted_by_position[i] += 1
        self.length.update(seq, drafted, accepted)
