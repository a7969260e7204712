"""Per-request sampling parameters, with vLLM's field names so users and tools can switch.

Validation happens once, here, at construction: every error is a ValueError that names the field,
so the server can turn it into a 400 and the engine never sees a bad value.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

_GREEDY_EPS = 1e-5
_KINDS = ("json", "regex", "choice", "grammar", "json_object")
_MAX_SPEC_CHARS = 100_000  # a schema, regex or grammar longer than this is refused before it reaches a compiler


@dataclass
class StructuredOutputsParams:
    """What the output must match, as vLLM names it: exactly one of a JSON schema (`json`, a dict or its
    text), any JSON object (`json_object`), a regex, a choice of strings, or an EBNF grammar (XGrammar's
    GBNF dialect). Shape is checked here; whether the library can compile it, at compile time
    (tinyserve/structured/grammar.py), each error naming the field."""

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False  # JSON without free whitespace (vLLM's knob; small models ramble)
    # Literal text around a `json` value: how a tool call is framed (the model's own tags, structured/tool_formats.py).
    begin: str = ""
    end: str = ""

    def __post_init__(self) -> None:
        given = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError("structured_outputs must set exactly one of json, regex, choice, grammar, json_object"
                             f" (got {', '.join(given) or 'none'})")
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except ValueError as e:
                raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
        if self.json is not None and not isinstance(self.json, dict):
            raise ValueError("structured_outputs.json must be a JSON schema object")
        for name in ("regex", "grammar"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string")
        if self.choice is not None and (not isinstance(self.choice, list) or not self.choice
                                        or any(not isinstance(c, str) or not c for c in self.choice)):
            raise ValueError("structured_outputs.choice must be a non-empty list of non-empty strings")
        if (self.begin or self.end) and self.json is None:
            raise ValueError("structured_outputs.begin and .end frame a json schema; set json too")
        if len(self.key[1]) > _MAX_SPEC_CHARS:
            raise ValueError(f"structured_outputs.{self.kind} is longer than {_MAX_SPEC_CHARS} characters")

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))

    @property
    def key(self) -> tuple[str, str, bool, str, str]:
        """What identifies the compiled grammar: equal keys compile to the same thing (the compile cache)."""
        value = getattr(self, self.kind)
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        return self.kind, text, self.disable_any_whitespace, self.begin, self.end


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the model's context
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # top-N logprobs per generated token (the sampled one always included)
    prompt_logprobs: int | None = None  # top-N logprobs per prompt token (its own always included)
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None  # constrained decoding (tinyserve/structured/)
    # Normalized views, filled in __post_init__.
    stop_strings: tuple[str, ...] = field(init=False, default=())

    def __post_init__(self) -> None:
        def bad(name: str, msg: str) -> ValueError:
            return ValueError(f"{name} {msg}")

        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", f"must be an integer >= 1, got {self.n!r}")
        if self.temperature is None or self.temperature < 0:
            raise bad("temperature", f"must be >= 0, got {self.temperature!r}")
        if self.top_p is None or not (0.0 < self.top_p <= 1.0):
            raise bad("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if self.top_k is None or self.top_k < -1:
            raise bad("top_k", f"must be -1, 0 (disabled) or >= 1, got {self.top_k!r}")
        if self.top_k == -1:
            self.top_k = 0
        if self.min_p is None or not (0.0 <= self.min_p <= 1.0):
            raise bad("min_p", f"must be in [0, 1], got {self.min_p!r}")
        if self.repetition_penalty is None or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", f"must be > 0, got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if v is None or not (-2.0 <= v <= 2.0):
                raise bad(name, f"must be in [-2, 2], got {v!r}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise bad("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad("min_tokens", f"must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or not 0 <= v <= 20):
                raise bad(name, f"must be an integer in [0, 20], got {v!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed", f"must be an integer, got {self.seed!r}")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not isinstance(s, str) or s == "" for s in stops):
            raise bad("stop", "must be a non-empty string or a list of non-empty strings")
        self.stop_strings = tuple(stops)
        ids = list(self.stop_token_ids or [])
        if any(not isinstance(t, int) or t < 0 for t in ids):
            raise bad("stop_token_ids", "must be a list of non-negative integers")
        self.stop_token_ids = ids
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise bad("structured_outputs", "must be a StructuredOutputsParams")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS
