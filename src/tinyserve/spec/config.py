"""`speculative_config`: vLLM's names, validated once, every error naming its field."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

METHODS = ("ngram", "draft_model", "self")


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    prompt_lookup_max: int = 4  # ngram: longest suffix of the sequence searched for earlier in it
    prompt_lookup_min: int = 1  # ngram: shortest suffix that counts as a match
    model: str | None = None  # draft_model: HF directory, .gguf file or hub id (same vocabulary)
    quantization: str | None = None  # draft_model / self: the draft's weight mode (self: default int4, gguf for a GGUF)
    disable_by_batch_size: int | None = None  # vLLM's: no speculation while more sequences than this decode
    adaptive: bool = True  # per-sequence k from its measured acceptance; off when drafting cannot pay

    def __post_init__(self) -> None:
        def bad(name: str, msg: str) -> ValueError:
            return ValueError(f"speculative_config.{name} {msg}")

        if self.method not in METHODS:
            raise bad("method", f"must be one of {', '.join(METHODS)}; got {self.method!r}")
        k = self.num_speculative_tokens
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 16:
            raise bad("num_speculative_tokens", f"must be an integer in [1, 16], got {k!r}")
        for name in ("prompt_lookup_max", "prompt_lookup_min"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad(name, f"must be an integer >= 1, got {v!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise bad("prompt_lookup_min", f"({self.prompt_lookup_min}) must be <= prompt_lookup_max "
                                           f"({self.prompt_lookup_max})")
        if self.method == "draft_model" and not self.model:
            raise bad("model", "is required with method 'draft_model' (the draft's path or id)")
        if self.method == "ngram" and (self.model or self.quantization):
            raise bad("method", "'ngram' takes no model or quantization")
        if self.method == "self" and self.model:
            raise bad("model", "must not be set with method 'self' (the draft is the target's own weights)")
        b = self.disable_by_batch_size
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
            raise bad("disable_by_batch_size", f"must be an integer >= 1, got {b!r}")
        if not isinstance(self.adaptive, bool):
            raise bad("adaptive", f"must be true or false, got {self.adaptive!r}")

    @classmethod
    def parse(cls, value: str | dict[str, Any] | SpeculativeConfig | None) -> SpeculativeConfig | None:
        """From the JSON of `--speculative-config`, a dict (`LLM(speculative_config=...)`), or None.
        As in vLLM, a `model` without a `method` means a draft model."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a JSON object, got {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative_config: unknown field(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known))}")
        value = dict(value)
        if "method" not in value:
            if not value.get("model"):
                raise ValueError("speculative_config.method is required (ngram, draft_model or self)")
            value["method"] = "draft_model"
        if "num_speculative_tokens" not in value:
            raise ValueError("speculative_config.num_speculative_tokens is required")
        return cls(**value)
