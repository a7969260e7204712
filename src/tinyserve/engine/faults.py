"""Test-only fault injection, and the one engine error that is meant to be fatal.

Off unless $TINYSERVE_FAULTS is set when the engine is built, e.g.
`TINYSERVE_FAULTS="forward:BOOM,nan:NANME"`: a comma-separated list of `kind:marker`; a fault fires
for every sequence whose prompt text contains its marker, each time that sequence is stepped. Kinds:
  forward     the model forward raises (the whole batch it is in fails; the engine isolates it)
  sampler     the sampler raises
  nan         the sequence's logits are NaN
  detokenize  turning its new token into text raises
  fatal       the step raises EngineFatalError: the step loop dies, as on a lost device
The tests use it to prove that a failing request fails alone; nothing else reads it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from tinyserve.engine.sequence import Sequence

FAULTS_ENV = "TINYSERVE_FAULTS"
KINDS = ("forward", "sampler", "nan", "detokenize", "fatal")


class EngineFatalError(RuntimeError):
    """The engine cannot go on (a lost device, a corrupted pool): the step loop stops instead of
    failing requests one by one forever, so that a supervisor restarts the process."""


class InjectedFault(RuntimeError):
    """What an injected fault raises."""


@dataclass(frozen=True)
class FaultInjector:
    markers: dict[str, str]  # kind -> marker
    decode: Callable[[list[int]], str]  # prompt token ids -> text, for prompts given as ids

    @classmethod
    def from_env(cls, decode: Callable[[list[int]], str]) -> FaultInjector | None:
        spec = os.environ.get(FAULTS_ENV, "").strip()
        if not spec:
            return None
        markers = {}
        for item in spec.split(","):
            kind, sep, marker = item.strip().partition(":")
            if kind not in KINDS or not sep or not marker:
                raise ValueError(f"{FAULTS_ENV}: {item!r} is not kind:marker with kind in {', '.join(KINDS)}")
            markers[kind] = marker
        return cls(markers, decode)

    def hits(self, kind: str, seqs: Iterable[Sequence]) -> list[int]:
        """Indices of the sequences the fault `kind` targets."""
        marker = self.markers.get(kind)
        if marker is None:
            return []
        return [i for i, s in enumerate(seqs) if marker in (s.prompt or self.decode(s.prompt_token_ids))]

    def maybe_raise(self, kind: str, seqs: Iterable[Sequence]) -> None:
        if self.hits(kind, seqs):
            error = EngineFatalError if kind == "fatal" else InjectedFault
            raise error(f"injected {kind} fault")

    def poison(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """NaN in the logits rows of the targeted sequences (rows are in `seqs`' order)."""
        rows = self.hits("nan", seqs)
        if rows:
            with torch.inference_mode():  # the runner's logits are inference tensors
                logits[rows] = float("nan")
