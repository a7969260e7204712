"""Tokenizer, chat template, and the incremental detokenizer that streams text safely.

HF tokenizers do the tokenizing (never hand-write BPE); a GGUF's vocabulary arrives here already
converted to tokenizer.json by the loader's export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tinyserve.models.loader import ModelSource

# Tokens of prompt context the detokenizer decodes in front of the output: sentencepiece drops a
# leading space when a piece is decoded alone, so each delta is measured against real context.
_CONTEXT_TOKENS = 5


class Tokenizer:
    def __init__(self, hf_tokenizer: Any, eos_token_ids: tuple[int, ...] = ()) -> None:
        self.hf = hf_tokenizer
        ids = list(eos_token_ids)
        if self.hf.eos_token_id is not None:
            ids.append(self.hf.eos_token_id)
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(ids))
        self.vocab_size = len(self.hf)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    @property
    def renders_tools(self) -> bool:
        """Whether the chat template has a tools section of its own (Qwen2.5's does, SmolLM2's does not)."""
        return "tools" in (self.hf.chat_template or "")

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None) -> list[int]:
        if not self.hf.chat_template:
            raise ValueError("messages: this model has no chat template; use a plain prompt instead")
        text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                           **({"tools": tools} if tools else {}))
        # The template writes the special tokens itself; don't add a second BOS.
        return self.encode(text, add_special_tokens=False)


def load_tokenizer(src: ModelSource, override: str | None = None, eos_token_ids: tuple[int, ...] = ()) -> Tokenizer:
    """A directory with tokenizer.json is read as a fast tokenizer straight away: AutoTokenizer would
    first resolve the model's config class (a second of imports at every start). Anything else (a
    hub id, a slow-only tokenizer) goes through AutoTokenizer."""
    path = override or str(src.path)
    if (Path(path) / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return Tokenizer(PreTrainedTokenizerFast.from_pretrained(path), eos_token_ids)
    from transformers import AutoTokenizer

    return Tokenizer(AutoTokenizer.from_pretrained(path), eos_token_ids)


class TokenText:
    """Token id -> the text it stands for (special tokens included), cached: logprobs need it per token."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        s = self._cache.get(token_id)
        if s is None:
            s = self._cache[token_id] = self._tok.decode([token_id], skip_special_tokens=False)
        return s


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that never split a UTF-8 character.

    Byte-level BPE can put half of a multi-byte character in one token; decoding then yields U+FFFD.
    We hold such tails back until the next token completes them.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True) -> None:
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def step(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self.tok.decode(self.ids[self.prefix_offset : self.read_offset], self.skip)
        full = self.tok.decode(self.ids[self.prefix_offset :], self.skip)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix) :]
