"""Hostile input, faults and stalled clients against a real server (bundled model, fp32, 127.0.0.1).

One server for the module, with an API key, small limits and faults patched in (tests/faults.py) for
prompts that carry a marker. Every bad request must get its 4xx in OpenAI's shape and change
nothing: the good request after it returns the greedy text a fresh server gave. Injected faults
must fail only the requests that carry them. The fatal-fault test runs its own server (it dies).
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tinyserve_lab.launcher import ServerProcess

from conftest import server_metric, wait_server_idle

pytestmark = pytest.mark.slow

FAULT_SERVER = [sys.executable, str(Path(__file__).with_name("faults.py"))]  # `tinyserve serve`, faults patched in
KEY = "test-key-5f0c2b"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BYTES = 65536
CONTEXT = 512
FAULTS = "forward:FAULT_FORWARD,sampler:FAULT_SAMPLER,nan:FAULT_NAN,detokenize:FAULT_DETOK"
GOOD = {"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}
PROMPTS = ["The capital of France is", "Water boils at", "Once upon a time", "def fibonacci(n):"]
SERVER_ARGS = ["--dtype", "float32", "--enforce-eager", "--api-key", KEY, "--max-model-len", str(CONTEXT),
               "--kv-cache-memory-gb", "0.1", "--max-num-seqs", "16", "--max-request-bytes", str(MAX_BYTES),
               "--max-n", "4", "--max-stop", "4", "--max-messages", "8", "--max-prompts", "4",
               "--request-timeout", "120", "--stream-buffer", "8",
               "--socket-send-buffer", "16384"]


@pytest.fixture(scope="module")
def server():
    with ServerProcess(SERVER_ARGS, env={"TINYSERVE_FAULTS": FAULTS}, entry=FAULT_SERVER) as srv:
        yield srv


def complete(server, prompt: str, max_tokens: int = 4, **kw) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **kw}
    return httpx.post(server.url + "/v1/completions", json=body, headers=AUTH, timeout=120)


@pytest.fixture(scope="module")
def fresh(server) -> dict[str, str]:
    """Greedy texts from the fresh server, one request at a time, before anything else ran."""
    out = {}
    for p in PROMPTS:
        r = complete(server, p)
        assert r.status_code == 200, r.text
        out[p] = r.json()["choices"][0]["text"]
    return out


def metric(server, name: str, label: str = "") -> float:
    return server_metric(server.url, name, label)


def wait_idle(server, timeout: float = 30) -> None:
    wait_server_idle(server.url, timeout)


def assert_openai_error(r: httpx.Response, status: int, param: str | None = None) -> None:
    assert r.status_code == status, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["message"] and "Traceback" not in err["message"]
    if param is not None:
        assert err["param"] == param, err


# -- authentication ------------------------------------------------------------------------------


def test_auth(server, fresh):
    url = server.url
    wrong = [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer"}, {"Authorization": KEY},
             {"Authorization": f"Basic {KEY}"}, {"Authorization": f"Bearer {KEY}x"}]
    for headers in wrong:
        for method, path in [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                             ("POST", "/tokenize"), ("GET", "/v1/no-such-route")]:
            r = httpx.request(method, url + path, headers=headers, json=GOOD, timeout=30)
            assert_openai_error(r, 401)
            assert r.json()["error"]["code"] == "invalid_api_key"
            assert r.headers["www-authenticate"] == "Bearer"
    for path in ("/health", "/metrics", "/version", "/openapi.json"):  # open, as in vLLM
        assert httpx.get(url + path, timeout=30).status_code == 200
    assert httpx.get(url + "/v1/models", headers=AUTH, timeout=30).status_code == 200
    import openai

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    text = client.completions.create(model=model, prompt=GOOD["prompt"], max_tokens=4, temperature=0).choices[0].text
    assert text == fresh[GOOD["prompt"]]
    log = server.log_tail(100000)
    assert KEY not in log and GOOD["prompt"] not in log  # neither keys nor prompts are logged


# -- bad inputs ----------------------------------------------------------------------------------


def _json(obj) -> bytes:
    return json.dumps(obj).encode()


CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]
JSON_CT = {"content-type": "application/json"}
# (kind, path, body bytes, extra headers, status, param)
BAD_INPUTS = [
    ("malformed JSON", CMPL, b'{"prompt": "hi", ', {}, 400, None),
    ("malformed JSON", CMPL, b"", {}, 400, None),
    ("malformed JSON", CMPL, b"null", {}, 400, None),
    ("malformed JSON", CMPL, b"[1, 2]", {}, 400, None),
    ("malformed JSON", CMPL, b'"a string"', {}, 400, None),
    ("invalid UTF-8", CMPL, b'{"prompt": "\xff\xfe\xc3"}', {}, 400, None),
    ("invalid UTF-8", CMPL, b'{"prompt": "a\\ud800b"}', {}, 400, "prompt"),
    ("invalid UTF-8", CHAT, b'{"messages": [{"role": "user", "content": "\\udc00"}]}', {}, 400, None),
    ("NaN/Infinity", CMPL, b'{"prompt": "hi", "temperature": NaN}', {}, 400, "temperature"),
    ("NaN/Infinity", CMPL, b'{"prompt": "hi", "top_p": Infinity}', {}, 400, "top_p"),
    ("NaN/Infinity", CMPL, b'{"prompt": "hi", "presence_penalty": -Infinity}', {}, 400, "presence_penalty"),
    ("NaN/Infinity", CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "min_p": NaN}', {}, 400, "min_p"),
    ("huge numbers", CMPL, b'{"prompt": "hi", "temperature": 1e400}', {}, 400, "temperature"),
    ("huge numbers", CMPL, _json({"prompt": "hi", "max_tokens": 10**40}), {}, 400, "max_tokens"),
    ("huge numbers", CMPL, b'{"prompt": "hi", "max_tokens": 1' + b"0" * 5000 + b"}", {}, 400, None),
    ("huge numbers", CMPL, _json({"prompt": "hi", "seed": 2**64}), {}, 400, "seed"),
    ("huge numbers", CMPL, _json({"prompt": "hi", "top_k": 2**70}), {}, 400, "top_k"),
    ("huge numbers", CMPL, _json({"prompt": "hi", "n": 10**9}), {}, 400, "n"),
    ("huge numbers", CMPL, _json({"prompt": "hi", "logprobs": 10**6}), {}, 400, "logprobs"),
    ("huge numbers", CMPL, _json({"prompt": "hi", "min_tokens": 10**30}), {}, 400, "min_tokens"),
    ("unknown fields", CMPL, _json({"prompt": "hi", "max_token": 5}), {}, 400, "max_token"),
    ("unknown fields", CHAT, _json({"messages": MSG, "tools_x": []}), {}, 400, "tools_x"),
    ("wrong types", CMPL, _json({"prompt": 42}), {}, 400, "prompt"),
    ("wrong types", CMPL, _json({"prompt": {"text": "hi"}}), {}, 400, "prompt"),
    ("wrong types", CMPL, _json({"prompt": "hi", "max_tokens": "8"}), {}, 400, "max_tokens"),
    ("wrong types", CMPL, _json({"prompt": "hi", "stream": "yes"}), {}, 400, "stream"),
    ("wrong types", CMPL, _json({"prompt": "hi", "stop": 5}), {}, 400, "stop"),
    ("wrong types", CHAT, _json({"messages": "hi"}), {}, 400, "messages"),
    ("wrong types", CHAT, _json({"messages": [{"content": "no role"}]}), {}, 400, None),
    ("wrong content type", CMPL, _json(GOOD), {"content-type": "text/plain"}, 415, None),
    ("wrong content type", CMPL, b"prompt=hi", {"content-type": "application/x-www-form-urlencoded"}, 415, None),
    ("wrong content type", CMPL, _json(GOOD), {"content-type": "multipart/form-data; boundary=x"}, 415, None),
    ("empty prompts", CMPL, _json({"prompt": ""}), {}, 400, "prompt"),
    ("empty prompts", CMPL, _json({"prompt": []}), {}, 400, "prompt"),
    ("empty prompts", CMPL, _json({"prompt": [[]]}), {}, 400, "prompt"),
    ("empty prompts", CHAT, _json({"messages": []}), {}, 400, "messages"),
    ("enormous prompts", CMPL, _json({"prompt": "word " * 20000}), {}, 413, None),
    ("enormous prompts", CMPL, _json({"prompt": "word " * 2000, "max_tokens": 1}), {}, 400, "prompt"),
    ("enormous prompts", CMPL, _json({"prompt": [1] * CONTEXT, "max_tokens": 1}), {}, 400, "prompt"),
    ("context overflow", CMPL, _json({"prompt": "hi", "max_tokens": CONTEXT}), {}, 400, "max_tokens"),
    ("context overflow", CHAT, _json({"messages": MSG, "max_completion_tokens": CONTEXT}), {}, 400,
     "max_completion_tokens"),
    ("token ids out of range", CMPL, _json({"prompt": [-1]}), {}, 400, "prompt"),
    ("token ids out of range", CMPL, _json({"prompt": [49152]}), {}, 400, "prompt"),
    ("token ids out of range", CMPL, _json({"prompt": [10**20]}), {}, 400, "prompt"),
    ("token ids out of range", CMPL, _json({"prompt": "hi", "stop_token_ids": [-3]}), {}, 400, "stop_token_ids"),
    ("token ids out of range", CMPL, _json({"prompt": "hi", "stop_token_ids": [10**7]}), {}, 400, "stop_token_ids"),
    ("deeply nested JSON", CMPL, b'{"prompt": ' + b"[" * 20000 + b"]" * 20000 + b"}", {}, 400, None),
    ("deeply nested JSON", CMPL, b'{"prompt": ' + b"[" * 200 + b"1" + b"]" * 200 + b"}", {}, 400, "prompt"),
    ("deeply nested JSON", CHAT, _json({"messages": [{"role": "user", "content": [[[[["hi"]]]]]}]}), {}, 400, None),
    ("over a limit", CMPL, _json({"prompt": "hi", "n": 5}), {}, 400, "n"),
    ("over a limit", CMPL, _json({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}), {}, 400, "stop"),
    ("over a limit", CMPL, _json({"prompt": ["a"] * 5}), {}, 400, "prompt"),
    ("over a limit", CHAT, _json({"messages": MSG * 9}), {}, 400, "messages"),
    ("over a limit", CMPL, _json({"prompt": "hi", "logit_bias": {"1": 5}}), {}, 400, "logit_bias"),
    ("over a limit", CMPL, _json({"prompt": "x" * (MAX_BYTES + 1)}), {}, 413, None),
    ("unsupported", CMPL, _json({"prompt": "hi", "suffix": "x"}), {}, 400, "suffix"),
    ("unsupported", CHAT, _json({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}), {}, 400,
     "messages"),
]


def _chunked(body: bytes):
    for i in range(0, len(body), 8192):
        yield body[i:i + 8192]


def test_bad_inputs_get_4xx_and_change_nothing(server, fresh):
    expected = fresh[GOOD["prompt"]]
    outcomes: Counter[tuple[str, int]] = Counter()
    for kind, path, body, headers, status, param in BAD_INPUTS:
        r = httpx.post(server.url + path, content=body, headers={**AUTH, **JSON_CT, **headers}, timeout=60)
        assert_openai_error(r, status, param)
        outcomes[kind, r.status_code] += 1
        good = complete(server, GOOD["prompt"])
        assert good.status_code == 200 and good.json()["choices"][0]["text"] == expected, (kind, body[:80])
    # A body over the limit without a Content-Length (chunked) is cut off as it arrives.
    r = httpx.post(server.url + CMPL, content=_chunked(b" " * (4 * MAX_BYTES)), headers={**AUTH, **JSON_CT},
                   timeout=60)
    assert_openai_error(r, 413)
    for method in ("GET", "PUT", "DELETE"):
        assert_openai_error(httpx.request(method, server.url + CMPL, headers=AUTH, timeout=30), 405)
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    wait_idle(server)
    print("bad inputs by kind and status:", dict(sorted(outcomes.items())))


# -- faults --------------------------------------------------------------------------------------


def test_injected_faults_fail_only_their_requests(server, fresh):
    errors_before = metric(server, "tinyserve_requests_finished_total", 'finished_reason="error"')

    async def main():
        async with httpx.AsyncClient(headers=AUTH, timeout=120) as c:
            async def one(prompt: str, stream: bool = False):
                body = {"prompt": prompt, "max_tokens": 4, "temperature": 0, "stream": stream}
                if not stream:
                    return await c.post(server.url + CMPL, json=body)
                events = []
                async with c.stream("POST", server.url + CMPL, json=body) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            events.append(line[6:])
                return events

            faulty = [f"{p} {m}" for p, m in zip(PROMPTS, ["FAULT_FORWARD", "FAULT_SAMPLER", "FAULT_NAN",
                                                            "FAULT_DETOK"])]
            return await asyncio.gather(*(one(p) for p in PROMPTS), *(one(p) for p in faulty),
                                        one(PROMPTS[0], stream=True), one("Tell me FAULT_NAN", stream=True))

    *results, good_stream, bad_stream = asyncio.run(main())
    good, bad = results[:4], results[4:]
    for p, r in zip(PROMPTS, good):
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == fresh[p], r.text
    for r, what in zip(bad, ["forward", "sampler", "non-finite logits", "detokenize"]):
        assert_openai_error(r, 500)
        assert what in r.json()["error"]["message"]
    chunks = [json.loads(e) for e in good_stream[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == fresh[PROMPTS[0]] and good_stream[-1] == "[DONE]"
    assert "non-finite logits" in json.loads(bad_stream[0])["error"]["message"] and bad_stream[-1] == "[DONE]"
    errors = metric(server, "tinyserve_requests_finished_total", 'finished_reason="error"') - errors_before
    assert errors == 5
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    wait_idle(server)
    log = server.log_tail(100000)
    assert "failed: internal error: InjectedFault: injected forward fault" in log
    assert "failed: the model produced non-finite logits" in log
    assert complete(server, PROMPTS[1]).json()["choices"][0]["text"] == fresh[PROMPTS[1]]


def test_stalled_stream_is_aborted_and_frees_kv(server):
    """A client that stops reading: once its stream buffer fills, the request is aborted."""
    aborted_before = metric(server, "tinyserve_requests_finished_total", 'finished_reason="abort"')
    # 4 choices with 20 logprobs per token: ~3 KB per step fills the socket buffers in a few dozen steps
    body = _json({"prompt": "Tell me a long story.", "max_tokens": CONTEXT - 16, "ignore_eos": True,
                  "temperature": 0, "stream": True, "logprobs": 20, "n": 4})
    sock = socket.socket()
    # A modest window, and we never read. (With a 4 KB one the abort came too, but every step ran several
    # times slower until the window shut: the event loop woke for each few bytes it opened, we think.)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
    sock.connect((server.host, server.port))
    try:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 120
        while metric(server, "tinyserve_requests_finished_total", 'finished_reason="abort"') == aborted_before:
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(0.2)
        wait_idle(server)  # its KV blocks are back while the connection is still open
        assert "the client read too slowly" in server.log_tail(200)
    finally:
        sock.close()
    assert complete(server, "Water boils at").status_code == 200


def test_sigterm_aborts_what_outlives_the_shutdown_timeout_and_exits_zero():
    """SIGTERM with a stream that needs far longer than --shutdown-timeout: it is cut off, exit 0."""
    lines: list[str] = []
    started = threading.Event()
    srv = ServerProcess(["--dtype", "float32", "--enforce-eager", "--max-model-len", "512",
                         "--kv-cache-memory-gb", "0.05", "--shutdown-timeout", "2"])

    def consume() -> None:
        body = {"prompt": "Tell me a long story.", "max_tokens": 480, "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", srv.url + CMPL, json=body, timeout=120) as r:
                for line in r.iter_lines():
                    lines.append(line)
                    started.set()
        except httpx.HTTPError:
            pass  # the connection is dropped when the server gives up on it

    with srv:
        t = threading.Thread(target=consume)
        t.start()
        assert started.wait(60), srv.log_tail()
        t0 = time.monotonic()
        assert srv.terminate(timeout=60) == 0, srv.log_tail()
        assert time.monotonic() - t0 < 30
        t.join(30)
        assert "data: [DONE]" not in lines  # cut off, not finished
        log = srv.log_tail(300)
        assert "refusing new requests" in log and "engine loop stopped" in log


@pytest.fixture(scope="module")
def fragile():
    """A server with a 1.5 s request time limit whose engine dies on the 'fatal' marker."""
    srv = ServerProcess(["--dtype", "float32", "--enforce-eager", "--max-model-len", "128",
                         "--kv-cache-memory-gb", "0.05", "--request-timeout", "1.5"],
                        env={"TINYSERVE_FAULTS": "fatal:FAULT_FATAL"}, entry=FAULT_SERVER)
    with srv:
        yield srv


def test_request_timeout_aborts_with_504(fragile):
    # ~110 steps of >= 25 ms each (fp32, batch 1, 2 cores): well past 1.5 s
    body = {"prompt": "Tell me a long story.", "max_tokens": 110, "ignore_eos": True, "temperature": 0}
    t0 = time.monotonic()
    r = httpx.post(fragile.url + CMPL, json=body, timeout=60)
    assert_openai_error(r, 504)
    assert "time limit of 1.5 s" in r.json()["error"]["message"]
    assert time.monotonic() - t0 < 10
    with httpx.stream("POST", fragile.url + CMPL, json={**body, "stream": True}, timeout=60) as s:
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert json.loads(events[-2])["error"]["code"] == 504 and events[-1] == "[DONE]"
    wait_idle(fragile)


def test_fatal_engine_error_fails_health_and_exits_nonzero(fragile):
    r = httpx.post(fragile.url + CMPL, json={**GOOD, "prompt": "FAULT_FATAL now"}, timeout=60)
    assert r.status_code in (500, 503) and "error" in r.json()
    try:
        health = httpx.get(fragile.url + "/health", timeout=5).status_code
    except httpx.TransportError:
        health = None  # already gone: just as good for a supervisor
    assert health in (503, None)
    assert fragile.proc is not None
    assert fragile.proc.wait(60) == 1, fragile.log_tail()
    assert "the engine loop died" in fragile.log_tail(200)
