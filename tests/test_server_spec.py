"""Speculative decoding through the real server (bundled model, fp32, prompt lookup) and the openai
client: the text is exactly the one the engine gives without speculation, streamed or not, and the
speculation counters in /metrics move."""

from __future__ import annotations

import json

import httpx
import pytest

openai = pytest.importorskip("openai")

from tinyserve import SamplingParams  # noqa: E402  (after the openai importorskip)
from tinyserve_lab.launcher import ServerProcess  # noqa: E402

pytestmark = pytest.mark.slow

DOC = ("Paged attention stores the key and value cache in fixed-size blocks, so that memory is allocated "
       "on demand and shared between sequences that have a common prefix.")
MESSAGES = [{"role": "user", "content": f"Repeat this sentence word for word: {DOC}"}]
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2,
         "adaptive": False}  # k fixed: whether drafting pays here is a timing, which a test must not rest on


@pytest.fixture(scope="module")
def server():
    with ServerProcess(["--served-model-name", "smol", "--dtype", "float32", "--enforce-eager",
                        "--kv-cache-memory-gb", "0.25", "--speculative-config", json.dumps(NGRAM)]) as srv:
        yield srv


def counter(server, name: str) -> float:
    lines = httpx.get(server.url + "/metrics", timeout=10).text.splitlines()
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines if ln.startswith(name + "_total{"))


def test_speculative_server_gives_the_engines_own_text(server, bundled_llm):
    ref = bundled_llm.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=40))[0].outputs[0]
    want = ref.text
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    before = {n: counter(server, f"tinyserve_spec_decode_{n}") for n in ("num_drafts", "num_draft_tokens",
                                                                         "num_accepted_tokens")}
    got = client.chat.completions.create(model="smol", messages=MESSAGES, max_tokens=40, temperature=0)
    assert got.choices[0].message.content == want
    stream = client.chat.completions.create(model="smol", messages=MESSAGES, max_tokens=40, temperature=0,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want
    after = {n: counter(server, f"tinyserve_spec_decode_{n}") - v for n, v in before.items()}
    assert after["num_drafts"] > 0 and 0 < after["num_accepted_tokens"] <= after["num_draft_tokens"]
    metrics = httpx.get(server.url + "/metrics", timeout=10).text
    rate = next(float(ln.rsplit(" ", 1)[1]) for ln in metrics.splitlines()
                if ln.startswith("tinyserve_spec_decode_acceptance_rate{"))
    assert 0 < rate <= 1
    assert got.usage.completion_tokens == len(ref.token_ids)


def test_speculative_server_keeps_a_schema_and_the_engines_tokens(server, bundled_llm):
    """A drafted token the grammar forbids is rejected: the constrained text is the engine's own without
    speculation (the prompt repeats its JSON, so prompt lookup drafts plenty)."""
    from tinyserve.sampling import StructuredOutputsParams

    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "temp": {"type": "integer", "minimum": -50, "maximum": 60}},
              "required": ["city", "temp"], "additionalProperties": False}
    msgs = [{"role": "user", "content": 'Repeat this JSON exactly: {"city": "Paris", "temp": 21}'}]
    want = bundled_llm.chat(msgs, SamplingParams(temperature=0, max_tokens=40,
                                                 structured_outputs=StructuredOutputsParams(json=schema)))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    drafts = counter(server, "tinyserve_spec_decode_num_draft_tokens")
    got = client.chat.completions.create(model="smol", messages=msgs, max_tokens=40, temperature=0,
                                         extra_body={"structured_outputs": {"json": schema}})
    assert got.choices[0].message.content == want[0].outputs[0].text
    assert json.loads(got.choices[0].message.content)["city"]
    assert counter(server, "tinyserve_spec_decode_num_draft_tokens") > drafts
