"""`tinyserve bench soak`: minutes of mixed, misbehaving load against a server on 127.0.0.1, checking
that nothing is lost and nothing leaks.

Clients loop until the deadline, each request drawn at random: a completion or a chat (greedy), a
stream read to the end, a stream dropped after a chunk or two, a request given up mid-way, or a
malformed one. Every outcome is classified: `ok` (the text equals the greedy text the fresh server
gave: on the exact fp32 path a request's greedy text does not depend on its batch), `cancelled` (the
client left), `refused` (503, the bounded queue is full: a clean answer under overload), `rejected`
(the expected 400), or `lost` (anything else: a 5xx, a broken stream, a wrong text, a hang). Meanwhile
the server's RSS, KV usage and queue depths are sampled. It passes when nothing was lost, the server
returns to idle with every KV block free, and RSS grew by no more than the limit between the first
and last tenth of the run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import shlex
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from .env_info import run_header, save_json

RESULT_SCHEMA = "tinyserve_lab.soak/1"
PROMPTS = [
    "The capital of France is", "Water boils at", "Once upon a time", "def fibonacci(n):",
    "The best way to learn Python is", "In 1492,", "My favourite food is", "Paged attention works by",
]
MAX_TOKENS = [6, 12, 16, 8]  # prompt i asks for MAX_TOKENS[i % 4]: references are per prompt
KINDS = {"complete": 3, "chat": 2, "stream": 3, "stream_drop": 2, "cancel": 1, "bad": 1}  # kind -> weight
BAD_BODIES = [b'{"prompt": "hi", "max_tokens": -1}', b'{"prompt": "hi", "temperature": NaN}',
              b'{"prompt": "hi", "unknown_field": 1}', b'{"prompt": ', b'{"messages": []}']
DEFAULT_SERVER_ARGS = "--dtype float32 --enforce-eager --max-num-seqs 8 --max-waiting 16 --kv-cache-memory-gb 0.25"


def add_soak_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--concurrency", type=int, default=16, help="clients, each sending one request at a time")
    parser.add_argument("--server-args", default=DEFAULT_SERVER_ARGS,
                        help="flags for the server this command starts on 127.0.0.1 (fp32: texts are checked exactly)")
    parser.add_argument("--base-url", default=None,
                        help="soak a running server instead (http://127.0.0.1:PORT); RSS needs --server-pid")
    parser.add_argument("--server-pid", type=int, default=None, help="pid of the server at --base-url")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--no-check-text", action="store_true",
                        help="do not compare texts (a server off the exact fp32 path)")
    parser.add_argument("--rss-growth-limit-mb", type=float, default=64.0,
                        help="largest RSS growth, first vs last tenth of the run, that still passes")
    parser.add_argument("--sample-every", type=float, default=0.5, help="seconds between RSS/KV samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--result-dir", default="results/soak", help="where the JSON and the plot go")


@dataclass
class Outcome:
    kind: str
    status: str  # ok | cancelled | refused | rejected | lost
    start: float
    end: float
    detail: str = ""


class _Soak:
    def __init__(self, base_url: str, args: argparse.Namespace, pid: int | None) -> None:
        self.url = base_url.rstrip("/")
        self.args = args
        self.headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        self.pid = pid
        self.outcomes: list[Outcome] = []
        self.samples: list[dict[str, float]] = []
        self.refs: dict[tuple[str, int], str] = {}
        self.t0 = time.monotonic()

    # -- requests ------------------------------------------------------------------------------
    @staticmethod
    def body(endpoint: str, p: int, stream: bool = False) -> dict[str, Any]:
        body: dict[str, Any] = {"max_tokens": MAX_TOKENS[p % len(MAX_TOKENS)], "temperature": 0, "stream": stream}
        if endpoint == "chat":
            body["messages"] = [{"role": "user", "content": PROMPTS[p]}]
        else:
            body["prompt"] = PROMPTS[p]
        return body

    def path(self, endpoint: str) -> str:
        return self.url + ("/v1/chat/completions" if endpoint == "chat" else "/v1/completions")

    def judge(self, endpoint: str, p: int, text: str) -> tuple[str, str]:
        ref = self.refs.get((endpoint, p))
        if self.args.no_check_text or ref is None or text == ref:
            return "ok", ""
        return "lost", f"text differs from the fresh server's: {text!r} != {ref!r}"

    async def references(self, client: httpx.AsyncClient) -> None:
        for endpoint in ("completions", "chat"):
            for p in range(len(PROMPTS)):
                r = await client.post(self.path(endpoint), json=self.body(endpoint, p), headers=self.headers)
                r.raise_for_status()
                self.refs[endpoint, p] = _text(r.json(), endpoint)

    async def one(self, client: httpx.AsyncClient, rng: random.Random) -> Outcome:
        kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
        p = rng.randrange(len(PROMPTS))
        start = time.monotonic() - self.t0
        try:
            status, detail = await asyncio.wait_for(self._send(client, kind, p, rng), timeout=120)
        except TimeoutError:
            status, detail = "lost", "no answer within 120 s"
        except httpx.HTTPError as e:
            status, detail = "lost", f"{type(e).__name__}: {e}"
        return Outcome(kind, status, start, time.monotonic() - self.t0, detail[:300])

    async def _send(self, client: httpx.AsyncClient, kind: str, p: int, rng: random.Random) -> tuple[str, str]:
        if kind == "bad":
            r = await client.post(self.url + "/v1/completions", content=rng.choice(BAD_BODIES),
                                  headers={**self.headers, "content-type": "application/json"})
            if r.status_code == 400 and "error" in r.json():
                return "rejected", ""
            return "lost", f"HTTP {r.status_code}: {r.text[:200]}"
        endpoint = "chat" if kind == "chat" else "completions"
        if kind in ("complete", "chat", "cancel"):
            req = client.post(self.path(endpoint), json=self.body(endpoint, p), headers=self.headers)
            if kind == "cancel":
                try:
                    r = await asyncio.wait_for(req, timeout=rng.uniform(0.05, 1.5))
                except TimeoutError:
                    return "cancelled", ""
            else:
                r = await req
            return self._answer(r, endpoint, p)
        drop_after = rng.randint(1, 3) if kind == "stream_drop" else None
        async with client.stream("POST", self.path(endpoint), json=self.body(endpoint, p, stream=True),
                                 headers=self.headers) as r:
            if r.status_code != 200:
                await r.aread()
                return self._answer(r, endpoint, p)
            text, chunks = "", 0
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    return self.judge(endpoint, p, text)
                obj = json.loads(line[6:])
                if "error" in obj:
                    return "lost", f"stream error: {obj['error']}"
                text += _text(obj, endpoint)
                chunks += 1
                if drop_after is not None and chunks >= drop_after:
                    return "cancelled", ""  # leaving the block closes the connection mid-stream
        return "lost", "stream ended without [DONE]"

    def _answer(self, r: httpx.Response, endpoint: str, p: int) -> tuple[str, str]:
        if r.status_code == 200:
            return self.judge(endpoint, p, _text(r.json(), endpoint))
        if r.status_code == 503 and "error" in r.json():
            return "refused", ""
        return "lost", f"HTTP {r.status_code}: {r.text[:200]}"

    # -- monitoring ----------------------------------------------------------------------------
    def sample(self) -> dict[str, float]:
        m = _metrics(self.url)
        s = {"t": time.monotonic() - self.t0, "kv_usage": m.get("tinyserve_kv_cache_usage_ratio", float("nan")),
             "running": m.get("tinyserve_requests_running", float("nan")),
             "waiting": m.get("tinyserve_requests_waiting", float("nan")), "done": float(len(self.outcomes))}
        if self.pid is not None:
            import psutil

            s["rss_mb"] = psutil.Process(self.pid).memory_info().rss / 2**20
        self.samples.append(s)
        return s

    async def monitor(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.to_thread(self.sample)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.args.sample_every)

    async def run(self) -> None:
        limits = httpx.Limits(max_connections=self.args.concurrency + 4)
        async with httpx.AsyncClient(timeout=httpx.Timeout(120), limits=limits, trust_env=False) as client:
            await self.references(client)
            self.t0 = time.monotonic()
            deadline = self.t0 + self.args.duration
            stop = asyncio.Event()
            monitor = asyncio.create_task(self.monitor(stop))
            bar = tqdm(total=int(self.args.duration), desc="soak (s)", leave=False)

            async def client_loop(i: int) -> None:
                rng = random.Random(self.args.seed * 1000 + i)
                while time.monotonic() < deadline:
                    outcome = await self.one(client, rng)
                    self.outcomes.append(outcome)
                    if outcome.status == "refused":  # a polite client backs off (the 503 says Retry-After)
                        await asyncio.sleep(rng.uniform(0.2, 1.0))
                    bar.n = min(int(time.monotonic() - self.t0), bar.total)
                    bar.refresh()

            await asyncio.gather(*(client_loop(i) for i in range(self.args.concurrency)))
            bar.close()
            stop.set()
            await monitor


def _text(obj: dict[str, Any], endpoint: str) -> str:
    choices = obj.get("choices") or []
    if not choices:
        return ""
    c = choices[0]
    if endpoint == "chat":
        return (c.get("message") or c.get("delta") or {}).get("content") or ""
    return c.get("text") or ""


def _metrics(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            name = key.split("{", 1)[0]
            out[name] = out.get(name, 0.0) + float(value)
    return out


def _wait_idle(soak: _Soak, timeout: float = 60.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        s = soak.sample()
        if (s["running"], s["waiting"], s["kv_usage"]) == (0, 0, 0) or time.monotonic() > deadline:
            return s
        time.sleep(0.25)


def summarize(soak: _Soak, idle: dict[str, float], args: argparse.Namespace) -> dict[str, Any]:
    by_status = Counter(o.status for o in soak.outcomes)
    by_kind = {k: dict(Counter(o.status for o in soak.outcomes if o.kind == k)) for k in KINDS}
    rss = [s["rss_mb"] for s in soak.samples if "rss_mb" in s and s["t"] <= args.duration]
    tenth = max(1, len(rss) // 10)
    growth = statistics.median(rss[-tenth:]) - statistics.median(rss[:tenth]) if rss else None
    checks = {
        "no_request_lost": by_status["lost"] == 0,
        "some_requests_ok": by_status["ok"] > 0,
        "idle_with_kv_free": (idle["running"], idle["waiting"], idle["kv_usage"]) == (0, 0, 0),
        "rss_growth_bounded": growth is None or growth <= args.rss_growth_limit_mb,
    }
    return {
        "requests": len(soak.outcomes), "by_status": dict(by_status), "by_kind": by_kind,
        "lost": [asdict(o) for o in soak.outcomes if o.status == "lost"][:20],
        "max_in_flight": max((s["running"] + s["waiting"] for s in soak.samples), default=0),
        "max_kv_usage": max((s["kv_usage"] for s in soak.samples), default=0),
        "kv_usage_after": idle["kv_usage"],
        "rss_mb_first": rss[0] if rss else None, "rss_mb_max": max(rss) if rss else None,
        "rss_mb_last": rss[-1] if rss else None, "rss_growth_mb": growth,
        "checks": checks, "passed": all(checks.values()),
    }


def plot(samples: list[dict[str, float]], outcomes: list[Outcome], path: Path, title: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 6.5), layout="constrained")
    ax_rss, ax_kv, ax_done = fig.subplots(3, 1, sharex=True)
    t = [s["t"] for s in samples]
    if any("rss_mb" in s for s in samples):
        ax_rss.plot([s["t"] for s in samples if "rss_mb" in s], [s["rss_mb"] for s in samples if "rss_mb" in s])
    ax_rss.set_ylabel("server RSS (MiB)")
    ax_rss.set_title(title)
    ax_kv.plot(t, [100 * s["kv_usage"] for s in samples], label="KV blocks in use (%)")
    ax_kv.plot(t, [s["running"] for s in samples], label="running requests")
    ax_kv.plot(t, [s["waiting"] for s in samples], label="waiting requests")
    ax_kv.legend(loc="upper right", fontsize=8)
    for status in ("ok", "cancelled", "refused", "rejected", "lost"):
        ends = sorted(o.end for o in outcomes if o.status == status)
        if ends:
            ax_done.step(ends, range(1, len(ends) + 1), where="post", label=status)
    ax_done.set_ylabel("requests done")
    ax_done.set_xlabel("seconds")
    ax_done.legend(loc="upper left", fontsize=8)
    fig.savefig(path, dpi=110)


def run_soak(args: argparse.Namespace) -> dict[str, Any]:
    import logging

    from tinyserve_lab.launcher import ServerProcess

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would bury the summary

    server = None
    if args.base_url is None:
        server_args = shlex.split(args.server_args)
        if args.api_key:
            server_args += ["--api-key", args.api_key]
        server = ServerProcess(server_args).start()
        assert server.proc is not None
        base_url, pid = server.url, server.proc.pid
    else:
        base_url, pid = args.base_url, args.server_pid
    try:
        soak = _Soak(base_url, args, pid)
        asyncio.run(soak.run())
        idle = _wait_idle(soak)
        summary = summarize(soak, idle, args)
        healthy = httpx.get(base_url + "/health", timeout=10).status_code == 200
        summary["checks"]["healthy_after"] = healthy
        summary["passed"] = summary["passed"] and healthy
    finally:
        if server is not None:
            server.stop()
    result = {**run_header(RESULT_SCHEMA), "config": {k: v for k, v in vars(args).items() if k != "func"},
              "summary": summary, "samples": soak.samples, "outcomes": [asdict(o) for o in soak.outcomes]}
    s = summary
    print(f"soak {args.duration:g} s x {args.concurrency} clients: {s['requests']} requests {s['by_status']}; "
          f"max in flight {s['max_in_flight']:g}, max KV {100 * s['max_kv_usage']:.0f}%, KV after "
          f"{100 * s['kv_usage_after']:.0f}%; RSS {s['rss_mb_first'] or 0:.0f} -> {s['rss_mb_last'] or 0:.0f} MiB "
          f"(growth {s['rss_growth_mb'] or 0:+.1f}); {'PASSED' if s['passed'] else 'FAILED'} {s['checks']}")
    if args.result_dir:
        path = save_json(result, Path(args.result_dir), f"soak-{int(args.duration)}s-c{args.concurrency}")
        png = path.with_suffix(".png")
        plot(soak.samples, soak.outcomes, png,
             f"soak: {args.duration:g} s, {args.concurrency} clients, {s['requests']} requests, "
             f"lost {s['by_status'].get('lost', 0)}")
        summary["files"] = [str(path), str(png)]
        print(f"wrote {path} and {png}")
    return summary


def soak_exit_code(args: argparse.Namespace) -> int:
    """`tinyserve bench soak`: 0 if the soak passed, 1 if not."""
    return 0 if run_soak(args)["passed"] else 1
