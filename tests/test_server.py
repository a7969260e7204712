"""The real server (`python -m tinyserve.server`, bundled model) driven by the official openai client.

One server process for the module. Greedy outputs are checked against offline `LLM.generate`, so
these tests catch batching, streaming and detokenization bugs, not just shapes.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

openai = pytest.importorskip("openai")

from tinyserve_lab.launcher import ServerProcess  # noqa: E402  (after the openai importorskip)

pytestmark = pytest.mark.slow

MODEL = "smol-test"
PROMPTS = [
    "Hello, my name is", "The capital of France is", "def fibonacci(n):", "Once upon a time",
    "The best way to learn Python is", "Water boils at", "In 1492,", "My favourite food is",
]


@pytest.fixture(scope="module")
def server():
    # fp32: the exact path, where a request's greedy text is the same in any batch (the streams below
    # are compared with offline generation).
    with ServerProcess(["--served-model-name", MODEL, "--dtype", "float32", "--enforce-eager",
                        "--kv-cache-memory-gb", "0.5", "--max-num-seqs", "48"]) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def aclient_factory(server):
    # One AsyncOpenAI per event loop: its connection pool is bound to the loop that created it.
    return lambda: openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=180)


@pytest.fixture(scope="module")
def offline(bundled_llm):
    """Greedy offline `LLM.generate` outputs: what the server's greedy text must equal."""
    from tinyserve import SamplingParams

    outs = bundled_llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12))
    return {p: o.outputs[0].text for p, o in zip(PROMPTS, outs)}


def metrics(server) -> dict[str, float]:
    """`name{labels}` -> value, and plain `name` -> sum over label sets."""
    out: dict[str, float] = {}
    for line in httpx.get(server.url + "/metrics", timeout=10).text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, value = line.rsplit(" ", 1)
        out[key] = float(value)
        name = key.split("{", 1)[0]
        out[name] = out.get(name, 0.0) + float(value) if name != key else out.get(name, float(value))
    return out


def test_models_health_version(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/version").json()["version"]


def test_completion_greedy_matches_offline_with_usage(client, offline):
    prompt = PROMPTS[0]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    choice = r.choices[0]
    assert choice.text == offline[prompt]
    assert choice.finish_reason == "length"
    assert r.model == MODEL and r.object == "text_completion"
    assert r.usage.completion_tokens == 12
    assert r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_completion_prompt_forms_and_echo(client, server, offline):
    ids = httpx.post(server.url + "/tokenize", json={"prompt": PROMPTS[1]}).json()["tokens"]
    assert httpx.post(server.url + "/detokenize", json={"tokens": ids}).json()["prompt"] == PROMPTS[1]
    # token ids and a list of prompts give the same greedy text as strings
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0)
    assert r.choices[0].text == offline[PROMPTS[1]]
    r = client.completions.create(model=MODEL, prompt=PROMPTS[:2], max_tokens=12, temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [offline[PROMPTS[0]], offline[PROMPTS[1]]]
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0, echo=True)
    assert r.choices[0].text == PROMPTS[0] + offline[PROMPTS[0]]


def test_completion_stream_with_usage(client, offline):
    prompt = PROMPTS[2]
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == offline[prompt]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in [c for c in chunks if c.choices][:-1])
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1] and chunks[-1].choices == []
    assert usage_chunks[0].usage.completion_tokens == 12


def test_chat_stream_equals_non_stream(client):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=10, temperature=0)
    assert full.object == "chat.completion"
    assert full.choices[0].message.role == "assistant"
    assert full.choices[0].finish_reason in ("stop", "length")
    text = full.choices[0].message.content
    assert text
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    # The same counts; the second request found the first's prompt in the prefix cache.
    streamed, plain = chunks[-1].usage.model_dump(), full.usage.model_dump()
    cached, cached_before = streamed.pop("prompt_tokens_details"), plain.pop("prompt_tokens_details")
    assert cached["cached_tokens"] > 0 and cached["cached_tokens"] >= cached_before["cached_tokens"]
    assert streamed == plain
    # the chat template was applied: more prompt tokens than the raw text has
    assert full.usage.prompt_tokens > 15


def test_n_greater_than_one(client):
    r = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=8, temperature=1.0, n=3, seed=7)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert 3 <= r.usage.completion_tokens <= 24
    if all(c.finish_reason == "length" for c in r.choices):
        assert r.usage.completion_tokens == 24
    assert len({c.text for c in r.choices}) > 1  # three independent samples, not one copied
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=6, n=2, temperature=1.0, seed=3, stream=True))
    assert {c.choices[0].index for c in chunks if c.choices} == {0, 1}
    assert sum(1 for c in chunks if c.choices and c.choices[0].finish_reason) == 2


def test_stop_strings(client, offline):
    prompt = PROMPTS[0]
    greedy = offline[prompt]
    stop = greedy[len(greedy) // 2: len(greedy) // 2 + 3]  # a stop string in the middle of the greedy text
    expected = greedy[: greedy.index(stop)]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].text == expected
    assert r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stop=stop,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected  # held-back text never leaks
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(client):
    def sample(seed: int) -> str:
        return client.completions.create(model=MODEL, prompt=PROMPTS[4], max_tokens=6, temperature=1.0,
                                         top_p=0.95, seed=seed).choices[0].text

    a, b = sample(1234), sample(1234)
    assert a == b
    assert len({a, sample(1), sample(2), sample(3)}) > 1


def test_completion_logprobs(client):
    r = client.completions.create(model=MODEL, prompt=PROMPTS[5], max_tokens=6, temperature=0, logprobs=3)
    c = r.choices[0]
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) \
        == r.usage.completion_tokens == 6
    assert "".join(lp.tokens) == c.text
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    for tok, val, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert val <= 0
        assert 3 <= len(top) <= 4 and tok in top
        assert val == pytest.approx(max(top.values()))  # greedy picks the most likely token


def test_chat_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi"}], max_tokens=5,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 2
        assert bytes(item.bytes).decode("utf-8", "replace") == item.token
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob)


def test_32_concurrent_streams_match_offline(server, aclient_factory, offline):
    before = metrics(server)

    async def one(client, prompt: str) -> tuple[str, str | None, int, float]:
        stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True})
        text, finish, usage = "", None, None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                usage = chunk.usage
        return text, finish, usage.completion_tokens, time.monotonic()

    async def main():
        client = aclient_factory()
        async with client:
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(32)]
            health = asyncio.create_task(asyncio.to_thread(httpx.get, server.url + "/health", timeout=30))
            results = await asyncio.gather(*(one(client, p) for p in prompts))
            return prompts, results, await health

    start = time.monotonic()
    prompts, results, health = asyncio.run(main())
    assert health.status_code == 200  # the HTTP side answered while the engine was busy
    for prompt, (text, finish, completion_tokens, _) in zip(prompts, results):
        assert text == offline[prompt]
        assert finish == "length" and completion_tokens == 12
    after = metrics(server)
    assert after["tinyserve_generation_tokens_total"] - before["tinyserve_generation_tokens_total"] >= 32 * 12
    # Continuous batching: 32 x 12 tokens one request at a time would take far longer than together.
    elapsed = time.monotonic() - start
    assert elapsed < 120, elapsed


def test_bad_inputs_get_openai_errors(server, client):
    url = server.url + "/v1/completions"
    chat = server.url + "/v1/chat/completions"
    ok_chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    cases = [
        (url, {"model": MODEL, "prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
        (url, {"model": MODEL, "prompt": "hi", "temperature": 3.5}, 400, "temperature"),
        (url, {"model": MODEL, "prompt": "hi", "temperature": -1}, 400, "temperature"),
        (url, {"model": MODEL, "prompt": "hi", "top_p": 0}, 400, "top_p"),
        (url, {"model": MODEL, "prompt": "hi", "n": 0}, 400, "n"),
        (url, {"model": MODEL, "prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
        (url, {"model": MODEL, "prompt": 42}, 400, "prompt"),
        (url, {"model": MODEL}, 400, "prompt"),
        (url, {"model": MODEL, "prompt": ""}, 400, "prompt"),
        (url, {"model": MODEL, "prompt": [10**9]}, 400, "prompt"),
        (url, {"model": MODEL, "prompt": [1] * 9000, "max_tokens": 1}, 400, "prompt"),  # longer than the context
        (url, {"model": MODEL, "prompt": "hi", "stop": [""]}, 400, "stop"),
        (url, {"model": MODEL, "prompt": "hi", "logprobs": 50}, 400, "logprobs"),
        (url, {"model": "no-such-model", "prompt": "hi"}, 404, "model"),
        (chat, {**ok_chat, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
        (chat, {**ok_chat, "top_logprobs": 2}, 400, "top_logprobs"),
        (chat, {"model": MODEL, "messages": []}, 400, "messages"),
        (chat, {"model": MODEL, "messages": [{"content": "no role"}]}, 400, None),
        (chat, {**ok_chat, "model": "gpt-4"}, 404, "model"),
    ]
    for endpoint, body, status, param in cases:
        r = httpx.post(endpoint, json=body, timeout=30)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
        assert err["message"] and "Traceback" not in err["message"]
        if param is not None:
            assert err["param"] == param, (body, err)
    raw = [
        (url, b'{"prompt": "hi", ', 400),  # malformed JSON
        (url, b"[1, 2]", 400),
        (server.url + "/v1/nope", b"{}", 404),
    ]
    for endpoint, content, status in raw:
        r = httpx.post(endpoint, content=content, headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == status, r.text
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.get(url)
    assert r.status_code == 405 and "error" in r.json()
    # The openai client sees these as its own exception types.
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=-5)
    # and the server still serves
    assert httpx.get(server.url + "/health").status_code == 200
    r = client.completions.create(model=MODEL, prompt="hi", max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2
    assert metrics(server)["tinyserve_requests_rejected_total"] >= len(cases)


def test_disconnects_abort_and_free_kv(server):
    idle = metrics(server)
    assert idle["tinyserve_requests_running"] == 0
    aborted_before = idle['tinyserve_requests_finished_total{finished_reason="abort",model_name="smol-test"}']
    body = {"model": MODEL, "prompt": "Write a very long story about a dragon.", "max_tokens": 400,
            "ignore_eos": True, "stream": True}

    async def open_and_drop(client: httpx.AsyncClient, i: int) -> int:
        got = 0
        async with client.stream("POST", server.url + "/v1/completions", json={**body, "seed": i}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    json.loads(line[6:])
                    got += 1
                    if got == 3:
                        break  # leaving the block closes the connection mid-stream
        return got

    async def main():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(open_and_drop(client, i) for i in range(8)))

    assert asyncio.run(main()) == [3] * 8
    deadline = time.monotonic() + 20
    while True:
        m = metrics(server)
        aborted = m['tinyserve_requests_finished_total{finished_reason="abort",model_name="smol-test"}']
        if (m["tinyserve_requests_running"] == 0 and m["tinyserve_requests_waiting"] == 0
                and m["tinyserve_kv_cache_usage_ratio"] == idle["tinyserve_kv_cache_usage_ratio"]
                and aborted - aborted_before == 8):
            break
        assert time.monotonic() < deadline, m
        time.sleep(0.2)
    # far fewer than 8 x 400 tokens were generated: the aborts really stopped the work
    assert m["tinyserve_generation_tokens_total"] - idle["tinyserve_generation_tokens_total"] < 8 * 200

    # A non-streaming client that gives up (read timeout closes the connection) is aborted too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json={**body, "stream": False}, timeout=httpx.Timeout(30, read=2))
    deadline = time.monotonic() + 20
    while True:
        m = metrics(server)
        aborted = m['tinyserve_requests_finished_total{finished_reason="abort",model_name="smol-test"}']
        if m["tinyserve_requests_running"] == 0 and aborted - aborted_before == 9:
            break
        assert time.monotonic() < deadline, m
        time.sleep(0.2)
    assert m["tinyserve_kv_cache_usage_ratio"] == idle["tinyserve_kv_cache_usage_ratio"]


def test_metrics_exposition(server):
    m = metrics(server)
    for name in ("tinyserve_requests_running", "tinyserve_requests_waiting", "tinyserve_kv_cache_usage_ratio",
                 "tinyserve_prompt_tokens_total", "tinyserve_generation_tokens_total",
                 "tinyserve_requests_finished_total", "tinyserve_time_to_first_token_seconds_count",
                 "tinyserve_time_per_output_token_seconds_count", "tinyserve_e2e_request_latency_seconds_count"):
        assert name in m, name
    assert m['tinyserve_requests_finished_total{finished_reason="length",model_name="smol-test"}'] > 0
    assert m["tinyserve_time_to_first_token_seconds_count"] > 0
    assert m["tinyserve_e2e_request_latency_seconds_sum"] >= m["tinyserve_time_to_first_token_seconds_sum"]
    assert m["tinyserve_prompt_tokens_total"] > 0
