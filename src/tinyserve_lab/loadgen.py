"""Asyncio load generator for any OpenAI-compatible server (tinyserve, vLLM, llama.cpp, ...).

Streams `/completions` or `/chat/completions` with `stream_options.include_usage`, timing each
content chunk on arrival. A request that fails (non-200, bad stream, exception, timeout) is recorded
as failed and the run goes on. Arrival processes follow vLLM's benchmark_serving: gamma inter-arrival
times with shape = burstiness and scale = 1 / (rate * burstiness) (burstiness 1 = Poisson), rate = inf
sends everything at once, and an optional semaphore caps the requests in flight.

Timing notes (choices worth knowing when reading numbers):
- TTFT is taken at the first chunk that carries text. vLLM's client also counts a content-less first
  chunk (e.g. a chat `role` delta); we skip those so TTFT means "first generated text".
- E2EL ends at the last text chunk (as vLLM: the `[DONE]` and usage-only chunks are not timed).
- Output tokens come from the server's usage chunk; without one, the number of text chunks is used.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
import httpx
import numpy as np
from tqdm.auto import tqdm

from .datasets import Conversation, SampleRequest
from .metrics import RequestRecord

Endpoint = Literal["completions", "chat"]
HistoryMode = Literal["generated", "reference"]


@dataclass(frozen=True)
class LoadConfig:
    """How to send one benchmark run. `max_tokens` overrides each request's sampled output length."""

    base_url: str
    model: str
    endpoint: Endpoint = "completions"
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    ignore_eos: bool = True
    max_tokens: int | None = None
    temperature: float = 0.0
    request_timeout_s: float = 600.0
    total_timeout_s: float | None = 1800.0
    seed: int = 0
    api_key: str | None = None
    extra_body: dict[str, Any] = field(default_factory=dict)
    keep_text: bool = False
    progress: bool = True


@dataclass
class LoadResult:
    records: list[RequestRecord]
    duration_s: float
    timed_out: bool = False


def normalize_base_url(base_url: str) -> str:
    """'http://h:8000' -> 'http://h:8000/v1'; a URL that already has a path is kept (minus a trailing /)."""
    url = base_url.rstrip("/")
    return url + "/v1" if urlsplit(url).path in ("", "/") else url


def fetch_first_model(base_url: str, api_key: str | None = None, timeout_s: float = 10.0) -> str:
    """The first model id served at GET {base}/models."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    resp = httpx.get(f"{normalize_base_url(base_url)}/models", headers=headers, timeout=timeout_s)
    resp.raise_for_status()
    data = resp.json().get("data") or []
    if not data:
        raise RuntimeError(f"{base_url}/models lists no model")
    return str(data[0]["id"])


def arrival_offsets(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> np.ndarray:
    """Send times (s from start) of n requests; the first goes at 0, then gamma-distributed gaps."""
    if rate <= 0:
        raise ValueError(f"request rate must be > 0, got {rate}")
    if burstiness <= 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    if math.isinf(rate) or n == 0:
        return np.zeros(n)
    gaps = np.random.default_rng(seed).gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)])


def build_body(cfg: LoadConfig, prompt: str | None, messages: list[dict] | None, output_len: int) -> dict:
    """The JSON body: streaming with usage, greedy by default, ignore_eos so lengths are controlled."""
    body: dict[str, Any] = {
        "model": cfg.model,
        "max_tokens": cfg.max_tokens if cfg.max_tokens is not None else output_len,
        "temperature": cfg.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": cfg.ignore_eos,
    }
    if cfg.endpoint == "chat":
        body["messages"] = messages if messages is not None else [{"role": "user", "content": prompt or ""}]
    else:
        body["prompt"] = prompt if prompt is not None else "\n".join(m["content"] for m in messages or [])
    body.update(cfg.extra_body)
    return body


def chunk_text(obj: dict, endpoint: Endpoint) -> str:
    """The generated text carried by one streamed chunk ('' for role-only, finish or usage chunks)."""
    choices = obj.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if endpoint == "chat":
        return (choice.get("delta") or {}).get("content") or ""
    return choice.get("text") or ""


async def send_request(
    session: aiohttp.ClientSession, cfg: LoadConfig, body: dict, record: RequestRecord
) -> RequestRecord:
    """POST one streaming request and fill `record` in place; never raises except on cancellation."""
    path = "/chat/completions" if cfg.endpoint == "chat" else "/completions"
    url = normalize_base_url(cfg.base_url) + path
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    text_parts: list[str] = []
    n_chunks = 0
    usage_out: int | None = None
    start = last = time.perf_counter()
    try:
        async with session.post(url, json=body, headers=headers) as resp:
            if resp.status != 200:
                detail = (await resp.text())[:300]
                record.error = f"HTTP {resp.status}: {detail}"
                return record
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue  # blank keep-alives, comments, event: lines
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    record.error = f"stream error: {json.dumps(obj['error'])[:300]}"
                    return record
                text = chunk_text(obj, cfg.endpoint)
                if text:
                    now = time.perf_counter()
                    if n_chunks == 0:
                        record.ttft = now - start
                    else:
                        record.itl.append(now - last)
                    last = now
                    n_chunks += 1
                    text_parts.append(text)
                usage = obj.get("usage")
                if usage:
                    usage_out = usage.get("completion_tokens", usage_out)
                    if not record.prompt_len and usage.get("prompt_tokens"):
                        record.prompt_len = int(usage["prompt_tokens"])  # client could not count it
                    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
                    if cached is not None:
                        record.cached_tokens = int(cached)
        if n_chunks == 0:
            record.error = "no text chunk received"
            return record
        record.e2el = last - start
        record.output_len = int(usage_out) if usage_out is not None else n_chunks
        record.generated_text = "".join(text_parts)
        record.success = True
    except TimeoutError:
        record.error = f"timeout after {cfg.request_timeout_s:g} s"
    except Exception as e:  # any broken response is the server's failure, not the benchmark's
        record.error = f"{type(e).__name__}: {e}"[:300]
    return record


class _Runner:
    """Shared plumbing of one run: session, semaphore, arrival schedule, progress bar, overall timeout."""

    def __init__(self, cfg: LoadConfig, n_units: int, n_records: int):
        self.cfg = cfg
        self.offsets = arrival_offsets(n_units, cfg.request_rate, cfg.burstiness, cfg.seed)
        self.sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
        self.pbar = tqdm(total=n_records, disable=not cfg.progress, desc="requests", leave=False)
        self.t0 = 0.0

    async def run(self, records: list[RequestRecord], unit_coros) -> LoadResult:
        connector = aiohttp.TCPConnector(limit=self.cfg.max_concurrency or 0, force_close=True)
        timeout = aiohttp.ClientTimeout(total=self.cfg.request_timeout_s)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False) as session:
            self.session = session
            self.t0 = time.perf_counter()
            tasks = [asyncio.create_task(c) for c in unit_coros]
            done, pending = await asyncio.wait(tasks, timeout=self.cfg.total_timeout_s) if tasks else (set(), set())
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            duration = time.perf_counter() - self.t0
        self.pbar.close()
        for t in done:
            if (exc := t.exception()) is not None:  # a bug, not a server failure: surface it
                raise exc
        if pending:
            for r in records:
                if not r.success and not r.error:
                    r.error = f"benchmark timeout after {self.cfg.total_timeout_s:g} s"
        return LoadResult(records, duration, timed_out=bool(pending))

    async def wait_turn(self, unit: int) -> None:
        delay = self.t0 + float(self.offsets[unit]) - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)

    async def send(self, body: dict, record: RequestRecord) -> RequestRecord:
        record.start_time = time.perf_counter() - self.t0
        await send_request(self.session, self.cfg, body, record)
        self.pbar.update(1)
        return record


async def run_load(requests: Sequence[SampleRequest], cfg: LoadConfig) -> LoadResult:
    """Send independent requests under cfg's arrival process and concurrency cap."""
    runner = _Runner(cfg, len(requests), len(requests))
    records = [
        RequestRecord(index=i, prompt_len=r.prompt_len, expected_output_len=_out_len(cfg, r.expected_output_len))
        for i, r in enumerate(requests)
    ]

    async def one(i: int) -> None:
        await runner.wait_turn(i)
        req = requests[i]
        body = build_body(cfg, req.prompt, req.messages, req.expected_output_len)
        if runner.sem is None:
            await runner.send(body, records[i])
        else:
            async with runner.sem:
                await runner.send(body, records[i])
        if not cfg.keep_text:
            records[i].generated_text = ""

    return await runner.run(records, [one(i) for i in range(len(requests))])


async def run_multi_turn(
    conversations: Sequence[Conversation],
    cfg: LoadConfig,
    history: HistoryMode = "generated",
    think_time_s: float = 0.0,
) -> LoadResult:
    """Chat sessions: turn k is sent with turns < k as history; one record per turn.

    The arrival process and concurrency cap apply to conversations (a capped slot is a chat client
    that holds it for the whole conversation). `history` picks the assistant messages of earlier
    turns: "generated" (default) replays what the server actually replied, as a real chat client
    does; "reference" replays the dataset's replies, so every server sees byte-identical prompts.
    Prompt lengths come from the server's usage chunk (it applies the chat template). When a turn
    fails the conversation stops and its later turns are recorded as failed.
    """
    chat_cfg = cfg if cfg.endpoint == "chat" else replace(cfg, endpoint="chat")
    records: list[RequestRecord] = []
    per_conv: list[list[RequestRecord]] = []
    for conv in conversations:
        rs = [
            RequestRecord(
                index=len(records) + k,
                expected_output_len=_out_len(cfg, t.expected_output_len),
                conversation_id=conv.id,
                turn=k,
            )
            for k, t in enumerate(conv.turns)
        ]
        records.extend(rs)
        per_conv.append(rs)
    runner = _Runner(chat_cfg, len(conversations), len(records))

    async def session(c: int) -> None:
        await runner.wait_turn(c)
        if runner.sem is None:
            await _converse(c)
        else:
            async with runner.sem:
                await _converse(c)

    async def _converse(c: int) -> None:
        messages: list[dict[str, str]] = []
        for k, (turn, rec) in enumerate(zip(conversations[c].turns, per_conv[c])):
            if k and think_time_s > 0:
                await asyncio.sleep(think_time_s)
            messages.append({"role": "user", "content": turn.user})
            await runner.send(build_body(chat_cfg, None, list(messages), turn.expected_output_len), rec)
            if not rec.success:
                for later in per_conv[c][k + 1 :]:
                    later.error = f"skipped: turn {k} failed"
                    runner.pbar.update(1)
                return
            reply = rec.generated_text if history == "generated" else turn.reference_reply
            messages.append({"role": "assistant", "content": reply})
            if not cfg.keep_text:
                rec.generated_text = ""

    return await runner.run(records, [session(c) for c in range(len(conversations))])


def _out_len(cfg: LoadConfig, sampled: int) -> int:
    return cfg.max_tokens if cfg.max_tokens is not None else sampled
