"""Structured outputs in the engine, on a tiny random model: its unconstrained text is noise, so every
valid output below is the grammar's doing. Also the request-side pieces: StructuredOutputsParams, the
tool-call splitter, message checks. The real server and model: test_server_structured.py."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from tinyserve import LLM, SamplingParams
from tinyserve.sampling import StructuredOutputsParams as S
from tinyserve.structured.tool_formats import TOOL_FORMATS, ToolCallStream, join_deltas

from conftest import TINY

pytestmark = pytest.mark.usefixtures("restore_torch_threads")

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["color", "n", "ok"],
          "properties": {"color": {"enum": ["red", "green", "blue"]},
                         "n": {"type": "integer", "minimum": 0, "maximum": 99}, "ok": {"type": "boolean"}}}
# Bounded languages: a random model must finish each within max_tokens, so the output ends by the grammar.
KINDS = {
    "json": (S(json=SCHEMA, disable_any_whitespace=True), lambda t: jsonschema.validate(json.loads(t), SCHEMA)),
    "regex": (S(regex=r"[a-c]{2,5}-(x|y)"), lambda t: _check(re.fullmatch(r"[a-c]{2,5}-(x|y)", t))),
    "choice": (S(choice=["alpha", "beta", "gamma delta"]), lambda t: _check(t in ("alpha", "beta", "gamma delta"))),
    "grammar": (S(grammar='root ::= "(" [0-9] ("," [0-9])? ")"'),
                lambda t: _check(re.fullmatch(r"\([0-9](,[0-9])?\)", t))),
}
PROMPTS = ["Hello there", "Write JSON:", "1 2 3", "The answer is"]


def _check(ok: object) -> None:
    if not ok:
        raise AssertionError("does not match")


def _valid(kind: str, text: str) -> bool:
    try:
        KINDS[kind][1](text)
        return True
    except (AssertionError, ValueError, jsonschema.ValidationError):
        return False


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), **TINY)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_output_matches_its_constraint(tiny, kind, temperature):
    spec = KINDS[kind][0]
    params = SamplingParams(temperature=temperature, seed=3, max_tokens=48, n=2, structured_outputs=spec)
    outs = [c for o in tiny.generate(PROMPTS, params) for c in o.outputs]
    assert [c.finish_reason for c in outs] == ["stop"] * len(outs)  # the grammar ended each one
    assert all(_valid(kind, c.text) for c in outs), [c.text for c in outs]
    free = [c.text for o in tiny.generate(PROMPTS, SamplingParams(temperature=temperature, seed=3, max_tokens=16))
            for c in o.outputs]
    assert not any(_valid(kind, t) for t in free), "the unconstrained model should not match by chance"


def test_constrained_and_free_requests_share_steps(tiny):
    """In one batch, a free request's tokens are those it gets alone, and the constrained ones still match."""
    free = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = [o.outputs[0].token_ids for o in tiny.generate(PROMPTS, free)]
    mixed = tiny.generate(PROMPTS * 2, [free] * 4 + [SamplingParams(temperature=0, max_tokens=48,
                                                                     structured_outputs=KINDS[k][0]) for k in KINDS])
    assert [o.outputs[0].token_ids for o in mixed[:4]] == alone
    assert all(_valid(k, o.outputs[0].text) for k, o in zip(KINDS, mixed[4:]))


@pytest.mark.parametrize("draft", ["ngram", "model"])
def test_speculative_decoding_keeps_the_grammar_and_the_tokens(tiny_llama_dir, tiny, draft):
    """Drafts the grammar forbids are rejected: greedy constrained tokens are the plain run's."""
    cfg = ({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "adaptive": False}
           if draft == "ngram" else {"model": str(tiny_llama_dir), "num_speculative_tokens": 3, "adaptive": False})
    params = [SamplingParams(temperature=0, max_tokens=48, structured_outputs=KINDS[k][0]) for k in KINDS]
    want = [o.outputs[0].token_ids for o in tiny.generate(PROMPTS, params)]
    spec = LLM(str(tiny_llama_dir), **TINY, speculative_config=cfg)
    got = spec.generate(PROMPTS, params)
    assert [o.outputs[0].token_ids for o in got] == want
    assert all(_valid(k, o.outputs[0].text) for k, o in zip(KINDS, got))
    assert spec.engine.spec.stats.num_draft_tokens > 0


def test_preempted_sequences_resume_in_their_grammar(tiny_llama_dir, tiny):
    """A pool too small for the batch preempts (recompute): the matcher, advanced only by emitted tokens,
    carries on where the sequence left off, and the outputs equal an unpressured run's."""
    params = [SamplingParams(temperature=0, max_tokens=48, structured_outputs=KINDS[k][0]) for k in KINDS] * 2
    prompts = PROMPTS * 2
    want = [o.outputs[0].token_ids for o in tiny.generate(prompts, params)]
    small = LLM(str(tiny_llama_dir), **TINY, num_kv_blocks=12, block_size=4, max_num_batched_tokens=32)
    e = small.engine
    seqs = [s for i, (p, sp) in enumerate(zip(prompts, params)) for s in e.add_request(f"r{i}", p, sp)]
    while e.has_unfinished():
        e.step()
    assert [s.output_token_ids for s in seqs] == want
    assert sum(s.num_preemptions for s in seqs) > 0, "the pool was meant to force preemption"


def test_bad_specs_and_slow_compiles_are_refused_naming_the_field(tiny):
    for kwargs, field in [({}, "structured_outputs"), ({"regex": "a", "choice": ["b"]}, "structured_outputs"),
                          ({"json": "{not json"}, "structured_outputs.json"), ({"choice": []}, "structured_outputs"),
                          ({"regex": "a", "begin": "<"}, "structured_outputs.begin")]:
        with pytest.raises(ValueError, match=re.escape(field)):
            S(**kwargs)
    for spec in (S(regex="(("), S(grammar="root ::= undefined_rule"), S(json={"type": "nonsense"})):
        with pytest.raises(ValueError, match=rf"structured_outputs\.{spec.kind} is invalid"):
            tiny.generate(PROMPTS[:1], SamplingParams(structured_outputs=spec))
    grammars = tiny.engine.grammars
    timeout, grammars.compile_timeout_s = grammars.compile_timeout_s, 1e-6
    try:
        with pytest.raises(ValueError, match="did not compile within"):
            grammars.compile(S(regex="[a-z]{1,40}@[a-z]{1,40}\\.(com|org|net){1,3}"))
    finally:
        grammars.compile_timeout_s = timeout
    assert not tiny.engine.has_unfinished()


def test_masks_apply_as_xgrammar_applies_them(tiny):
    """Our vectorized unpacking gives XGrammar's own kernel's result, on every row or on some."""
    import torch
    import xgrammar as xgr

    g = tiny.engine.grammars
    words = torch.randint(-(2**31), 2**31 - 1, (6, (g.vocab_size + 31) // 32), dtype=torch.int32)
    words[2] = 0  # nothing allowed but what a row's other words allow: here, nothing at all
    for rows in ([0, 1, 2, 3, 4, 5], [1, 4]):
        ours = torch.randn(6, g.vocab_size)
        theirs = ours.clone()
        g.apply(ours, rows, words)
        xgr.apply_token_bitmask_inplace(theirs, words, indices=rows)
        assert torch.equal(ours, theirs)


# -- tool calls -------------------------------------------------------------------------------------
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_the_splitter_finds_calls_in_any_chunking_and_holds_back_a_partial_tag():
    fmt = TOOL_FORMATS["hermes"]()
    text = f"Let me check.\n{CALL}\n{CALL.replace('Paris', 'Rome')}"
    whole = fmt.parse(text)
    assert whole[0] == "Let me check.\n" and [json.loads(c.arguments)["city"] for c in whole[1]] == ["Paris", "Rome"]
    assert [c.arguments for c in whole[1]] == ['{"city": "Paris"}', '{"city": "Rome"}']  # as written
    stream = ToolCallStream(fmt)
    content, deltas = "", []
    for ch in text:  # one character at a time: the arguments arrive in pieces, the tags never show
        got, new = stream.feed(ch)
        assert "<" not in got and not any("<" in d.arguments or d.arguments.endswith("}}") for d in new)
        content, deltas = content + got, deltas + new
    content += stream.finish()
    assert len([d for d in deltas if d.name is not None]) == 2 and len(deltas) > 4
    assert content == whole[0]
    assert [(c.name, c.arguments) for c in join_deltas(deltas)] == [(c.name, c.arguments) for c in whole[1]]
    # Not a call (bad JSON) stays text; one cut before its arguments is given back as text; one cut inside
    # its arguments (max_tokens) has been streamed as a call, and stays one.
    assert fmt.parse("<tool_call>\nnot json\n</tool_call>") == ("<tool_call>\nnot json\n</tool_call>", [])
    assert fmt.parse('a <tool_call>\n{"name": "f"') == ('a <tool_call>\n{"name": "f"', [])
    cut = fmt.parse('<tool_call>\n{"name": "f", "arguments": {"a": "b')
    assert cut[0] == "" and [(c.name, c.arguments) for c in cut[1]] == [("f", '{"a": "b')]


def test_a_forced_call_is_a_valid_call_even_from_noise(tiny):
    fmt = TOOL_FORMATS["hermes"]()
    tools = [{"type": "function", "function": {"name": n, "parameters": {
        "type": "object", "properties": {"unit": {"enum": ["c", "f"]}}, "required": ["unit"],
        "additionalProperties": False}}} for n in ("get_weather", "get_time")]
    spec = S(json=fmt.call_schema(tools), begin=fmt.begin, end=fmt.end, disable_any_whitespace=True)
    outs = tiny.generate(PROMPTS, SamplingParams(temperature=1.0, seed=0, max_tokens=64, structured_outputs=spec))
    for o in outs:
        content, calls = fmt.parse(o.outputs[0].text)
        assert content == "" and len(calls) == 1, o.outputs[0].text
        assert calls[0].name in ("get_weather", "get_time") and json.loads(calls[0].arguments)["unit"] in "cf"
