"""Speculative decoding: propose k tokens cheaply, verify them in one target forward, keep the
target's distribution exactly (verify.py, which the engine's sampler runs).

Proposers: `ngram` (prompt lookup, no model), `draft_model` (a smaller model with the target's
vocabulary, its own paged KV pool) and `self` (the target's own weights quantized, as a draft model).
`SpecDecoder` (decoder.py) is what the engine holds: it drafts for the running decodes before each
step, decides how many tokens each may draft (controller.py), and counts what was accepted. It knows
the engine only through `Target` (target.py). `SpeculativeConfig` lives with the other configs.
"""
