"""One HTTP request through an ASGI app in this process, its response streamed back piece by piece.

A replica runs the server's own FastAPI app (validation, error shapes, streaming: server/app.py) and
the ingress hands it each request as bytes: this is the call between them. httpx's ASGI transport would
buffer a whole response, which defeats streaming; the protocol itself is small enough to speak here.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Head:
    """A response's status and headers: the first thing a call yields."""

    status: int
    headers: list[tuple[bytes, bytes]]


async def call_app(app: Any, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]],
                   body: bytes) -> AsyncIterator[Head | bytes]:
    """Run `app` on one request; yield its `Head`, then its body chunks as the app sends them. Closing
    the iterator early tells the app the client disconnected (a stream's request is aborted)."""
    sent: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    gone = asyncio.Event()
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query,
             "root_path": "", "headers": headers, "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0)}
    task = asyncio.ensure_future(app(scope, receive, sent.put))
    try:
        while True:
            if task.done():  # what it sent before returning, then its exception if it raised
                if sent.empty():
                    task.result()
                    return
                msg = sent.get_nowait()
            else:
                get = asyncio.ensure_future(sent.get())
                await asyncio.wait({get, task}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    continue
                msg = get.result()
            if msg["type"] == "http.response.start":
                yield Head(msg["status"], list(msg.get("headers", [])))
            elif msg["type"] == "http.response.body":
                if msg.get("body"):
                    yield msg["body"]
                if not msg.get("more_body", False):
                    return
    finally:
        gone.set()
        if not task.done():
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(task, 10)
