"""How a model writes tool calls, one class per format: what frames a call (for the grammar that enforces
`tool_choice` required or named), how to find the calls in its text (whole, or as a stream), and how to
show it tools and earlier calls when its chat template cannot (SmolLM2's has no tools section).

Adding a format is one class here, registered under the name `--tool-call-parser` takes (vLLM's flag).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from tinyserve.registry import Registry


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            object.__setattr__(self, "id", f"call_{uuid.uuid4().hex[:24]}")


class ToolFormat:
    """A format whose calls are JSON objects {"name", "arguments"} between two literal tags."""

    begin: str
    end: str

    def call_schema(self, tools: list[dict[str, Any]]) -> dict[str, Any]:
        """The JSON schema of one call to any of `tools` (OpenAI's {"type": "function", "function": ...})."""
        options = [{"type": "object",
                    "properties": {"name": {"const": t["function"]["name"]},
                                   "arguments": t["function"].get("parameters") or {"type": "object"}},
                    "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
        return options[0] if len(options) == 1 else {"anyOf": options}

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """The text outside the calls, and the calls (a block that is not a call stays text)."""
        stream = ToolCallStream(self)
        content, deltas = stream.feed(text)
        return content + stream.finish(), join_deltas(deltas)

    def render_tools(self, tools: list[dict[str, Any]]) -> str:
        raise NotImplementedError

    def render_calls(self, calls: list[dict[str, Any]]) -> str:
        """Earlier calls (a message's OpenAI `tool_calls`, arguments as dicts) as the model writes them."""
        def one(f: dict[str, Any]) -> str:
            call = json.dumps({"name": f["name"], "arguments": f["arguments"]}, ensure_ascii=False)
            return self.begin + call + self.end

        return "\n".join(one(c["function"]) for c in calls)

    def to_call(self, block: str) -> ToolCall | None:
        try:
            obj = json.loads(block)
        except ValueError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        args = obj.get("arguments", obj.get("parameters", {}))
        return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


TOOL_FORMATS: Registry[type[ToolFormat]] = Registry("tool_call_parser")


@TOOL_FORMATS.register("hermes")
class Hermes(ToolFormat):
    """<tool_call>{"name": ..., "arguments": {...}}</tool_call> (Qwen2.5, Hermes, ChatML models)"""

    begin, end = "<tool_call>\n", "\n</tool_call>"

    def render_tools(self, tools: list[dict[str, Any]]) -> str:
        # Qwen2.5's own wording, for templates that do not render tools themselves.
        listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{listed}\n"
                "</tools>\n\nFor each function call, return a json object with function name and arguments within "
                '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
                "<args-json-object>}\n</tool_call>")


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of a streamed call, as OpenAI streams them: the first of a call names it (id and name),
    the others carry its arguments' text; joined per index, they are the call."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None


# A call's opening, up to where its arguments begin: once it is seen, the arguments stream as they come.
_CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


class ToolCallStream:
    """Splits a growing text into content and tool-call deltas. Text that could still become a call's
    opening tag is held back, so a stream never shows the start of a call as content; inside a call,
    the arguments stream as written, less a trailing `}` that may be the call's own closing brace."""

    def __init__(self, fmt: ToolFormat) -> None:
        self.fmt = fmt
        self.open, self.close = fmt.begin.strip(), fmt.end.strip()
        self._buf = ""
        self._in_call = False
        self._after_call = False  # newlines right after a call belong to its framing, not to the content
        self._index = 0  # the next call's index
        self._args_at: int | None = None  # in a call whose head was seen: where its arguments begin
        self._sent = 0  # of those arguments, the characters already sent

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        """(content that is final now, call deltas now)."""
        self._buf += text
        content, deltas = "", list[ToolCallDelta]()
        while True:
            if self._after_call:
                self._buf = self._buf.lstrip("\n")
                self._after_call = not self._buf
            if not self._in_call:
                at = self._buf.find(self.open)
                if at < 0:
                    keep = _partial_suffix(self._buf, self.open)
                    content += self._buf[: len(self._buf) - keep]
                    self._buf = self._buf[len(self._buf) - keep:]
                    return content, deltas
                content += self._buf[:at]
                self._buf, self._in_call = self._buf[at + len(self.open):], True
            at = self._buf.find(self.close)
            block = self._buf[: len(self._buf) - _partial_suffix(self._buf, self.close)] if at < 0 else self._buf[:at]
            head = _CALL_HEAD.match(block) if self._args_at is None else None
            if head is not None and head.end() < len(block):  # the arguments' first character is in
                name = json.loads(f'"{head.group(1)}"')
                deltas.append(ToolCallDelta(self._index, id=ToolCall(name, "").id, name=name))
                self._args_at, self._sent = head.end(), 0
            if self._args_at is not None:
                args = _arguments(block[self._args_at:])
                if len(args) > self._sent:
                    deltas.append(ToolCallDelta(self._index, args[self._sent:]))
                    self._sent = len(args)
            if at < 0:
                return content, deltas
            self._buf, self._in_call = self._buf[at + len(self.close):], False
            if self._args_at is None:  # no call's head: a call written some other way, or not a call
                call = self.fmt.to_call(block.strip())
                if call is None:
                    content += f"{self.open}{block}{self.close}"
                    continue
                deltas += [ToolCallDelta(self._index, id=call.id, name=call.name),
                           ToolCallDelta(self._index, call.arguments)]
            self._index, self._args_at, self._after_call = self._index + 1, None, True

    def finish(self) -> str:
        """At the end of the output, the text held back: a call cut short before its arguments began stays
        text (as it was written); one cut inside its arguments has been sent as a call and stays one."""
        rest = "" if self._args_at is not None else (self.open if self._in_call else "") + self._buf
        self._buf, self._in_call, self._args_at = "", False, None
        return rest


def _arguments(body: str) -> str:
    """The arguments' text within a call's body so far: a last `}` is held back (the call's own closing
    brace, if nothing follows it), and the whitespace around it."""
    body = body.rstrip()
    return body[:-1].rstrip() if body.endswith("}") else body


def join_deltas(deltas: list[ToolCallDelta]) -> list[ToolCall]:
    """The calls that a list of deltas streams."""
    calls: dict[int, ToolCall] = {}
    for d in deltas:
        if d.name is not None:
            calls[d.index] = ToolCall(d.name, "", d.id or "")
        else:
            c = calls[d.index]
            calls[d.index] = ToolCall(c.name, c.arguments + d.arguments, c.id)
    return [calls[i] for i in sorted(calls)]


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that begins `tag`."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
