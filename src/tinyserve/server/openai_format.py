"""Translation between OpenAI's wire format and the engine: request -> SamplingParams / prompts,
engine logprobs -> OpenAI's two logprobs shapes, errors -> `{"error": {...}}`, chunks -> SSE lines.

Pure functions and small classes with no I/O, so they are unit-testable without a model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import Any

from tinyserve.engine.sequence import TokenLogprobs
from tinyserve.sampling import SamplingParams, StructuredOutputsParams
from tinyserve.server.protocol import (
    ChatCompletionRequest,
    ChatLogprobs,
    ChatMessage,
    ChatTokenLogprob,
    CompletionLogprobs,
    CompletionRequest,
    ErrorInfo,
    ErrorResponse,
    PromptLogprob,
    TopLogprob,
)
from tinyserve.structured.tool_formats import ToolFormat


class ApiError(Exception):
    """An error with an HTTP status that reaches the client in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | int | None = None) -> dict[str, Any]:
    return ErrorResponse(error=ErrorInfo(message=message, type=type, param=param, code=code)).model_dump()


_FIELD = re.compile(r"^([A-Za-z_]+)")
_PARAM_ALIASES = {"prompt_token_ids": "prompt"}


def bad_value(e: ValueError, renames: dict[str, str] | None = None) -> ApiError:
    """A 400 from a ValueError whose message starts with the offending field's name (our convention)."""
    msg = str(e)
    m = _FIELD.match(msg)
    param = _PARAM_ALIASES.get(m.group(1), m.group(1)) if m else None
    if renames and param in renames:  # the field as this endpoint's client spelt it, in the message too
        param = renames[param]
        msg = param + msg[len(m.group(1)) :] if m else msg
    return ApiError(400, msg, param=param)


# -- requests -> engine -----------------------------------------------------------------------------


def structured_outputs(req: CompletionRequest | ChatCompletionRequest) -> StructuredOutputsParams | None:
    """OpenAI's `response_format` or vLLM's `structured_outputs` (one of them) as the engine's constraint."""
    rf, so = req.response_format, req.structured_outputs
    if rf is not None and so is not None:
        raise ApiError(400, "response_format and structured_outputs cannot both be set", param="response_format")
    try:
        if so is not None:
            return StructuredOutputsParams(json=so.json_, regex=so.regex, choice=so.choice, grammar=so.grammar,
                                           json_object=so.json_object,
                                           disable_any_whitespace=so.disable_any_whitespace)
        if rf is None or rf.type == "text":
            return None
        if rf.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise ApiError(400, "response_format.json_schema.schema is required for type json_schema",
                           param="response_format")
        return StructuredOutputsParams(json=rf.json_schema.schema_)
    except ValueError as e:
        raise bad_value(e, {"structured_outputs": "response_format"} if rf is not None else None) from None


def _common_params(req: CompletionRequest | ChatCompletionRequest, max_tokens: int | None,
                   logprobs: int | None, prompt_logprobs: int | None = None,
                   constraint: StructuredOutputsParams | None = None) -> SamplingParams:
    if req.logit_bias:
        raise ApiError(400, "logit_bias is not supported", param="logit_bias")
    return SamplingParams(
        n=req.n,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=0 if req.top_k is None else req.top_k,
        min_p=0.0 if req.min_p is None else req.min_p,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        seed=req.seed,
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        stop=req.stop,
        stop_token_ids=req.stop_token_ids,
        ignore_eos=req.ignore_eos,
        include_stop_str_in_output=req.include_stop_str_in_output,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        skip_special_tokens=req.skip_special_tokens,
        structured_outputs=constraint or structured_outputs(req),
    )


def completion_params(req: CompletionRequest) -> SamplingParams:
    if req.suffix is not None:
        raise ApiError(400, "suffix is not supported", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise ApiError(400, f"best_of must equal n (got best_of={req.best_of}, n={req.n}); "
                            "server-side best-of ranking is not supported", param="best_of")
    if req.stream and req.prompt_logprobs:  # as vLLM: a stream choice has no place for them
        raise ApiError(400, "prompt_logprobs are not available when stream is true", param="prompt_logprobs")
    # As vLLM: echo with logprobs scores the prompt too, unless prompt_logprobs says how.
    prompt_logprobs = req.logprobs if req.prompt_logprobs is None and req.echo else req.prompt_logprobs
    try:
        return _common_params(req, req.max_tokens, req.logprobs, prompt_logprobs)
    except ValueError as e:
        raise bad_value(e) from None


def chat_params(req: ChatCompletionRequest, forced_call: StructuredOutputsParams | None = None) -> SamplingParams:
    """`forced_call`: the grammar of a tool call that `tool_choice` (required or named) demands."""
    if req.top_logprobs is not None and not req.logprobs:
        raise ApiError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
    if forced_call is not None and (req.response_format is not None or req.structured_outputs is not None):
        raise ApiError(400, "tool_choice required or named cannot be combined with response_format or "
                            "structured_outputs", param="tool_choice")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    try:
        return _common_params(req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None,
                              constraint=forced_call)
    except ValueError as e:
        renames = {"logprobs": "top_logprobs"}
        if req.max_completion_tokens is not None:
            renames["max_tokens"] = "max_completion_tokens"
        raise bad_value(e, renames) from None


def completion_prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """OpenAI's four prompt forms as a list of engine prompts (a string or a list of token ids)."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise ApiError(400, "prompt must not be empty", param="prompt")
    if isinstance(prompt[0], int):
        return [list(prompt)]
    return list(prompt)


ROLES = ("system", "developer", "user", "assistant", "tool")


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the chat template expects them: text content parts joined, `developer` as `system`
    (OpenAI's newer name for it), an assistant's tool calls with their arguments parsed (templates
    write them with `tojson`). Anything a template would render blindly is refused here."""
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if m.role not in ROLES:
            raise ApiError(400, f"{where}.role must be one of {', '.join(ROLES)}; got {m.role!r}",
                           param=f"{where}.role")
        content = m.content
        if isinstance(content, list):
            if any(p.type != "text" or p.text is None for p in content):
                raise ApiError(400, f"{where}.content: only text content parts are supported", param="messages")
            content = "".join(p.text or "" for p in content)
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content or ""}
        if m.name is not None:
            msg["name"] = m.name
        if m.tool_calls:
            if m.role != "assistant":
                raise ApiError(400, f"{where}.tool_calls: only assistant messages make tool calls",
                               param=f"{where}.tool_calls")
            msg["tool_calls"] = [_tool_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(m.tool_calls)]
        if m.role == "tool":
            if not m.tool_call_id:
                raise ApiError(400, f"{where}.tool_call_id is required for a tool message",
                               param=f"{where}.tool_call_id")
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


def _tool_call(call: Any, where: str) -> dict[str, Any]:
    try:
        args = json.loads(call.function.arguments)
    except ValueError:
        raise ApiError(400, f"{where}.function.arguments is not valid JSON",
                       param=f"{where}.function.arguments") from None
    return {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": args}}


def chat_tools(req: ChatCompletionRequest) -> tuple[list[dict[str, Any]] | None, list[dict[str, Any]] | None]:
    """(the tools the model is shown, the tools one of which it must call): `tool_choice` none shows
    none, auto (the default with tools) shows them all, required forces a call to one of them, a named
    function a call to that one."""
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none"):
            raise ApiError(400, "tool_choice needs tools", param="tool_choice")
        return None, None
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    if choice == "none":
        return None, None
    if choice is None or choice == "auto":
        return tools, None
    if choice == "required":
        return tools, tools
    assert not isinstance(choice, str)  # a NamedToolChoice
    named = [t for t in tools if t["function"]["name"] == choice.function.name]
    if not named:
        raise ApiError(400, f"tool_choice names {choice.function.name!r}, which is not among tools",
                       param="tool_choice")
    return tools, named


def inline_tools(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                 fmt: ToolFormat) -> list[dict[str, Any]]:
    """For a chat template with no tools section (SmolLM2's): the tools go into the system message and
    earlier calls into their assistant messages' text, both as the tool format writes them."""
    out = [dict(m) for m in messages]
    for m in out:
        calls = m.pop("tool_calls", None)
        if calls:
            m["content"] = "\n".join(filter(None, [m["content"], fmt.render_calls(calls)]))
    if tools:
        block = fmt.render_tools(tools)
        if out and out[0]["role"] == "system":
            out[0]["content"] = f"{out[0]['content']}\n\n{block}"
        else:
            out.insert(0, {"role": "system", "content": block})
    return out


# -- engine logprobs -> OpenAI ----------------------------------------------------------------------


def _finite(x: float) -> float:
    return max(x, -9999.0)  # JSON has no -inf; OpenAI clamps the same way


def completion_logprobs(lps: Sequence[TokenLogprobs | None], text: Callable[[int], str], offset: int,
                        token_ids: list[int] | None = None) -> tuple[CompletionLogprobs, int]:
    """The legacy `{tokens, token_logprobs, top_logprobs, text_offset}`; returns it and the next offset.

    A None entry (the first prompt token under echo: nothing precedes it) is its token with null
    logprobs, as OpenAI and vLLM send it; its id comes from `token_ids`, parallel to `lps`."""
    out = CompletionLogprobs()
    ids = token_ids if token_ids is not None else [lp.token_id for lp in lps if lp is not None]
    for token_id, lp in zip(ids, lps, strict=True):
        tok = text(token_id)
        out.tokens.append(tok)
        out.text_offset.append(offset)
        offset += len(tok)
        if lp is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(_finite(lp.logprob))
        top = {text(t): _finite(v) for t, v in lp.top}
        top.setdefault(tok, _finite(lp.logprob))
        out.top_logprobs.append(top)
    return out, offset


def prompt_logprobs(lps: list[TokenLogprobs | None],
                    text: Callable[[int], str]) -> list[dict[int, PromptLogprob] | None]:
    """vLLM's `prompt_logprobs` of a choice: per prompt token, token id -> logprob, rank and text, for the
    token itself and the top N."""
    return [None if lp is None else {t: PromptLogprob(logprob=_finite(e.logprob), rank=e.rank,
                                                      decoded_token=e.decoded_token)
                                     for t, e in lp.as_vllm(text).items()} for lp in lps]


def chat_logprobs(lps: list[TokenLogprobs], text: Callable[[int], str]) -> ChatLogprobs:
    """Chat's `{"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]}`."""
    content = []
    for lp in lps:
        tok = text(lp.token_id)
        content.append(ChatTokenLogprob(
            token=tok, logprob=_finite(lp.logprob), bytes=list(tok.encode("utf-8")),
            top_logprobs=[TopLogprob(token=(s := text(t)), logprob=_finite(v), bytes=list(s.encode("utf-8")))
                          for t, v in lp.top],
        ))
    return ChatLogprobs(content=content)


# -- SSE --------------------------------------------------------------------------------------------


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def chunk_payload(chunk: Any, include_usage: bool) -> dict[str, Any]:
    """A chunk as OpenAI sends it: `usage` only when asked for, deltas without null fields."""
    d = chunk.model_dump()
    if not include_usage:
        d.pop("usage", None)
    for c in d.get("choices", []):
        if isinstance(c.get("delta"), dict):
            c["delta"] = _without_nulls(c["delta"])
        for extra in ("stop_reason", "prompt_logprobs"):  # vLLM's extras, only when set
            if c.get(extra) is None:
                c.pop(extra, None)
    return d
