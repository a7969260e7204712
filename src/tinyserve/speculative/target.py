"""The seam between speculative decoding and the engine it drafts for: all it may know of it.

The engine builds a `Target` (its config's limits, its model, its runner, its sampler's distribution)
and hands speculation its sequences, which it reads and writes as `Drafted`. Speculation never sees
the engine itself: it imports the worker (to run a draft model) but nothing of engine/.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from tinyserve.config import EngineConfig, ModelConfig
from tinyserve.models.loader import ModelSource
from tinyserve.sampling import SamplingParams
from tinyserve.worker.runner import ModelRunner


class Drafted(Protocol):
    """What speculation reads of a target sequence (engine/sequence.py), and the drafts it sets: the
    tokens fed after its last token in the next step, and the draft's distribution over each."""

    token_ids: list[int]
    output_token_ids: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    spec_token_ids: list[int]
    spec_draft_probs: torch.Tensor | None  # [k, vocab]; None: point masses

    @property
    def num_tokens(self) -> int: ...

    @property
    def num_uncomputed(self) -> int: ...

    def max_output_tokens(self) -> int: ...


@dataclass(frozen=True)
class Target:
    config: EngineConfig  # the limits (sequences per step, block size, seed) and how to serve a draft
    source: ModelSource
    model_config: ModelConfig
    quantization: str  # the target's resolved weight mode
    max_len: int
    num_blocks: int  # the target's KV pool: a draft model's pool holds as many tokens
    runner: ModelRunner  # its decode step's price by rows is what drafting is weighed against
    probs: Callable[[torch.Tensor, Sequence[SamplingParams]], torch.Tensor]  # the sampler's distribution
