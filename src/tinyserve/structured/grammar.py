"""Constrained decoding on XGrammar: a request's `StructuredOutputsParams` compiled once to a token grammar,
and one matcher per sequence that turns the grammar's state into a mask over the next token's logits.

Why XGrammar (measured against llguidance 1.9.1 on both of our tokenizers, REPORT S5): a mask costs
4-10 us on average against 41-63 us (90-108 us at worst against 1.5-2.1 ms), and the tokenizer's
preprocessing 0.12-0.55 s against 0.29-1.35 s; both compile a small schema in 1-17 ms. Compiling
happens off the step loop: the async engine compiles on this module's own thread, under a time limit,
before a request is queued (a step only ever fills masks), and the compiled grammar is cached by its
spec. A schema that does not compile in time is refused; the compile goes on in the background (a
library call cannot be interrupted) but holds nothing of the engine's.
XGrammar is imported on the first structured request, so a server that never sees one never pays for it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import re
import threading
from collections import OrderedDict
from typing import Any

import torch

from tinyserve.sampling import StructuredOutputsParams

_BITS: dict[torch.device, torch.Tensor] = {}  # bit j of an int32 word (1 << 31 wraps to the sign bit)


class Matcher:
    """One sequence's position in its grammar. `accept` advances on an emitted token; `fill` writes the
    allowed next tokens into a bitmask row; a speculative step walks the drafts with `accept` and `rollback`."""

    def __init__(self, xgr_matcher: Any) -> None:
        self._m = xgr_matcher

    def accept(self, token: int) -> bool:
        return bool(self._m.accept_token(token))

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self._m.fill_next_token_bitmask(bitmask, row)

    def rollback(self, num_tokens: int) -> None:
        if num_tokens:
            self._m.rollback(num_tokens)

    @property
    def terminated(self) -> bool:
        """The grammar is complete and its stop token was accepted: nothing more may follow."""
        return bool(self._m.is_terminated())


class Grammars:
    """The engine's grammar compiler for one tokenizer: compile (cached, time-limited) and make matchers."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, stop_token_ids: tuple[int, ...],
                 compile_timeout_s: float = 10.0, cache_size: int = 256) -> None:
        self._hf, self.vocab_size, self._stop = hf_tokenizer, vocab_size, list(stop_token_ids)
        self.compile_timeout_s = compile_timeout_s
        self._cache: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()  # the cache (looked up from the event loop and the engine thread)
        self._compiler: Any = None
        # One thread: a schema that compiles for long delays the next one, never a step.
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tinyserve-grammar")
        self._bitmask = torch.empty((0, 0), dtype=torch.int32)  # the step loop's, grown as needed
        self.mask_seconds = 0.0  # time spent filling and applying masks, for `tinyserve profile`

    # -- compiling (never on the step loop in a server) ---------------------------------------------
    def compile(self, spec: StructuredOutputsParams) -> Any:
        """The compiled grammar (blocking, within the time limit); ValueError naming the field if it cannot."""
        hit = self._cached(spec)
        if hit is not None:
            return hit
        try:
            return self._pool.submit(self._compile, spec).result(self.compile_timeout_s)
        except concurrent.futures.TimeoutError:
            raise self._timeout(spec) from None

    async def compile_async(self, spec: StructuredOutputsParams) -> Any:
        """`compile` for the event loop: the loop keeps serving while the grammar thread works."""
        hit = self._cached(spec)
        if hit is not None:
            return hit
        fut = self._pool.submit(self._compile, spec)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), self.compile_timeout_s)
        except TimeoutError:
            raise self._timeout(spec) from None

    def matcher(self, compiled: Any) -> Matcher:
        import xgrammar as xgr

        return Matcher(xgr.GrammarMatcher(compiled))  # rollback is unbounded (speculative drafts walk back)

    def _cached(self, spec: StructuredOutputsParams) -> Any:
        with self._lock:
            hit = self._cache.get(spec.key)
            if hit is not None:
                self._cache.move_to_end(spec.key)
            return hit

    def _timeout(self, spec: StructuredOutputsParams) -> ValueError:
        return ValueError(f"structured_outputs.{spec.kind}: the grammar did not compile within "
                          f"{self.compile_timeout_s:g} s; simplify it")

    def _compile(self, spec: StructuredOutputsParams) -> Any:
        hit = self._cached(spec)  # the same spec may have been queued twice
        if hit is not None:
            return hit
        compiler = self._get_compiler()
        try:
            compiled = _compile_spec(compiler, spec)
        except (RuntimeError, ValueError, TypeError) as e:  # XGrammar's parse/convert errors
            raise ValueError(f"structured_outputs.{spec.kind} is invalid: {_first_line(e)}") from None
        with self._lock:
            self._cache[spec.key] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _get_compiler(self) -> Any:
        """Built on the grammar thread, the only one that compiles, so without a lock: holding the cache's
        would stall the event loop's cache lookups for the tokenizer's 0.1-0.6 s of set-up."""
        if self._compiler is None:
            import xgrammar as xgr

            info = xgr.TokenizerInfo.from_huggingface(self._hf, vocab_size=self.vocab_size, stop_token_ids=self._stop)
            self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        return self._compiler

    # -- masking (on the step loop) -----------------------------------------------------------------
    def apply(self, logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> None:
        """Mask `logits[rows]` in place (-inf where the grammar forbids) with the filled `bitmask` rows.

        Not XGrammar's CPU kernel: it tests one bit per vocabulary entry in a scalar loop, 1.4-3.1 ms for
        16 rows of a mask that allows few tokens (49,152 entries each); one vectorized AND that unpacks
        the words and one masked_fill take 0.5 ms, with the same result (tests/test_structured.py), and
        run on any device."""
        bits = _BITS.get(logits.device)
        if bits is None:
            bits = _BITS[logits.device] = (1 << torch.arange(32, dtype=torch.int64)).to(torch.int32).to(logits.device)
        words = bitmask.to(logits.device, non_blocking=True)
        if len(rows) < logits.shape[0]:
            words = words[rows]
        forbidden = ((words.unsqueeze(-1) & bits) == 0).view(words.shape[0], -1)[:, : logits.shape[-1]]
        if len(rows) == logits.shape[0]:
            logits.masked_fill_(forbidden, float("-inf"))
        else:
            logits[rows] = logits[rows].masked_fill(forbidden, float("-inf"))

    def new_bitmask(self, num_rows: int) -> torch.Tensor:
        """Rows of int32 words (XGrammar's layout) for `fill`, which writes a row whole: only filled rows
        are ever applied, so the buffer is reused as it is (no initialisation, no allocation per step)."""
        if self._bitmask.shape[0] < num_rows:
            self._bitmask = torch.empty((max(num_rows, 64), (self.vocab_size + 31) // 32), dtype=torch.int32)
        return self._bitmask[:num_rows]


def _compile_spec(compiler: Any, spec: StructuredOutputsParams) -> Any:
    import xgrammar as xgr

    # JSON's layout is fixed: pretty-printed with two spaces (how these models write JSON unprompted), or
    # compact on one line with disable_any_whitespace. Free whitespace (XGrammar's default, vLLM's) let the
    # 135M model fill max_tokens with newlines between keys in 7 of 8 test prompts (REPORT S5).
    ws: dict[str, Any] = {"any_whitespace": False, "indent": None if spec.disable_any_whitespace else 2}
    if spec.json is not None:
        schema = json.dumps(spec.json)
        if not (spec.begin or spec.end):
            return compiler.compile_json_schema(schema, **ws)
        parts = [xgr.Grammar.from_json_schema(schema, **ws)]
        if spec.begin:
            parts.insert(0, xgr.Grammar.from_ebnf(f"root ::= {_literal(spec.begin)}"))
        if spec.end:
            parts.append(xgr.Grammar.from_ebnf(f"root ::= {_literal(spec.end)}"))
        return compiler.compile_grammar(xgr.Grammar.concat(*parts))
    if spec.json_object:  # OpenAI's json_object: an object (XGrammar's built-in JSON grammar takes any value)
        return compiler.compile_json_schema('{"type": "object"}', **ws)
    if spec.regex is not None:
        return compiler.compile_regex(spec.regex)
    if spec.choice is not None:
        return compiler.compile_grammar("root ::= " + " | ".join(_literal(c) for c in spec.choice))
    assert spec.grammar is not None
    return compiler.compile_grammar(spec.grammar)


def _literal(text: str) -> str:
    """An EBNF string literal: JSON's escapes are XGrammar's."""
    return json.dumps(text, ensure_ascii=False)


_CPP_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")  # XGrammar's "[hh:mm:ss] file.cc:line: "


def _first_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return _CPP_PREFIX.sub("", lines[0])[:300] if lines else type(e).__name__
