"""Launch -> first completion token, cold and warm, side by side with the peers (REPORT section S3).

Each peer is launched as `tinyserve bench peers` launches it, one at a time, `--runs` times per state:
  cold  every cache the peer keeps for itself is empty: tinyserve's (TINYSERVE_CACHE: the GGUF's index,
        native kernels, kernel choice, compiled step) and inductor's; vLLM's (VLLM_CACHE_ROOT, inductor);
        llama.cpp keeps none. The page cache is not dropped (that needs root): the model file is warm.
  warm  the same peer started again on the caches its cold start left.
As soon as /health answers, one streamed completion is sent; its first token's time since the launch
is the figure. For tinyserve the time its compiled step is ready (/health `compiled_step`) is kept too:
it answers first from the eager step and reaches full speed when that is built.

    tinyserve bench startup [--peers tinyserve llamacpp vllm] [--runs 1] [--result-dir results/startup]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from tinyserve.models.loader import bundled_gguf_path
from tinyserve_lab.env_info import run_header, save_json
from tinyserve_lab.launcher import free_port
from tinyserve_lab.peers import PEERS, PeerProcess, add_peers_args, build_specs, model_paths

PROMPT = {"prompt": "The capital of France is", "max_tokens": 16, "temperature": 0.0, "stream": True}


def add_args(p: argparse.ArgumentParser) -> None:
    add_peers_args(p)
    p.set_defaults(result_dir="results/startup", peers=["tinyserve", "llamacpp", "vllm"])
    g = p.add_argument_group("startup")
    g.add_argument("--runs", type=int, default=1, help="cold and warm starts per peer")
    g.add_argument("--full-speed-timeout", type=float, default=600.0,
                   help="seconds to wait for tinyserve's compiled step after its first token")


def first_token(url: str, model: str, t0: float, timeout: float) -> float:
    """Seconds from `t0` (the launch) to the first token of a streamed completion."""
    with httpx.Client(timeout=timeout, trust_env=False) as client, \
            client.stream("POST", url + "/v1/completions", json={"model": model, **PROMPT}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data:") and line != "data: [DONE]" and json.loads(line[5:])["choices"][0]["text"]:
                return time.monotonic() - t0
    raise RuntimeError("the stream ended without a token")


def full_speed(url: str, t0: float, timeout: float) -> float | None:
    """Seconds from `t0` until tinyserve's /health says its compiled step serves (None: never, or off)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = httpx.get(url + "/health", timeout=5, trust_env=False).json().get("compiled_step")
        if state == "ready":
            return time.monotonic() - t0
        if state in ("off", "failed", None):
            return None
        time.sleep(0.5)
    return None


def run_once(spec: Any, port: int, log_path: Path, args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.monotonic()
    with PeerProcess(spec, port, log_path, args.stop_timeout) as proc:
        ready = proc.wait_ready(args.startup_timeout, poll_s=0.1)
        token = first_token(proc.base_url, args.model, t0, args.startup_timeout)
        out = {"ready_s": round(ready, 2), "first_token_s": round(token, 2), "log": str(log_path)}
        if spec.name == "tinyserve":
            fs = full_speed(proc.base_url, t0, args.full_speed_timeout)
            out["full_speed_s"] = None if fs is None else round(fs, 1)
    return out


def run(args: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise
    console = Console()
    out_dir = Path(args.result_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if {"vllm", "baseline"} & set(args.peers):
        gguf, hf_dir = model_paths(args)
    else:  # no peer that needs the HF export: not made (6 GB of fp32 for a 1.5B model)
        gguf, hf_dir = (Path(args.gguf) if args.gguf else bundled_gguf_path()), Path(args.hf_dir or "-")
    stamp = time.strftime("%Y%m%dT%H%M%S")
    doc: dict[str, Any] = run_header("startup-v1", model=str(gguf or hf_dir), threads=args.threads, prompt=PROMPT,
                                     runs={})
    for name in args.peers:
        if name not in PEERS:
            continue
        for run_index in range(args.runs):
            caches = Path(tempfile.mkdtemp(prefix=f"startup-{name}-"))
            try:
                for state in ("cold", "warm"):
                    port = free_port()
                    spec = build_specs(args, port, gguf, hf_dir, slots=1)[name]
                    if spec.missing:
                        console.print(f"[yellow]{name}: {spec.missing}[/]")
                        break
                    spec.env.update({"TINYSERVE_CACHE": str(caches / "tinyserve"),
                                     "TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor"),
                                     "VLLM_CACHE_ROOT": str(caches / "vllm")})
                    log_path = out_dir / "logs" / f"{name}-{state}-{run_index}-{stamp}.log"
                    try:
                        res = run_once(spec, port, log_path, args)
                    except (RuntimeError, httpx.HTTPError) as e:
                        res = {"error": str(e).splitlines()[0], "log": str(log_path)}
                    doc["runs"].setdefault(name, {}).setdefault(state, []).append(res)
                    console.print(f"{name} {state}: {res}")
            finally:
                shutil.rmtree(caches, ignore_errors=True)
    path = save_json(doc, out_dir, "startup")
    table = Table(title=f"launch -> first token, s ({doc['machine']['cpu_model']}, {args.threads} threads)")
    for col in ("peer", "state", "ready", "first token", "full speed"):
        table.add_column(col)
    for name, states in doc["runs"].items():
        for state, results in states.items():
            for r in results:
                table.add_row(name, state, str(r.get("ready_s", "-")), str(r.get("first_token_s", r.get("error"))),
                              str(r.get("full_speed_s", "-")))
    console.print(table)
    console.print(f"wrote {path}")
    return 0
