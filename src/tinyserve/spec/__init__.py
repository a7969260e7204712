"""Speculative decoding: propose k tokens cheaply, verify them in one target forward, keep the
target's distribution exactly (spec/verify.py).

Proposers: `ngram` (prompt lookup, no model), `draft_model` (a smaller model with the target's
vocabulary, its own paged KV pool) and `self` (the target's own weights quantized, as a draft model).
`SpecDecoder` (spec/decoder.py) is what the engine holds: it drafts for the running decodes before
each step, decides how many tokens each may draft (spec/controller.py), and counts what was accepted.
"""

from .config import SpeculativeConfig

__all__ = ["SpeculativeConfig"]
