"""Structured outputs and tool calling through the real server (bundled model, fp32) and the official
`openai` client: `parse` with a Pydantic model, every constraint kind on both endpoints, streamed and
not, mixed with free requests in the same steps, the tool-calling round trip, and the 400s."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel

from tinyserve_lab.launcher import ServerProcess

pytestmark = pytest.mark.slow

MODEL = "smol-structured"
# Bounded (maxLength, maximum) so that every output ends within max_tokens, whatever the small model likes.
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 130},
                                           "city": {"enum": ["Paris", "Rome", "Lima"]}},
          "required": ["name", "age", "city"], "additionalProperties": False}
KINDS = {  # structured_outputs body -> a check of the text
    "json": ({"json": PERSON}, lambda t: jsonschema.validate(json.loads(t), PERSON)),
    "json_object": ({"json_object": True}, lambda t: isinstance(json.loads(t), dict) or _fail()),
    "regex": ({"regex": r"\d{3}-\d{4}"}, lambda t: re.fullmatch(r"\d{3}-\d{4}", t) or _fail()),
    "choice": ({"choice": ["positive", "negative"]}, lambda t: t in ("positive", "negative") or _fail()),
    "grammar": ({"grammar": 'root ::= ("yes" | "no") ", because " [a-z ]{1,30} "."'},
                lambda t: re.fullmatch(r"(yes|no), because [a-z ]{1,30}\.", t) or _fail()),
}
# An open json_object lets the 135M model list keys until max_tokens: its prompt asks for a short one.
ASK_FOR = {**dict.fromkeys(KINDS, "Answer in the format."),
           "json_object": 'Reply with the JSON object {"ok": true} and nothing else.'}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]


def _fail() -> None:
    raise AssertionError("does not match")


class Person(BaseModel):
    name: str
    age: int


@pytest.fixture(scope="module")
def server():
    with ServerProcess(["--served-model-name", MODEL, "--dtype", "float32", "--enforce-eager",
                        "--kv-cache-memory-gb", "0.5", "--max-num-seqs", "32"]) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_parse_with_a_pydantic_model_streamed_and_not(client):
    msgs = [{"role": "user", "content": "Describe a person as JSON."}]
    r = client.chat.completions.parse(model=MODEL, messages=msgs, response_format=Person, max_tokens=60,
                                      temperature=0)
    assert isinstance(r.choices[0].message.parsed, Person) and r.choices[0].finish_reason == "stop"
    with client.chat.completions.stream(model=MODEL, messages=msgs, response_format=Person, max_tokens=60,
                                        temperature=0) as stream:
        for _ in stream:
            pass
        assert stream.get_final_completion().choices[0].message.parsed == r.choices[0].message.parsed


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("stream", [False, True])
def test_every_kind_on_both_endpoints(client, kind, stream):
    body, check = KINDS[kind]
    texts = []
    for endpoint in ("chat", "completions"):
        kw = dict(model=MODEL, max_tokens=200, temperature=0.7, seed=1, n=2, stream=stream,
                  extra_body={"structured_outputs": body})
        if endpoint == "chat":
            r = client.chat.completions.create(messages=[{"role": "user", "content": ASK_FOR[kind]}], **kw)
        else:
            r = client.completions.create(prompt=ASK_FOR[kind], **kw)
        got: dict[int, str] = {}
        for chunk in (r if stream else [r]):
            for c in chunk.choices:
                piece = c.delta.content if stream and endpoint == "chat" else (
                    c.text if endpoint == "completions" else c.message.content)
                got[c.index] = got.get(c.index, "") + (piece or "")
        texts += got.values()
    assert len(texts) == 4
    for t in texts:
        check(t)


def test_response_format_json_schema_and_json_object(client):
    ask = [{"role": "user", "content": ASK_FOR["json_object"]}]
    for rf in ({"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}, {"type": "json_object"}):
        r = client.chat.completions.create(model=MODEL, messages=ask, response_format=rf, max_tokens=80, temperature=0)
        assert r.choices[0].finish_reason == "stop"
        obj = json.loads(r.choices[0].message.content)
        if rf["type"] == "json_schema":
            jsonschema.validate(obj, PERSON)


def test_constrained_and_free_requests_in_the_same_steps(client, server):
    """16 at once, half constrained: the free ones get their solo greedy text, the others match."""
    prompts = [f"Tell me about the number {i}." for i in range(8)]
    solo = [client.completions.create(model=MODEL, prompt=p, max_tokens=24, temperature=0).choices[0].text
            for p in prompts]

    async def run() -> tuple[list[str], list[str]]:
        ac = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        free = [ac.completions.create(model=MODEL, prompt=p, max_tokens=24, temperature=0) for p in prompts]
        bound = [ac.completions.create(model=MODEL, prompt=p, max_tokens=60, temperature=0,
                                       extra_body={"structured_outputs": KINDS["json"][0]}) for p in prompts]
        rs = await asyncio.gather(*free, *bound)
        return [r.choices[0].text for r in rs[:8]], [r.choices[0].text for r in rs[8:]]

    free, bound = asyncio.run(run())
    assert free == solo
    for t in bound:
        KINDS["json"][1](t)


def _stream_calls(client, **kw) -> tuple[str, list[dict], str]:
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            content += c.delta.content or ""
            for tc in c.delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"id": tc.id, "name": "", "arguments": ""})
                entry["name"] += tc.function.name or ""
                entry["arguments"] += tc.function.arguments or ""
            finish = c.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("stream", [False, True])
def test_the_tool_calling_round_trip(client, stream):
    """required -> a call with valid arguments -> the tool's result -> a final answer in text."""
    kw = dict(model=MODEL, messages=ASK, tools=[WEATHER, CLOCK], tool_choice="required", max_tokens=80,
              temperature=0)
    if stream:
        _, calls, finish = _stream_calls(client, **kw)
    else:
        r = client.chat.completions.create(**kw)
        finish = r.choices[0].finish_reason
        calls = [{"id": t.id, "name": t.function.name, "arguments": t.function.arguments}
                 for t in r.choices[0].message.tool_calls]
    assert finish == "tool_calls" and len(calls) == 1
    call = calls[0]
    tool = {"get_weather": WEATHER, "get_time": CLOCK}[call["name"]]
    jsonschema.validate(json.loads(call["arguments"]), tool["function"]["parameters"])
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call["id"], "type": "function",
             "function": {"name": call["name"], "arguments": call["arguments"]}}]},
        {"role": "tool", "tool_call_id": call["id"], "content": "sunny, 21 degrees"}]
    final = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER, CLOCK], tool_choice="none",
                                           max_tokens=30, temperature=0)
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls
    assert final.choices[0].finish_reason in ("stop", "length")


def test_a_named_tool_choice_calls_that_tool(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, CLOCK], max_tokens=60,
                                       tool_choice={"type": "function", "function": {"name": "get_time"}})
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_time" and "zone" in json.loads(call.function.arguments)


@pytest.mark.parametrize("body,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"structured_outputs": {"regex": "(("}}, "structured_outputs"),
    ({"structured_outputs": {"grammar": "root ::= nowhere"}}, "structured_outputs"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"structured_outputs": {"json_object": True}, "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "bogus", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "tool", "content": "42"}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]},
     "messages[0].tool_calls[0].function.arguments"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
])
def test_bad_input_is_a_400_naming_the_field(server, body, param):
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"model": MODEL, "messages": ASK, "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()
    assert httpx.get(server.url + "/health").status_code == 200
