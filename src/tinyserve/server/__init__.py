"""`tinyserve serve`: the OpenAI-compatible HTTP server.

This module stays light (argparse and the engine's flags) so `tinyserve --help` does not import
FastAPI; the app itself is in app.py, the endpoints' logic in serving.py, the wire format in protocol.py.
"""

from __future__ import annotations

import argparse
import logging
import sys

from tinyserve.engine_args import add_engine_args
from tinyserve.server.limits import add_limit_args
from tinyserve.structured.tool_formats import TOOL_FORMATS


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    """The server's flags (vLLM's spelling) plus every engine knob."""
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0 for all)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="model id(s) clients send and /v1/models lists; the first is used in responses "
                        "(default: the model's own name)")
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds to let in-flight requests finish before they are aborted")
    g.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=False,
                   help="uvicorn's access log (one line per request is logged either way)")
    g.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health, /metrics, /version "
                        "and /openapi.json (default: $TINYSERVE_API_KEY; unset: no authentication)")
    g.add_argument("--socket-send-buffer", type=int, default=256 * 1024, metavar="BYTES",
                   help="each connection's kernel send buffer (0: the kernel's auto-tuning, up to MiBs); bounds "
                        "what a client that stops reading can leave unread before it is noticed (default: %(default)s)")
    g.add_argument("--tool-call-parser", default="hermes", choices=list(TOOL_FORMATS),
                   help="how the model writes tool calls: " + TOOL_FORMATS.help())
    r = parser.add_argument_group("replicas (Ray Serve)")
    r.add_argument("--data-parallel-size", type=int, default=1, metavar="N",
                   help="serve N engine replicas behind one endpoint on a local Ray cluster (Ray Serve: "
                        "placement, health checks, restarts); each gets its share of the cores (default: %(default)s)")
    r.add_argument("--router", default="prefix", choices=("prefix", "pow2", "round_robin"),
                   help="which replica a request goes to: prefix = the one whose past prompts share the longest "
                        "prefix with it, unless the replicas' loads differ too much (SGLang's and Ray's policy); "
                        "pow2 = the less loaded of two at random; round_robin = in turn (default: %(default)s)")
    add_limit_args(parser)
    add_engine_args(parser)


def run_server(args: argparse.Namespace) -> int:
    if args.data_parallel_size < 1:
        raise ValueError(f"data_parallel_size must be >= 1, got {args.data_parallel_size}")
    if args.data_parallel_size > 1:  # Ray is imported only here
        from tinyserve.server.replicas.service import run_replicas

        return run_replicas(args)
    from tinyserve.server.app import run_server as _run

    return _run(args)


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinyserve serve", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    add_serve_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """`python -m tinyserve.server ...`: the same as `tinyserve serve ...`."""
    parser = serve_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run_server(args)
    except ValueError as e:  # bad flags: a clear message, not a traceback
        parser.exit(2, f"tinyserve serve: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
