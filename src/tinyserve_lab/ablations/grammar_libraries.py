"""XGrammar vs llguidance on our tokenizers: tokenizer preprocessing, compile time of two schemas, and the
time to fill one token mask at each position of a valid JSON document (the work a constrained step adds
per sequence). llguidance is not a dependency: `pip install llguidance==1.9.1` first.

    .venv/bin/python -m tinyserve_lab.ablations.grammar_libraries              # bundled SmolLM2 (49,152 tokens)
    .venv/bin/python -m tinyserve_lab.ablations.grammar_libraries --model qwen2.5-coder-0.5b   # 151,936
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

from tinyserve.models.loader import resolve_model
from tinyserve.tokenizer import load_tokenizer
from tinyserve_lab.offline_models import OFFLINE_GGUFS, offline_gguf

CASES = [  # (schema, a valid document in the layout both libraries are told to allow)
    ({"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                       "tags": {"type": "array", "items": {"type": "string"}}},
      "required": ["name", "age"]},
     '{"name": "Alice Smith", "age": 42, "tags": ["a", "bb", "engineer"]}'),
    ({"type": "object", "properties": {
        "city": {"type": "string", "enum": ["Paris", "Rome", "Berlin"]}, "temp": {"type": "number"},
        "ok": {"type": "boolean"}, "addr": {"type": "object", "properties": {
            "street": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["street", "zip"]}}, "required": ["city", "temp", "ok", "addr"]},
     '{"city": "Rome", "temp": 21.5, "ok": true, "addr": {"street": "Via Roma 1", "zip": "00100"}}'),
]


def walk(ids: list[int], fill: Callable[[], Any], accept: Callable[[int], bool]) -> list[float]:
    """Seconds per mask fill along the document's tokens (each token must be accepted)."""
    times = []
    for t in ids:
        t0 = time.perf_counter()
        fill()
        times.append(time.perf_counter() - t0)
        if not accept(t):
            raise AssertionError(f"token {t} refused")
    return times


def xgrammar_run(hf: Any, vocab: int) -> dict[str, Any]:
    import xgrammar as xgr

    t0 = time.perf_counter()
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab), max_threads=1)
    out: dict[str, Any] = {"tokenizer_s": time.perf_counter() - t0, "compile_ms": [], "mask_us": []}
    for schema, doc in CASES:
        t0 = time.perf_counter()
        matcher = xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(schema), any_whitespace=False))
        out["compile_ms"].append((time.perf_counter() - t0) * 1e3)
        bitmask = xgr.allocate_token_bitmask(1, vocab)
        out["mask_us"] += walk(hf.encode(doc, add_special_tokens=False),
                               functools.partial(matcher.fill_next_token_bitmask, bitmask), matcher.accept_token)
    return out


def llguidance_run(hf: Any, vocab: int) -> dict[str, Any]:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    t0 = time.perf_counter()
    tok = llguidance.hf.from_tokenizer(hf, n_vocab=vocab)
    out: dict[str, Any] = {"tokenizer_s": time.perf_counter() - t0, "compile_ms": [], "mask_us": []}
    layout = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
    for schema, doc in CASES:
        t0 = time.perf_counter()
        matcher = llguidance.LLMatcher(tok, llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), layout))
        out["compile_ms"].append((time.perf_counter() - t0) * 1e3)
        bitmask = llguidance.torch.allocate_token_bitmask(1, tok.vocab_size)
        out["mask_us"] += walk(hf.encode(doc, add_special_tokens=False),
                               functools.partial(llguidance.torch.fill_next_token_bitmask, matcher, bitmask, 0),
                               matcher.consume_token)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help=f"a path or one of {', '.join(OFFLINE_GGUFS)} (default: bundled)")
    args = p.parse_args()
    src = resolve_model(str(offline_gguf(args.model)) if args.model in OFFLINE_GGUFS else args.model)
    hf = load_tokenizer(src).hf
    from tinyserve.models.loader import model_config

    vocab = model_config(src).vocab_size
    for name, run in (("xgrammar", xgrammar_run), ("llguidance", llguidance_run)):
        r = run(hf, vocab)
        us = [t * 1e6 for t in r["mask_us"]]
        print(json.dumps({"library": name, "model": src.name, "vocab": vocab, "tokenizer_s": round(r["tokenizer_s"], 3),
                          "compile_ms": [round(x, 2) for x in r["compile_ms"]],
                          "mask_us_mean": round(statistics.mean(us), 1), "mask_us_max": round(max(us), 1),
                          "masks": len(us)}), flush=True)


if __name__ == "__main__":
    main()
