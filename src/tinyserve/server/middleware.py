"""The ASGI guards in front of every route: API-key authentication, then the body's size and type.

Middleware rather than route dependencies, so unknown paths and wrong methods get 401 too (an
unauthenticated caller learns nothing about which routes exist), and an enormous or non-JSON body is
refused after a bounded read, before anything parses it. Errors are OpenAI-shaped, as everywhere.
"""

from __future__ import annotations

import hmac
import json
import os
from typing import Any

from tinyserve.server import openai_format as fmt

ASGIApp = Any  # (scope, receive, send) -> awaitable; starlette's types add nothing here
API_KEY_ENV = "TINYSERVE_API_KEY"
# Open as in vLLM: supervisors and scrapers hold no key. /openapi.json describes the API, not its data.
OPEN_PATHS = frozenset({"/health", "/metrics", "/version", "/openapi.json"})


async def send_error(send: Any, status: int, message: str, code: str | None = None,
                     headers: dict[str, str] | None = None) -> None:
    """An OpenAI-shaped JSON error straight from ASGI (these guards answer before any route runs)."""
    body = json.dumps(fmt.error_body(message, "invalid_request_error", code=code)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def resolve_api_key(flag: str | None) -> str | None:
    """--api-key, else $TINYSERVE_API_KEY; None (no authentication) when neither is set or both are empty."""
    key = flag if flag is not None else os.environ.get(API_KEY_ENV)
    return key or None


class ApiKeyAuth:
    """`Authorization: Bearer <key>`, compared in constant time; the key is never logged."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        if not hmac.compare_digest(given, self._expected):
            return await send_error(send, 401, "Incorrect API key provided: send it as 'Authorization: Bearer <key>'.",
                                    code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        await self.app(scope, receive, send)


def _is_json(content_type: str) -> bool:
    mime = content_type.split(";", 1)[0].strip().lower()
    return mime == "application/json" or (mime.startswith("application/") and mime.endswith("+json"))


class BodyGuard:
    """413 for a body over `max_bytes` (by Content-Length, or counted as it arrives), 415 for a body
    that is not JSON. The body is read here, bounded, and replayed to the app; later `receive()`
    calls (the app's disconnect watch) pass through untouched."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        ctype = headers.get(b"content-type", b"").decode("latin-1")
        if ctype and not _is_json(ctype):
            return await send_error(send, 415, f"Content-Type must be application/json, got {ctype[:80]!r}",
                                    code="unsupported_media_type")
        too_big = f"request body exceeds the limit of {self.max_bytes} bytes"
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await send_error(send, 413, too_big, code="request_too_large")
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await send_error(send, 413, too_big, code="request_too_large")
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
