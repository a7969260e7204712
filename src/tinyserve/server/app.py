"""The FastAPI app: routes, OpenAI-shaped errors, and the engine thread's lifecycle.

Every error leaves as `{"error": {"message", "type", "param", "code"}}`; FastAPI's 422 for a body
that does not parse or type-check becomes OpenAI's 400, and nothing internal (tracebacks, repr of
inputs) reaches the client. The engine thread starts with the app and stops in the lifespan's
shutdown. SIGTERM/SIGINT: new generations get 503 (and /health too) while uvicorn lets in-flight
responses finish for up to --shutdown-timeout; what is left is then aborted; exit 0. If the engine
loop dies, /health answers 503 and the process exits 1, so a supervisor restarts it.
"""

from __future__ import annotations

import argparse
import copy
import logging
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tinyserve import __version__
from tinyserve.engine.async_engine import AsyncEngine
from tinyserve.engine.llm_engine import LLMEngine
from tinyserve.engine_args import engine_config
from tinyserve.server import openai_format as fmt
from tinyserve.server.limits import ServerLimits
from tinyserve.server.metrics import ServerMetrics
from tinyserve.server.middleware import ApiKeyAuth, BodyGuard, resolve_api_key
from tinyserve.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
)
from tinyserve.server.serving import OpenAIServing, StreamResult

log = logging.getLogger("tinyserve.server")

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_STATUS_TYPES = {400: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error",
                 413: "invalid_request_error", 415: "invalid_request_error"}


class _SSEResponse(StreamingResponse):
    """Server-sent events whose engine requests are aborted however the response ends."""

    def __init__(self, result: StreamResult) -> None:
        super().__init__(result.chunks, media_type="text/event-stream", headers=_SSE_HEADERS)
        self._on_close = result.on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """A one-line message and the offending parameter from pydantic's errors (no echoed inputs)."""
    errors = exc.errors()
    if not errors:
        return "invalid request body", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"malformed JSON body: {first.get('ctx', {}).get('error', 'could not parse')}", None
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # Union members show up as extra loc parts ('str', 'list[int]'): keep the field path only.
    path = [p for p in loc if "[" not in p and p not in ("str", "int", "float", "bool", "list", "dict")]
    param = ".".join(path) or None
    msg = first.get("msg", "invalid value")
    more = f" (and {len(errors) - 1} more error(s))" if len(errors) > 1 and not param else ""
    if param is None and first.get("type") in ("model_attributes_type", "dict_type"):
        return "the request body must be a JSON object", None
    return (f"{param}: {msg}" if param else msg) + more, param


def build_app(engine: LLMEngine | AsyncEngine, served_model_names: list[str] | None = None,
              limits: ServerLimits | None = None, api_key: str | None = None,
              tool_call_parser: str = "hermes") -> FastAPI:
    """An app serving `engine`; the engine thread runs while the app's lifespan does. With `api_key`,
    every route but /health, /metrics, /version and /openapi.json needs `Authorization: Bearer <key>`."""
    async_engine = engine if isinstance(engine, AsyncEngine) else AsyncEngine(engine)
    engine = async_engine.engine
    names = list(served_model_names or [engine.model_name])
    limits = limits or ServerLimits()
    metrics = ServerMetrics(names[0])
    metrics.watch_compiled_step(lambda: engine.compiled_step)
    async_engine.set_callbacks(on_finish=metrics.on_finish, on_step=metrics.on_step, on_stats=metrics.on_stats)
    tokenizer = copy.deepcopy(engine.tokenizer)  # the event loop's own: HF tokenizers are not thread-safe
    engine.grammars.compile_timeout_s = limits.grammar_timeout
    serving = OpenAIServing(async_engine, tokenizer, names, metrics, engine.max_len, limits, tool_call_parser)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async_engine.start()
        log.info("serving %s as %s (max_model_len=%d, kv blocks=%d)", engine.model_name, names, engine.max_len,
                 engine.num_blocks)
        try:
            yield
        finally:
            log.info("stopping the engine: aborting what is still in flight")
            async_engine.stop()

    app = FastAPI(title="tinyserve", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.async_engine = async_engine
    app.state.metrics = metrics
    app.state.serving = serving
    # The last added runs first: authentication, then the body's size and type.
    app.add_middleware(BodyGuard, max_bytes=limits.max_request_bytes)
    if api_key:
        app.add_middleware(ApiKeyAuth, api_key=api_key)

    # -- errors -------------------------------------------------------------------------------------
    @app.exception_handler(fmt.ApiError)
    async def _api_error(_: Request, exc: fmt.ApiError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.on_rejected("invalid")
        message, param = _validation_message(exc)
        return JSONResponse(fmt.error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        fallback = "invalid_request_error" if exc.status_code < 500 else "internal_error"
        kind = _STATUS_TYPES.get(exc.status_code, fallback)
        return JSONResponse(fmt.error_body(str(exc.detail), kind, code=exc.status_code),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(fmt.error_body("internal server error", "internal_error", code=500), status_code=500)

    # -- OpenAI -------------------------------------------------------------------------------------
    def _respond(result: Any) -> Response:
        if isinstance(result, StreamResult):
            return _SSEResponse(result)
        return JSONResponse(result.model_dump())

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        return _respond(await serving.completions(req, request))

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
        return _respond(await serving.chat(req, request))

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        cards = [ModelCard(id=n, root=engine.model_name, max_model_len=engine.max_len) for n in names]
        return JSONResponse(ModelList(data=cards).model_dump())

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> JSONResponse:
        serving.check_model(model_id)
        return JSONResponse(ModelCard(id=model_id, root=engine.model_name, max_model_len=engine.max_len).model_dump())

    # -- operations -------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> JSONResponse:
        if not async_engine.is_running:
            return JSONResponse(fmt.error_body("the engine is not running", "service_unavailable"), status_code=503)
        if serving.draining:
            return JSONResponse(fmt.error_body("the server is shutting down", "service_unavailable"), status_code=503)
        return JSONResponse({"status": "ok", "compiled_step": engine.compiled_step})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": __version__})

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> JSONResponse:
        serving.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise fmt.ApiError(400, "give exactly one of prompt or messages", param="prompt")
        if req.messages is not None:
            try:
                ids = tokenizer.apply_chat_template(fmt.chat_messages(req.messages), req.add_generation_prompt)
            except ValueError as e:
                raise fmt.bad_value(e) from None
        else:
            ids = tokenizer.encode(req.prompt or "", add_special_tokens=req.add_special_tokens)
        return JSONResponse({"count": len(ids), "max_model_len": engine.max_len, "tokens": ids})

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> JSONResponse:
        serving.check_model(req.model)
        vocab = engine.model_config.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise fmt.ApiError(400, f"tokens: token id {bad[0]} is out of range [0, {vocab})", param="tokens")
        return JSONResponse({"prompt": tokenizer.decode(req.tokens)})

    return app


class _Server(uvicorn.Server):
    """uvicorn's server that, on SIGTERM/SIGINT, first stops admitting new generations."""

    def __init__(self, config: uvicorn.Config, serving: OpenAIServing) -> None:
        super().__init__(config)
        self.serving = serving

    def handle_exit(self, sig: int, frame: Any) -> None:
        if not self.serving.draining:
            log.info("signal %d: refusing new requests, finishing the ones in flight", sig)
        self.serving.draining = True
        super().handle_exit(sig, frame)


def _listen_socket(host: str, port: int, send_buffer: int) -> socket.socket:
    """The listening socket, with a fixed send buffer that every accepted connection inherits.

    Why: Linux grows a connection's send buffer up to 4 MiB on its own, so a client that stopped
    reading would be noticed only after megabytes of SSE chunks, while its sequence kept generating.
    With a fixed buffer, a stalled stream blocks soon and --stream-buffer aborts it. Token streams
    need a few KB/s, far below what even a small buffer carries."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if send_buffer > 0:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    sock.bind(addr)
    return sock


def run_server(args: argparse.Namespace) -> int:
    """Load the model, then serve until SIGTERM/SIGINT; returns the exit code: 0 after a clean
    shutdown, 1 if the engine died (or the server never started)."""
    config = engine_config(args, compile=args.compile or "background")  # answer at once (config.py)
    async_engine = AsyncEngine.build(lambda: LLMEngine(config))
    app = build_app(async_engine, args.served_model_name, ServerLimits.from_args(args), resolve_api_key(args.api_key),
                    args.tool_call_parser)
    server = _Server(uvicorn.Config(
        app, host=args.host, port=args.port, log_level=str(getattr(args, "log_level", "info")).lower(),
        access_log=args.access_log, timeout_graceful_shutdown=args.shutdown_timeout, timeout_keep_alive=5,
    ), app.state.serving)

    def on_fatal(_: BaseException) -> None:  # on the engine thread: uvicorn polls should_exit
        server.should_exit = True

    async_engine.on_fatal = on_fatal
    sock = _listen_socket(args.host, args.port, args.socket_send_buffer)
    # uvicorn re-raises the signal it shut down for once it is done; with the default handlers that
    # would kill us with 143/130 after a clean shutdown. These no-op handlers make the exit code 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=[sock])
    if async_engine.fatal_error is not None:
        log.critical("exiting with status 1: the engine failed")
        return 1
    return 0 if server.started else 1
