"""What one request may ask of the server. Each limit is a `serve` flag (`add_limit_args`) with a
default that no ordinary client reaches.

Field limits (n, stop strings, messages, prompts per request) are checked once the body has parsed,
as ValueErrors that start with the field's name (the server's 400 names it); the body's size and
content type are checked before anything parses it (middleware.py). Light on purpose: the flags are
built for `tinyserve --help` without importing the server.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class ServerLimits:
    max_request_bytes: int = 4 * 2**20
    max_n: int = 16
    max_prompts: int = 64
    max_stop: int = 16
    max_messages: int = 512
    request_timeout: float = 600.0
    stream_buffer: int = 512
    grammar_timeout: float = 10.0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerLimits:
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})

    def check_sampling(self, n: int, stop: str | list[str] | None) -> None:
        if n > self.max_n:
            raise ValueError(f"n must be <= {self.max_n}, got {n}")
        if isinstance(stop, list) and len(stop) > self.max_stop:
            raise ValueError(f"stop: at most {self.max_stop} stop strings, got {len(stop)}")

    def check_prompts(self, count: int) -> None:
        if count > self.max_prompts:
            raise ValueError(f"prompt: at most {self.max_prompts} prompts per request, got {count}")

    def check_messages(self, count: int) -> None:
        if count > self.max_messages:
            raise ValueError(f"messages: at most {self.max_messages} messages, got {count}")


_HELP = {
    "max_request_bytes": "largest request body accepted; bigger ones get 413",
    "max_n": "largest n (choices per prompt)",
    "max_prompts": "most prompts in one /v1/completions request",
    "max_stop": "most stop strings per request",
    "max_messages": "most chat messages per request",
    "request_timeout": "seconds a request may take end to end before it is aborted (0: no limit)",
    "stream_buffer": "engine updates a stream may leave unread before its client counts as stalled and is aborted",
    "grammar_timeout": "seconds a structured-output schema, regex or grammar may take to compile before the request "
                       "is refused (400)",
}


def add_limit_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("limits (a refusal is a 4xx in OpenAI's error shape; a time-out a 504)")
    for f in fields(ServerLimits):
        g.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                       help=_HELP[f.name] + " (default: %(default)s)")
