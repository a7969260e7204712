"""`tinyserve bench all [--full]`: every instrument in sequence, then the report (`make bench`).

Quick (default, ~16 min on 2 cores): a serving sweep (random 128 in / 32 out at concurrency
1, 4, 16) for every peer that is installed, KV math, the profiler, and a small offline grid
against transformers. --full runs the issue's whole offline grid and a longer serving sweep
(ShareGPT and random, concurrency up to 64, Poisson rates): hours on this machine.
Each step is the same code path as its own subcommand, fed the flags written out below.
"""

from __future__ import annotations

import argparse
import importlib
import time
from collections.abc import Callable

from rich.console import Console

QUICK = {
    "kv_math": [],
    "quality": [],
    "profile": ["--batch-sizes", "1", "32", "--steps", "12"],
    "offline": ["--batch-sizes", "1", "8", "32", "--input-lens", "128", "512", "--output-lens", "32"],
    "serve": ["--dataset", "random", "--random-input-len", "128", "--random-output-len", "32",
              "--num-prompts", "16", "--max-concurrency", "1", "4", "16"],
}
FULL = {
    "kv_math": [],
    "quality": [],
    "profile": ["--batch-sizes", "1", "8", "32", "64", "--steps", "24"],
    "offline": [],  # the defaults are the full grid
    "serve": ["--dataset", "sharegpt", "--num-prompts", "200", "--max-concurrency", "1", "4", "16", "64"],
    "serve_rates": ["--dataset", "sharegpt", "--num-prompts", "200", "--request-rate", "0.5", "1", "2", "4"],
}
# vLLM takes minutes to start: it runs once per sweep (prefix caching off, so later points do not
# reuse earlier prompts); the cheap peers get a fresh server per point.
VLLM_ONCE = ["--peers", "vllm", "--no-restart-per-point", "--vllm-args=--no-enable-prefix-caching"]
CHEAP_PEERS = ["--peers", "tinyserve", "baseline", "llamacpp"]
# ONNX Runtime GenAI and OpenVINO GenAI run in-process (tinyserve_lab/inproc_peers.py) on the same prompts.
INPROC_PEERS = ["--peers", "ortgenai", "openvino"]


def _step(module: str, add_args: str, run: str, argv: list[str]) -> Callable[[], object]:
    mod = importlib.import_module(f"tinyserve_lab.{module}")
    parser = argparse.ArgumentParser(prog=module)
    getattr(mod, add_args)(parser)
    args = parser.parse_args(argv)
    return lambda: getattr(mod, run)(args)


def add_suite_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--full", action="store_true", help="the whole grid (hours), not the quick suite")
    p.add_argument("--result-dir", default="docs/results")
    p.add_argument("--skip", nargs="+", default=[],
                   choices=("kv_math", "quality", "profile", "offline", "serve", "report"))


def run_suite(args: argparse.Namespace) -> None:
    plan = FULL if args.full else QUICK
    out = ["--result-dir", args.result_dir]
    steps: list[tuple[str, Callable[[], object]]] = []
    # Serving first: later steps load models into this (client) process, and a first serving run
    # made after them once measured half the throughput of a standalone rerun (cause not pinned down).
    if "serve" not in args.skip:
        for key in [k for k in ("serve", "serve_rates") if k in plan]:
            for peers in (CHEAP_PEERS, VLLM_ONCE, INPROC_PEERS):
                steps.append((f"{key}:{peers[1]}", _step("peers", "add_peers_args", "run_peers",
                                                         plan[key] + peers + out + ["--disable-tqdm"])))
    if "kv_math" not in args.skip:
        steps.append(("kv_math", _step("kv_math", "add_kv_math_args", "run_kv_math", plan["kv_math"] + out)))
    if "quality" not in args.skip:
        steps.append(("quality", _step("quality", "add_quality_args", "run_quality", plan["quality"] + out)))
    if "profile" not in args.skip:
        steps.append(("profile", _step("profile", "add_profile_args", "run_profile", plan["profile"] + out)))
    if "offline" not in args.skip:
        label = "offline-full" if args.full else "offline-quick"
        steps.append(("offline", _step("offline", "add_offline_args", "run_offline",
                                       plan["offline"] + out + ["--label", label])))
    if "report" not in args.skip:
        report_argv = ["--results", args.result_dir]
        steps.append(("report", _step("report", "add_report_args", "run_report", report_argv)))
    console = Console()
    start = time.perf_counter()
    for i, (name, fn) in enumerate(steps, 1):
        console.rule(f"[{i}/{len(steps)}] {name}  ({(time.perf_counter() - start) / 60:.1f} min elapsed)")
        fn()
    console.rule(f"done in {(time.perf_counter() - start) / 60:.1f} min; results in {args.result_dir}")

