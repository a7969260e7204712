"""How a model writes tool calls, one class per format: what frames a call (for the grammar that enforces
`tool_choice` required or named), how to find the calls in its text (whole, or as a stream), and how to
show it tools and earlier calls when its chat template cannot (SmolLM2's has no tools section).

Adding a format is one class here, registered under the name `--tool-call-parser` takes (vLLM's flag).
"""

from __future__ import annotations

import json
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
        content, calls = stream.feed(text)
        return content + stream.finish(), calls

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


class ToolCallStream:
    """Splits a growing text into content and complete tool calls. Text that could still become a
    call's opening tag is held back, so a stream never shows the start of a call as content."""

    def __init__(self, fmt: ToolFormat) -> None:
        self.fmt = fmt
        self.open, self.close = fmt.begin.strip(), fmt.end.strip()
        self._buf = ""
        self._in_call = False
        self._after_call = False  # newlines right after a call belong to its framing, not to the content

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        """(content that is final now, calls completed now)."""
        self._buf += text
        content, calls = "", list[ToolCall]()
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
                    return content, calls
                content += self._buf[:at]
                self._buf, self._in_call = self._buf[at + len(self.open):], True
            at = self._buf.find(self.close)
            if at < 0:
                return content, calls
            block, self._buf, self._in_call = self._buf[:at], self._buf[at + len(self.close):], False
            call = self.fmt.to_call(block.strip())
            if call is None:  # not a call after all: it stays text
                content += f"{self.open}{block}{self.close}"
            else:
                calls.append(call)
                self._after_call = True

    def finish(self) -> str:
        """At the end of the output, what is held back: an unfinished call stays text (as it was written)."""
        rest = (self.open if self._in_call else "") + self._buf
        self._buf, self._in_call = "", False
        return rest


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that begins `tag`."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
