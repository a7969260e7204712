"""The OpenAI endpoints' logic: submit to the `AsyncEngine`, then stream SSE chunks or assemble one
response. FastAPI wiring lives in app.py; the wire format in protocol.py / openai_format.py.

A completions request with several prompts becomes one engine request per prompt (choice index =
prompt index * n + sample index); all of them feed one asyncio.Queue. If the client goes away
(stream cancelled, or the connection drops while we wait), every unfinished engine request is
aborted so its KV blocks are freed at once. So is a request that outlives --request-timeout, and a
stream whose client stops reading: its queue would otherwise grow by one update per step while the
engine keeps the sequence's KV blocks; past --stream-buffer unread updates it is aborted.

Prompts are tokenized here, on the event loop's own tokenizer, so that a prompt plus max_tokens
longer than the context is refused before it reaches the engine, with vLLM's message.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from jinja2 import TemplateError
from starlette.requests import Request

from tinyserve.engine.async_engine import AsyncEngine, EngineDeadError, QueueFullError, RequestUpdate, SeqDelta
from tinyserve.engine.sequence import TokenLogprobs
from tinyserve.sampling import SamplingParams, StructuredOutputsParams
from tinyserve.server import openai_format as fmt
from tinyserve.server.limits import ServerLimits
from tinyserve.server.metrics import ServerMetrics
from tinyserve.server.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    PromptTokensDetails,
    ToolCallOut,
    Usage,
)
from tinyserve.structured.tool_formats import TOOL_FORMATS, ToolCall, ToolCallDelta, ToolCallStream
from tinyserve.tokenizer import TokenText

log = logging.getLogger("tinyserve.server")
_ERROR_TYPES = {500: "internal_error", 504: "timeout"}


@dataclass
class _Choice:
    """One choice being assembled: text, token count, logprobs so far."""

    text: str = ""
    num_tokens: int = 0
    logprobs: list[Any] = field(default_factory=list)
    prompt_logprobs: list[Any] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: str | None = None


class _Sink(asyncio.Queue):
    """A request's update queue that calls `on_overflow` (once) when more than `limit` updates sit
    unread. Updates are never dropped: after the abort only the final one can follow."""

    def __init__(self, limit: int, on_overflow: Callable[[], None]) -> None:
        super().__init__()
        self.limit = limit
        self.on_overflow: Callable[[], None] | None = on_overflow

    def put_nowait(self, item: RequestUpdate) -> None:
        super().put_nowait(item)
        if self.qsize() > self.limit and self.on_overflow is not None:
            callback, self.on_overflow = self.on_overflow, None
            callback()


class RequestGroup:
    """The engine requests behind one HTTP request, and their merged update stream."""

    def __init__(self, engine: AsyncEngine, request_id: str, n: int, limits: ServerLimits | None = None) -> None:
        self.engine = engine
        self.request_id = request_id
        self.n = n
        self.limits = limits or ServerLimits()
        self.sink: asyncio.Queue[RequestUpdate] = _Sink(self.limits.stream_buffer, self._stalled)
        # Set when the server itself ends the request: what its aborted choices report, and the status.
        self.fail_reason: str | None = None
        self.fail_status = 500
        self._timer: asyncio.TimerHandle | None = None
        self.sub_ids: list[str] = []
        self.prompt_token_ids: list[list[int]] = []
        self.cached_tokens: dict[str, int] = {}  # per engine request, from its final update
        self.unfinished: set[str] = set()
        self.choices: dict[int, _Choice] = {}
        self.start = time.monotonic()
        self.first_token_at: float | None = None

    async def submit(self, prompts: list[str | list[int]], params: SamplingParams,
                     metrics: ServerMetrics, param_renames: dict[str, str] | None = None, priority: int = 0) -> None:
        """Queue every prompt, or none: on the first refusal the ones already queued are aborted."""
        try:
            for i, prompt in enumerate(prompts):
                rid = f"{self.request_id}-{i}" if len(prompts) > 1 else self.request_id
                # Recorded before the await: if we are cancelled while the engine thread is adding
                # it, abort() still reaches it (commands are handled in order).
                self.sub_ids.append(rid)
                self.unfinished.add(rid)
                added = await self.engine.add_request(rid, prompt, params, self.sink, priority)
                self.prompt_token_ids.append(added.prompt_token_ids)
        except BaseException as e:
            self.abort()
            if isinstance(e, QueueFullError):
                metrics.on_rejected("queue_full")
                raise fmt.ApiError(503, f"server overloaded: {e}", type="server_overloaded",
                                   code="queue_full") from None
            if isinstance(e, EngineDeadError):
                raise fmt.ApiError(503, str(e), type="service_unavailable") from None
            if isinstance(e, ValueError):
                metrics.on_rejected("invalid")
                raise fmt.bad_value(e, param_renames) from None
            raise
        for c in range(len(prompts) * self.n):
            self.choices[c] = _Choice()
        metrics.on_admitted(sum(map(len, self.prompt_token_ids)))
        limit = self.limits.request_timeout
        if limit > 0:
            self._timer = asyncio.get_running_loop().call_later(
                limit, self.fail, f"the request exceeded the server's time limit of {limit:g} s", 504)

    def fail(self, reason: str, status: int) -> None:
        """End the request from the server side: its choices finish with an error saying why."""
        if self.fail_reason is None and self.unfinished:
            self.fail_reason, self.fail_status = reason, status
            log.warning("%s aborted: %s", self.request_id, reason)
            self.abort()

    def _stalled(self) -> None:
        self.fail(f"the client read too slowly: {self.limits.stream_buffer} updates were left unread", 500)

    def choice_index(self, rid: str, seq_index: int) -> int:
        return self.sub_ids.index(rid) * self.n + seq_index

    async def updates(self) -> AsyncIterator[tuple[int, SeqDelta]]:
        """(choice index, delta) pairs until every engine request has finished; also records them."""
        while self.unfinished:
            update = await self.sink.get()
            if update.finished:
                self.unfinished.discard(update.request_id)
                self.cached_tokens[update.request_id] = update.num_cached_tokens
                if not self.unfinished and self._timer is not None:
                    self._timer.cancel()
            for d in update.deltas:
                if d.finish_reason == "abort" and self.fail_reason is not None:
                    d = replace(d, finish_reason="error", error=self.fail_reason)
                c = self.choice_index(update.request_id, d.index)
                ch = self.choices[c]
                ch.text += d.text
                ch.num_tokens += len(d.token_ids)
                ch.logprobs.extend(d.logprobs)
                if d.prompt_logprobs is not None:
                    ch.prompt_logprobs = d.prompt_logprobs
                if d.token_ids and self.first_token_at is None:
                    self.first_token_at = time.monotonic()
                if d.finish_reason is not None:
                    ch.finish_reason, ch.stop_reason, ch.error = d.finish_reason, d.stop_reason, d.error
                yield c, d

    async def drain(self) -> None:
        async for _ in self.updates():
            pass

    def abort(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for rid in self.unfinished:
            self.engine.abort(rid)

    def usage(self) -> Usage:
        prompt = sum(map(len, self.prompt_token_ids))
        completion = sum(c.num_tokens for c in self.choices.values())
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(self.cached_tokens.values())))

    def error(self) -> str | None:
        return next((c.error or "internal error" for c in self.choices.values() if c.finish_reason == "error"), None)

    def log_done(self, kind: str, stream: bool, status: str = "ok") -> None:
        u = self.usage()
        reasons = ",".join(sorted({c.finish_reason or "-" for c in self.choices.values()}))
        ttft = f"{self.first_token_at - self.start:.3f}s" if self.first_token_at else "-"
        log.info("%s %s stream=%s prompt_tokens=%d completion_tokens=%d finish=%s ttft=%s e2e=%.3fs %s",
                 self.request_id, kind, stream, u.prompt_tokens, u.completion_tokens, reasons, ttft,
                 time.monotonic() - self.start, status)


def _tool_call_out(call: ToolCall) -> ToolCallOut:
    return ToolCallOut(id=call.id, function=FunctionCall(name=call.name, arguments=call.arguments))


def _finish_reason(reason: str | None, calls: list[ToolCall]) -> str | None:
    """OpenAI's: an output that ended by itself after making calls finished to have them run."""
    return "tool_calls" if calls and reason == "stop" else reason


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect_or_abort(group: RequestGroup, request: Request) -> None:
    """Wait for the whole result, but abort the engine requests if the client hangs up meanwhile."""
    work = asyncio.ensure_future(group.drain())
    gone = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
            group.abort()
            group.log_done("request", False, "client disconnected")
    if not work.done() or work.cancelled():
        raise fmt.ApiError(499, "client disconnected", code="client_closed_request")
    work.result()


@dataclass
class StreamResult:
    """An SSE body plus what to call when the response ends for any reason (done, client gone,
    shutdown): a generator that never started would not run its own `finally`."""

    chunks: AsyncIterator[str]
    on_close: Callable[[], None]


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, tokenizer: Any, served_model_names: list[str], metrics: ServerMetrics,
                 max_model_len: int, limits: ServerLimits | None = None, tool_call_parser: str = "hermes") -> None:
        self.engine = engine
        self.tool_format = TOOL_FORMATS[tool_call_parser]()
        self.limits = limits or ServerLimits()
        self.tokenizer = tokenizer  # the HTTP side's own copy: never shared with the engine thread
        self.names = served_model_names
        self.metrics = metrics
        self.max_model_len = max_model_len
        self.token_text = TokenText(tokenizer)

        self.draining = False  # set on SIGTERM/SIGINT: new generations get 503 while in-flight ones finish

    @property
    def model_name(self) -> str:
        return self.names[0]

    def check_admitting(self) -> None:
        if self.draining:
            raise fmt.ApiError(503, "the server is shutting down", type="service_unavailable")

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.names:
            self.metrics.on_rejected("invalid")
            raise fmt.ApiError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")

    # -- /v1/completions --------------------------------------------------------------------------
    async def completions(self, req: CompletionRequest, request: Request) -> CompletionResponse | StreamResult:
        self.check_admitting()
        self.check_model(req.model)
        try:
            params = fmt.completion_params(req)
            prompts = fmt.completion_prompts(req.prompt)
            try:
                self.limits.check_sampling(params.n, req.stop)
                self.limits.check_prompts(len(prompts))
            except ValueError as e:
                raise fmt.bad_value(e) from None
            encoded: list[str | list[int]] = [self._encode(p) if isinstance(p, str) else p for p in prompts]
            for ids in encoded:
                self._check_length(len(ids), params.max_tokens, "prompt", "max_tokens")
        except fmt.ApiError:
            self.metrics.on_rejected("invalid")
            raise
        group = RequestGroup(self.engine, f"cmpl-{uuid.uuid4().hex}", params.n, self.limits)
        await group.submit(encoded, params, self.metrics, priority=req.priority)
        echo = None  # per prompt: the text and token ids to echo
        if req.echo:
            echo = [(self._prompt_text(p, ids), ids) for p, ids in zip(prompts, group.prompt_token_ids)]
        if req.stream:
            return StreamResult(self._completion_stream(group, req, echo), group.abort)
        await collect_or_abort(group, request)
        self._raise_if_failed(group, "completion")
        choices = []
        for c, ch in sorted(group.choices.items()):
            prompt = echo[c // group.n] if echo else None
            text, lps, _ = self._completion_piece(req, prompt, ch.prompt_logprobs, ch.text, ch.logprobs, 0)
            scored = None if ch.prompt_logprobs is None else fmt.prompt_logprobs(ch.prompt_logprobs, self.token_text)
            choices.append(CompletionChoice(index=c, text=text, logprobs=lps, finish_reason=ch.finish_reason,
                                            stop_reason=ch.stop_reason, prompt_logprobs=scored))
        group.log_done("completion", False)
        return CompletionResponse(id=group.request_id, model=self.model_name, choices=choices, usage=group.usage())

    def _completion_piece(self, req: CompletionRequest, echo: tuple[str, list[int]] | None,
                          prompt_lps: list[TokenLogprobs | None] | None, text: str, lps: list[TokenLogprobs],
                          offset: int) -> tuple[str, CompletionLogprobs | None, int]:
        """A choice's text and legacy logprobs from `offset` on, and the next offset. With `echo` (the
        prompt's text and ids, on the choice's first piece) the prompt comes first, its tokens' logprobs
        too: the first one null, as OpenAI and vLLM send it (all null if it ended before being scored)."""
        ids = [lp.token_id for lp in lps]
        all_lps: Sequence[TokenLogprobs | None] = lps
        if echo is not None:
            echo_text, prompt_ids = echo
            text, ids = echo_text + text, prompt_ids + ids
            all_lps = [*(prompt_lps or [None] * len(prompt_ids)), *lps]
        if req.logprobs is None:
            return text, None, offset
        return text, *fmt.completion_logprobs(all_lps, self.token_text, offset, ids)

    def _completion_stream(self, group: RequestGroup, req: CompletionRequest,
                           echo: list[tuple[str, list[int]]] | None) -> AsyncIterator[str]:
        created = int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        offsets: dict[int, int] = {}

        def chunk(c: int, text: str, lps: Any = None, finish: str | None = None, stop: Any = None) -> str:
            choice = CompletionChoice(index=c, text=text, logprobs=lps, finish_reason=finish, stop_reason=stop)
            return fmt.sse(fmt.chunk_payload(
                CompletionChunk(id=group.request_id, created=created, model=self.model_name, choices=[choice]),
                include_usage))

        def render(c: int, d: SeqDelta) -> Iterator[str]:
            # As vLLM: the echo opens the choice's first chunk, with the prompt's logprobs (scored by then).
            prompt = echo[c // group.n] if echo and c not in offsets else None
            text, lps, offsets[c] = self._completion_piece(req, prompt, d.prompt_logprobs, d.text, d.logprobs,
                                                           offsets.get(c, 0))
            if text or d.finish_reason or (lps is not None and lps.tokens):
                yield chunk(c, text, lps, d.finish_reason, d.stop_reason)

        usage = (lambda: CompletionChunk(id=group.request_id, created=created, model=self.model_name, choices=[],
                                         usage=group.usage())) if include_usage else None
        return self._stream(group, "completion", [], render, usage)

    # -- /v1/chat/completions ---------------------------------------------------------------------
    async def chat(self, req: ChatCompletionRequest, request: Request) -> ChatCompletionResponse | StreamResult:
        self.check_admitting()
        self.check_model(req.model)
        try:
            tools, forced = fmt.chat_tools(req)
            params = fmt.chat_params(req, self._forced_call(forced))
            messages = fmt.chat_messages(req.messages)
            if not self.tokenizer.renders_tools:
                messages, tools = fmt.inline_tools(messages, tools, self.tool_format), None
            try:
                self.limits.check_sampling(params.n, req.stop)
                self.limits.check_messages(len(messages))
                prompt = self.tokenizer.apply_chat_template(messages, req.add_generation_prompt, tools)
            except ValueError as e:
                raise fmt.bad_value(e) from None
            except (TemplateError, TypeError, KeyError) as e:  # the template rejects this conversation
                raise fmt.ApiError(400, f"messages: the chat template rejected them: {e}", param="messages") from None
            self._check_length(len(prompt), params.max_tokens, "messages",
                               "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens")
        except fmt.ApiError:
            self.metrics.on_rejected("invalid")
            raise
        group = RequestGroup(self.engine, f"chatcmpl-{uuid.uuid4().hex}", params.n, self.limits)
        renames = {"prompt": "messages", "structured_outputs": "tools" if forced else
                   "response_format" if req.response_format else "structured_outputs"}
        await group.submit([prompt], params, self.metrics, renames, req.priority)
        calls_wanted = bool(req.tools) and req.tool_choice != "none"  # the output is searched for tool calls
        if req.stream:
            return StreamResult(self._chat_stream(group, req, calls_wanted), group.abort)
        await collect_or_abort(group, request)
        self._raise_if_failed(group, "chat")
        choices = []
        for c, ch in sorted(group.choices.items()):
            content, calls = self.tool_format.parse(ch.text) if calls_wanted else (ch.text, [])
            message = ChatResponseMessage(content=content if content.strip() or not calls else None,
                                          tool_calls=[_tool_call_out(t) for t in calls])
            choices.append(ChatChoice(
                index=c, message=message,
                logprobs=fmt.chat_logprobs(ch.logprobs, self.token_text) if req.logprobs else None,
                finish_reason=_finish_reason(ch.finish_reason, calls), stop_reason=ch.stop_reason))
        group.log_done("chat", False)
        return ChatCompletionResponse(id=group.request_id, model=self.model_name, choices=choices,
                                      usage=group.usage())

    def _forced_call(self, tools: list[dict[str, Any]] | None) -> StructuredOutputsParams | None:
        """The grammar of one call, framed as the model writes calls, to one of `tools`."""
        if tools is None:
            return None
        f = self.tool_format
        try:
            # one line, as the model writes its calls
            return StructuredOutputsParams(json=f.call_schema(tools), begin=f.begin, end=f.end,
                                           disable_any_whitespace=True)
        except ValueError as e:
            raise fmt.ApiError(400, f"tools: {e}", param="tools") from None

    def _chat_stream(self, group: RequestGroup, req: ChatCompletionRequest, calls_wanted: bool) -> AsyncIterator[str]:
        created = int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        # Per choice: the tool-call splitter and the calls it has found so far (each call is one delta).
        splitters = {c: ToolCallStream(self.tool_format) for c in group.choices} if calls_wanted else {}
        found: dict[int, int] = dict.fromkeys(group.choices, 0)

        def chunk(choice: ChatChunkChoice) -> str:
            return fmt.sse(fmt.chunk_payload(
                ChatCompletionChunk(id=group.request_id, created=created, model=self.model_name, choices=[choice]),
                include_usage))

        def render(c: int, d: SeqDelta) -> Iterator[str]:
            lps = fmt.chat_logprobs(d.logprobs, self.token_text) if req.logprobs and d.logprobs else None
            text, calls = d.text, list[ToolCallDelta]()
            if c in splitters:
                text, calls = splitters[c].feed(d.text)
                if d.finish_reason is not None:
                    text += splitters[c].finish()
            if text or lps is not None:
                yield chunk(ChatChunkChoice(index=c, delta=DeltaMessage(content=text), logprobs=lps))
            for t in calls:  # as OpenAI streams a call: id, type and name first, then its arguments in pieces
                yield chunk(ChatChunkChoice(index=c, delta=DeltaMessage(tool_calls=[DeltaToolCall(
                    index=t.index, id=t.id, type="function" if t.id else None,
                    function=DeltaFunctionCall(name=t.name, arguments=t.arguments))])))
                found[c] += t.name is not None
            if d.finish_reason is not None:
                reason = "tool_calls" if found[c] and d.finish_reason == "stop" else d.finish_reason
                yield chunk(ChatChunkChoice(index=c, delta=DeltaMessage(), finish_reason=reason,
                                            stop_reason=d.stop_reason))

        usage = (lambda: ChatCompletionChunk(id=group.request_id, created=created, model=self.model_name, choices=[],
                                             usage=group.usage())) if include_usage else None
        # OpenAI opens every choice with the role.
        opening = [chunk(ChatChunkChoice(index=c, delta=DeltaMessage(role="assistant", content="")))
                   for c in group.choices]
        return self._stream(group, "chat", opening, render, usage)

    async def _stream(self, group: RequestGroup, kind: str, opening: list[str],
                      render: Callable[[int, SeqDelta], Iterator[str]], usage: Callable[[], Any] | None,
                      ) -> AsyncIterator[str]:
        """What every SSE stream shares: opening events, each update rendered (a failed choice becomes an
        error event), the usage chunk, [DONE]; and however it ends, the request is aborted and logged."""
        status = "ok"
        try:
            for event in opening:
                yield event
            async for c, d in group.updates():
                if d.finish_reason == "error":
                    status = "error"
                    yield fmt.sse(fmt.error_body(d.error or "internal error", _ERROR_TYPES[group.fail_status],
                                                 code=group.fail_status))
                    continue
                for event in render(c, d):
                    yield event
            if usage is not None:
                yield fmt.sse(usage().model_dump())
            yield fmt.SSE_DONE
        except BaseException:
            status = "client disconnected"
            raise
        finally:
            group.abort()
            group.log_done(kind, True, status)

    # -- helpers ----------------------------------------------------------------------------------
    def _encode(self, prompt: str) -> list[int]:
        if not prompt:
            raise fmt.ApiError(400, "prompt must not be empty", param="prompt")
        return self.tokenizer.encode(prompt)

    def _check_length(self, num_prompt: int, max_tokens: int | None, prompt_param: str, tokens_param: str) -> None:
        """vLLM's 400s: the prompt alone, or the prompt plus the tokens asked for, exceed the context."""
        ctx = self.max_model_len
        if num_prompt >= ctx:
            raise fmt.ApiError(400, f"This model's maximum context length is {ctx} tokens. However, your request has "
                                    f"{num_prompt} input tokens. Please reduce the length of the input messages.",
                               param=prompt_param)
        if max_tokens is not None and num_prompt + max_tokens > ctx:
            raise fmt.ApiError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                                    f"{num_prompt + max_tokens} tokens ({num_prompt} in the messages, {max_tokens} in "
                                    "the completion). Please reduce the length of the messages or completion.",
                               param=tokens_param)

    def _prompt_text(self, prompt: str | list[int], ids: list[int]) -> str:
        return prompt if isinstance(prompt, str) else self.tokenizer.decode(ids, skip_special_tokens=False)

    @staticmethod
    def _raise_if_failed(group: RequestGroup, kind: str) -> None:
        err = group.error()
        if err is not None:
            group.log_done(kind, False, "error")
            raise fmt.ApiError(group.fail_status, err, type=_ERROR_TYPES[group.fail_status])
