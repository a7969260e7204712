"""Load generator against a tiny in-test fake OpenAI-compatible streaming server on 127.0.0.1."""

import argparse
import asyncio
import json
import math
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from tinyserve_lab.datasets import Conversation, SampleRequest, Turn
from tinyserve_lab.loadgen import (
    LoadConfig,
    arrival_offsets,
    fetch_first_model,
    normalize_base_url,
    run_load,
    run_multi_turn,
)
from tinyserve_lab.metrics import compute_metrics
from tinyserve_lab.serve_bench import add_serve_bench_args, run_serve_benchmark

GAP = 0.02  # seconds between fake tokens


class FakeState:
    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0


def make_app(state: FakeState) -> FastAPI:
    """Streams max_tokens chunks 'tok ' GAP apart. Prompts 'fail', 'slow', 'nousage', 'garbage' misbehave."""
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    async def stream(body: dict, chat: bool):
        state.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            prompt = body.get("prompt", "")
            words = len(prompt.split()) if not chat else sum(len(m["content"].split()) for m in body["messages"])
            if chat:  # a content-less role chunk first, as OpenAI sends
                yield 'data: {"choices": [{"index": 0, "delta": {"role": "assistant"}}]}\n\n'
            if prompt == "slow":
                await asyncio.sleep(2.0)
            if prompt == "garbage":
                yield "data: {not json\n\n"
            n = body["max_tokens"]
            for _ in range(n):
                await asyncio.sleep(GAP)
                choice = {"index": 0, "delta": {"content": "tok "}} if chat else {"index": 0, "text": "tok "}
                yield f"data: {json.dumps({'choices': [choice]})}\n\n"
            yield 'data: {"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}\n\n'
            if body.get("stream_options", {}).get("include_usage") and prompt != "nousage":
                usage = {"prompt_tokens": words, "completion_tokens": n, "total_tokens": words + n}
                yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            state.in_flight -= 1

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        state.bodies.append(body)
        if body.get("prompt") == "fail":
            return JSONResponse({"error": {"message": "boom"}}, status_code=500)
        return StreamingResponse(stream(body, chat=False), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        state.bodies.append(body)
        return StreamingResponse(stream(body, chat=True), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def server():
    state = FakeState()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(make_app(state), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 10
    while not srv.started and time.time() < deadline:
        time.sleep(0.02)
    assert srv.started, "fake server did not start"
    yield f"http://127.0.0.1:{port}/v1", state
    srv.should_exit = True
    thread.join(timeout=5)
    sock.close()


def cfg(base_url: str, **kw) -> LoadConfig:
    return LoadConfig(**{"base_url": base_url, "model": "fake-model", "progress": False, "total_timeout_s": 20, **kw})


def req(prompt: str, out: int) -> SampleRequest:
    return SampleRequest(prompt, len(prompt.split()), out)


def test_records_ttft_itl_tokens_and_failures(server):
    url, state = server
    result = asyncio.run(run_load([req("a b c", 4), req("d e", 6), req("fail", 3), req("nousage", 3)], cfg(url)))
    ok, ok2, failed, nousage = result.records
    assert ok.success and ok2.success and nousage.success
    assert ok.output_len == 4 and ok2.output_len == 6  # from the usage chunk
    assert nousage.output_len == 3  # fallback: one token per text chunk
    assert len(ok.itl) == 3 and len(ok2.itl) == 5
    assert ok.ttft >= GAP * 0.5 and all(g >= GAP * 0.5 for g in ok.itl)
    assert ok.e2el == pytest.approx(ok.ttft + sum(ok.itl), abs=1e-6)
    assert not failed.success and failed.error.startswith("HTTP 500")
    m = compute_metrics(result.records, result.duration_s)
    assert (m.completed, m.failed, m.total_output, m.total_input) == (3, 1, 13, 6)
    assert m.latency["tpot"].mean > 0 and m.peak_concurrency >= 2
    sent = state.bodies[-1]
    assert sent["stream"] and sent["ignore_eos"] and sent["stream_options"] == {"include_usage": True}
    assert {b["max_tokens"] for b in state.bodies[-4:]} == {3, 4, 6}


def test_timeouts_and_broken_streams_are_failures(server):
    url, _ = server
    r = asyncio.run(run_load([req("slow", 2), req("garbage", 2), req("x", 1)], cfg(url, request_timeout_s=0.5)))
    slow, garbage, fine = r.records
    assert not slow.success and "timeout" in slow.error
    assert not garbage.success and "JSONDecodeError" in garbage.error
    assert fine.success and fine.output_len == 1 and fine.itl == []
    overall = asyncio.run(run_load([req("slow", 2), req("y", 1)], cfg(url, total_timeout_s=0.5)))
    assert overall.timed_out and overall.duration_s < 1.5
    assert "benchmark timeout" in overall.records[0].error and overall.records[1].success


def test_concurrency_cap_and_max_tokens_override(server):
    url, state = server
    state.max_in_flight = 0
    r = asyncio.run(run_load([req("p", 5)] * 3, cfg(url, max_concurrency=1, max_tokens=2)))
    assert all(x.success and x.output_len == 2 and x.expected_output_len == 2 for x in r.records)
    assert state.max_in_flight == 1
    assert compute_metrics(r.records, r.duration_s).peak_concurrency == 1
    state.max_in_flight = 0
    asyncio.run(run_load([req("p", 3)] * 3, cfg(url)))  # rate inf, no cap: all at once
    assert state.max_in_flight == 3


def test_chat_multi_turn_replays_generated_history(server):
    url, state = server
    conv = Conversation("c0", [Turn("hello there", "ref reply", 3), Turn("and then", "ref two", 2)])
    r = asyncio.run(run_multi_turn([conv], cfg(url, endpoint="completions")))  # forced to chat
    t0, t1 = r.records
    assert t0.success and t1.success and (t0.turn, t1.turn) == (0, 1) and t0.conversation_id == "c0"
    assert t0.ttft >= GAP * 0.5  # the role-only chunk does not count as the first token
    assert (t0.output_len, t1.output_len) == (3, 2)
    msgs = state.bodies[-1]["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert msgs[1]["content"] == "tok tok tok "  # the server's own reply, not the dataset's
    assert (t0.prompt_len, t1.prompt_len) == (2, 7)  # from the server's usage chunk
    asyncio.run(run_multi_turn([conv], cfg(url), history="reference"))
    assert state.bodies[-1]["messages"][1]["content"] == "ref reply"


def test_arrival_processes():
    assert np.all(arrival_offsets(5, math.inf) == 0)
    gaps = np.diff(arrival_offsets(4001, rate=10.0, burstiness=1.0, seed=0))
    assert gaps.mean() == pytest.approx(0.1, rel=0.1)
    assert (gaps.std() / gaps.mean()) ** 2 == pytest.approx(1.0, rel=0.15)  # Poisson: CV^2 = 1
    bursty = np.diff(arrival_offsets(4001, rate=10.0, burstiness=0.25, seed=0))
    assert bursty.mean() == pytest.approx(0.1, rel=0.15)
    assert (bursty.std() / bursty.mean()) ** 2 == pytest.approx(4.0, rel=0.2)  # gamma: CV^2 = 1/shape
    with pytest.raises(ValueError):
        arrival_offsets(3, 0.0)


def test_model_discovery_and_url_normalization(server):
    url, _ = server
    assert fetch_first_model(url) == "fake-model"
    assert fetch_first_model(url.removesuffix("/v1")) == "fake-model"
    assert normalize_base_url("http://h:1/") == "http://h:1/v1"
    assert normalize_base_url("http://h:1/v1/") == "http://h:1/v1"


class WordTokenizer:
    vocab_size = 500
    all_special_ids = [0]

    def encode(self, text):
        return [int(w[1:]) for w in text.split()]

    def decode(self, ids):
        return " ".join(f"w{i}" for i in ids)


def test_serve_benchmark_sweep_writes_results(server, tmp_path):
    url, _ = server
    args = add_serve_bench_args(argparse.ArgumentParser()).parse_args(
        ["--base-url", url, "--dataset", "random", "--num-prompts", "4", "--random-input-len", "8",
         "--random-output-len", "3", "--request-rate", "inf", "50", "--goodput", "ttft:5000",
         "--percentiles", "50,99", "--result-dir", str(tmp_path), "--label", "fake", "--disable-tqdm"])
    out = run_serve_benchmark(args, tokenizer=WordTokenizer())
    assert len(out["runs"]) == 2 and len(out["files"]) == 2
    saved = json.loads(Path(out["files"][1]).read_text())
    assert saved["server"]["model"] == "fake-model" and saved["config"]["request_rate"] == 50.0
    assert saved["machine"]["cpu_count"] >= 1 and "commit" in saved["git"]
    assert saved["metrics"]["completed"] == 4 and saved["metrics"]["total_output"] == 12
    assert saved["metrics"]["request_goodput"] > 0 and "ttft_p50_ms" in saved["metrics"]
    assert len(saved["requests"]) == 4 and all(r["success"] for r in saved["requests"])
    assert json.loads(Path(out["files"][0]).read_text())["config"]["request_rate"] == "inf"
