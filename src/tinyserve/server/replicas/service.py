"""Replicas on Ray Serve: N engines behind one OpenAI-compatible ingress, routed by prompt prefix.

Ray Serve does the distribution: it places the replicas (a `Replica` deployment, one engine each),
health-checks them (`check_health` fails once the engine's step loop has died) and starts a new one
for any that fails or dies, routes each request through a pluggable request router, and can autoscale
on ongoing requests (the `serve run` config in deploy/). We write only what is ours: the replica (the
server's own FastAPI app, called in process: replicas/asgi.py) and the ingress that hands it requests.

Routing (`--router`, replicas/routers.py): `prefix` sends a request to the replica whose past prompts
share the longest prefix with it, unless the replicas' queues differ by more than `IMBALANCE` requests
(then the least loaded); `pow2` is Ray's default, power-of-two choices; `round_robin` the baseline.

A replica that dies: the requests it had not started answering are retried on another (a request
counts as started once its first body bytes exist: for a stream, its first event; a non-streamed answer
never has, until it is complete); one cut off mid-stream ends with an error event, as any stream that
fails does. Ray restarts the replica.
"""

# No `from __future__ import annotations`: FastAPI reads the ingress route's annotations at run time
# (as Ray Serve's ingress re-binds the method), and string annotations would not resolve there.

import argparse
import json
import logging
import signal
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, cast

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from tinyserve.server import openai_format as fmt
from tinyserve.server.replicas.asgi import Head, call_app
from tinyserve.system import physical_cores

log = logging.getLogger(__name__)
ROUTERS = ("prefix", "pow2", "round_robin")
IMBALANCE = 8  # requests of queue difference beyond which the prefix router balances load instead
RETRIES = 3  # replicas a request that has not started is tried on


@dataclass
class RoutedRequest:
    """An HTTP request as the ingress forwards it. `prompt` is what the prefix router matches (the
    completion's prompt, or the chat's message contents joined): Ray's router reads that attribute."""

    method: str
    path: str
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    prompt: str


def prompt_text(body: bytes) -> str:
    """The text a request's KV cache would start with, as far as the router can tell without a tokenizer."""
    try:
        data = json.loads(body) if body else {}
    except ValueError:
        return ""
    if not isinstance(data, dict):
        return ""
    if isinstance(data.get("messages"), list):
        return "".join(str(m["content"]) if isinstance(m, dict) and isinstance(m.get("content"), str) else ""
                       for m in data["messages"])
    prompt = data.get("prompt")
    if isinstance(prompt, list):
        prompt = prompt[0] if prompt and isinstance(prompt[0], str) else ""
    return prompt if isinstance(prompt, str) else ""


class Replica:
    """One engine and the server's app around it (what `tinyserve serve` runs in one process)."""

    def __init__(self, args: dict[str, Any]) -> None:
        from tinyserve.engine.async_engine import AsyncEngine
        from tinyserve.engine.llm_engine import LLMEngine
        from tinyserve.engine_args import engine_config
        from tinyserve.server.app import build_app
        from tinyserve.server.limits import ServerLimits
        from tinyserve.server.middleware import resolve_api_key

        ns = argparse.Namespace(**args)
        logging.basicConfig(level=str(args.get("log_level", "INFO")).upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        config = engine_config(ns, compile=ns.compile or "background")
        self.engine = AsyncEngine.build(lambda: LLMEngine(config))
        self.app = build_app(self.engine, ns.served_model_name, ServerLimits.from_args(ns),
                             resolve_api_key(ns.api_key), ns.tool_call_parser)

    async def serve_request(self, req: RoutedRequest) -> AsyncIterator[tuple[Head, bytes] | bytes]:
        """The response: (head, first body chunk) together, then the rest. Holding the head back until
        the body starts is what lets the ingress retry a request the replica dies before answering."""
        it = call_app(self.app, req.method, req.path, req.query, req.headers, req.body)
        head = await anext(it)
        assert isinstance(head, Head)
        first = await anext(it, b"")
        assert isinstance(first, bytes)
        yield head, first
        async for chunk in it:
            assert isinstance(chunk, bytes)  # one head per response
            yield chunk

    async def check_health(self) -> None:
        """Ray Serve's health check: a replica whose engine loop died is replaced."""
        if not self.engine.is_running:
            raise RuntimeError(f"the engine is not running: {self.engine.fatal_error!r}")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop()


ingress_app = FastAPI(title="tinyserve (replicas)", docs_url=None, redoc_url=None)


@serve.ingress(ingress_app)
class Ingress:
    """Forwards every request to a replica chosen by the router, streaming the answer back."""

    def __init__(self, replicas: DeploymentHandle) -> None:
        self.replicas = replicas.options(stream=True)

    @ingress_app.api_route("/{path:path}", methods=["GET", "POST", "DELETE"])
    async def forward(self, request: Request, path: str) -> Response:
        body = await request.body()
        req = RoutedRequest(request.method, "/" + path, request.url.query.encode(), list(request.headers.raw), body,
                            prompt_text(body))
        for attempt in range(RETRIES):
            gen = cast(DeploymentResponseGenerator, self.replicas.serve_request.remote(req))
            try:
                head, first = await gen.__anext__()
                break
            except (RayActorError, ActorUnavailableError) as e:  # gone before it answered: another replica
                log.warning("a replica failed before answering %s (%s); retrying (%d/%d)", req.path,
                            type(e).__name__, attempt + 1, RETRIES)
        else:
            return JSONResponse(fmt.error_body("no replica could serve the request", "service_unavailable", code=503),
                                status_code=503)
        headers = {k.decode(): v.decode() for k, v in head.headers if k.lower() != b"content-length"}
        stream = headers.get("content-type", "").startswith("text/event-stream")

        async def rest() -> AsyncIterator[bytes]:
            yield first
            try:
                async for chunk in gen:
                    yield chunk
            except Exception as e:  # cut off mid-answer: a stream says so, as any failed stream does
                log.error("a replica failed mid-answer on %s: %s", req.path, type(e).__name__)
                if stream:
                    error = fmt.error_body("the replica serving this stream failed", "internal_error", code=500)
                    yield (fmt.sse(error) + fmt.SSE_DONE).encode()

        return StreamingResponse(rest(), status_code=head.status, headers=headers)


def router_config(router: str) -> RequestRouterConfig | None:
    """The Ray request router of a `--router` choice (None: Ray's default, power-of-two choices)."""
    if router == "pow2":
        return None
    here = "tinyserve.server.replicas.routers"
    routers = {"prefix": (f"{here}.PrefixAffinityRouter", {"imbalanced_threshold": IMBALANCE}),
               "round_robin": (f"{here}.RoundRobinRouter", {})}
    if router not in routers:
        raise ValueError(f"router must be one of {', '.join(ROUTERS)}; got {router!r}")
    cls, kwargs = routers[router]
    return RequestRouterConfig.model_validate({"request_router_class": cls, "request_router_kwargs": kwargs})


def application(args: argparse.Namespace) -> Any:
    """The Ray Serve application: `data_parallel_size` replicas behind the ingress."""
    dp = args.data_parallel_size
    if args.num_threads is None:  # the cores shared out among the replicas (and their TP ranks)
        args.num_threads = max(1, physical_cores() // (dp * args.tensor_parallel_size))
    options: dict[str, Any] = dict(
        num_replicas=dp, ray_actor_options={"num_cpus": 0}, health_check_period_s=5, health_check_timeout_s=60,
        # Ray queues what exceeds this at the handle; the engine has its own bounded queue behind it.
        max_ongoing_requests=args.max_num_seqs + args.max_waiting,
    )
    config = router_config(args.router)
    if config is not None:
        options["request_router_config"] = config
    replica = serve.deployment(name="Replica", **options)(Replica)
    ingress = serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0})(Ingress)
    return ingress.bind(replica.bind({k: v for k, v in vars(args).items() if k != "func"}))


def app_builder(args: dict[str, Any]) -> Any:
    """`serve run` / a Serve config's import path: `args` are `tinyserve serve` flags by name
    (`{"data-parallel-size": 2, "router": "prefix", "dtype": "float32"}`)."""
    from tinyserve.server import serve_parser

    argv = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False:
            argv.append("--no-" + flag[2:])
        else:
            argv += [flag, *(str(v) for v in (value if isinstance(value, list) else [value]))]
    return application(serve_parser().parse_args(argv))


def run_replicas(args: argparse.Namespace) -> int:
    """`tinyserve serve --data-parallel-size N`: a local Ray cluster, the application on it, until SIGTERM/SIGINT."""
    ray.init(address="local", num_cpus=physical_cores(), include_dashboard=False)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(application(args), name="tinyserve", route_prefix="/", blocking=False)
        log.info("serving %d replicas on http://%s:%d (router: %s)", args.data_parallel_size, args.host, args.port,
                 args.router)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
