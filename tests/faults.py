"""Fault injection for the reliability tests, from outside the engine: `python tests/faults.py SERVE_ARGS`
runs `tinyserve serve` with the engine patched so that faults fire for marked prompts.

`TINYSERVE_HOLD_COMPILE=PATH` holds the background build of the compiled step until PATH exists (`hold_compile`).

`TINYSERVE_FAULTS="forward:BOOM,nan:NANME"`: a comma-separated list of `kind:marker`; a fault fires for
every sequence whose prompt text contains its marker, each time that sequence is stepped. Kinds:
  forward     the model forward raises (the whole batch it is in fails; the engine isolates it)
  sampler     the sampler raises
  nan         the sequence's logits are NaN
  detokenize  appending its new token (detokenizing it) raises
  fatal       the step raises EngineFatalError: the step loop dies, as on a lost device
The engine has no hook for this: these are plain patches of its methods, installed in this process only.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

import torch

from tinyserve.engine.llm_engine import LLMEngine
from tinyserve.engine.sampler import Sampler
from tinyserve.engine.sequence import Sequence
from tinyserve.errors import EngineFatalError
from tinyserve.worker.runner import ModelRunner

ENV = "TINYSERVE_FAULTS"
KINDS = ("forward", "sampler", "nan", "detokenize", "fatal")


class InjectedFault(RuntimeError):
    """What an injected fault raises."""


def install(spec: str) -> None:
    markers: dict[str, str] = {}
    for item in spec.split(","):
        kind, sep, marker = item.strip().partition(":")
        if kind not in KINDS or not sep or not marker:
            raise ValueError(f"{ENV}: {item!r} is not kind:marker with kind in {', '.join(KINDS)}")
        markers[kind] = marker
    decode = {}  # the engine's tokenizer, for prompts given as token ids

    def hits(kind: str, seqs: Iterable[Sequence]) -> list[int]:
        marker = markers.get(kind)
        return [] if marker is None else [i for i, s in enumerate(seqs)
                                          if marker in (s.prompt or decode["fn"](s.prompt_token_ids))]

    def patch(cls: type, name: str, make) -> None:
        setattr(cls, name, make(getattr(cls, name)))

    def init(orig):
        def wrapped(self, *args, **kwargs):
            orig(self, *args, **kwargs)
            decode["fn"] = self.tokenizer.decode
        return wrapped

    def run(orig):  # one attempt at a batch: fatal and forward faults raise before the forward
        def wrapped(self, batch):
            if hits("fatal", batch.seqs):
                raise EngineFatalError("injected fatal fault")
            if hits("forward", batch.seqs):
                raise InjectedFault("injected forward fault")
            return orig(self, batch)
        return wrapped

    def execute(orig):  # NaN in the logits rows of the targeted sequences
        def wrapped(self, seqs, num_tokens):
            out = orig(self, seqs, num_tokens)
            rows = [s for s in out.sampling for _ in range(1 + len(s.spec_token_ids))]
            if bad := hits("nan", rows):
                with torch.inference_mode():  # the runner's logits are inference tensors
                    out.logits[bad] = float("nan")
            return out
        return wrapped

    def sample(orig):
        def wrapped(self, logits, seqs, *args):
            if hits("sampler", seqs):
                raise InjectedFault("injected sampler fault")
            return orig(self, logits, seqs, *args)
        return wrapped

    def add_token(orig):
        def wrapped(self, seq, *args):
            if hits("detokenize", [seq]):
                raise InjectedFault("injected detokenize fault")
            return orig(self, seq, *args)
        return wrapped

    patch(LLMEngine, "__init__", init)
    patch(LLMEngine, "_run", run)
    patch(ModelRunner, "execute", execute)
    patch(Sampler, "sample", sample)
    patch(LLMEngine, "_add_token", add_token)


def hold_compile(release: str) -> None:
    """`TINYSERVE_HOLD_COMPILE=PATH`: the background build of the compiled step counts as unfinished until
    PATH exists, so a test can talk to a server whose compiled step is still building, then let it end."""
    from tinyserve.worker.compiled import BackgroundCompile

    done, ok = BackgroundCompile.done, BackgroundCompile.ok.fget
    BackgroundCompile.done = lambda self: os.path.exists(release) and done(self)
    BackgroundCompile.ok = property(lambda self: os.path.exists(release) and ok(self))


if __name__ == "__main__":
    if os.environ.get(ENV):
        install(os.environ[ENV])
    if os.environ.get("TINYSERVE_HOLD_COMPILE"):
        hold_compile(os.environ["TINYSERVE_HOLD_COMPILE"])
    from tinyserve.server import main

    sys.exit(main(sys.argv[1:]))
