"""Two replicas on Ray Serve under a multi-turn chat workload, per `--router`: prefix hit rate and TTFT.

Each router gets a fresh service per round (routers rotated between rounds: `tinyserve serve
--data-parallel-size 2 --router R`, a local Ray cluster, cold prefix caches) and the same ShareGPT
conversations, replayed with their reference replies so every router sees byte-identical prompts;
`--concurrency` chats at a time, each turn sent when the previous one is answered. Prefix hit rate =
the prompt tokens the replicas found cached (the usage's `cached_tokens`) over all prompt tokens.
`--vllm-bench` also runs vLLM's own benchmark client (`vllm.benchmarks.serve`, from the peers' venv)
against the prefix-routed service: its failures count.

    .venv/bin/python -m tinyserve_lab.ablations.routers --json docs/results/replicas/routers.json --vllm-bench
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from tinyserve.models.loader import resolve_model
from tinyserve_lab.ablations import report, rotated
from tinyserve_lab.datasets import sample_multi_turn
from tinyserve_lab.env_info import machine_info
from tinyserve_lab.launcher import ServerProcess
from tinyserve_lab.loadgen import LoadConfig, run_multi_turn
from tinyserve_lab.tokenizer_cache import load_tokenizer

VLLM_PY = Path(".peers/vllm-venv/bin/python")
VLLM_BENCH = """import json, sys
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.benchmarks.serve import add_cli_args, main
p = FlexibleArgumentParser(); add_cli_args(p)
r = main(p.parse_args(sys.argv[1:]))
print("RESULT " + json.dumps({k: r[k] for k in ("completed", "failed", "request_throughput", "median_ttft_ms")}))
"""


def percentile(xs: list[float], q: int) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1] if len(xs) > 1 else xs[0]


def run_router(router: str, flags: list[str], conversations: list, args: argparse.Namespace,
               vllm: bool = False) -> dict[str, Any]:
    with ServerProcess(["--data-parallel-size", "2", "--router", router, *flags], startup_timeout=300) as srv:
        cfg = LoadConfig(base_url=srv.url, model="SmolLM2-135M-Instruct", endpoint="chat",
                         max_concurrency=args.concurrency, max_tokens=args.max_tokens, progress=False)
        result = asyncio.run(run_multi_turn(conversations, cfg, history="reference"))
        ok = [r for r in result.records if r.success]
        later = [r for r in ok if r.turn]  # turn 0 has nothing of its own to find
        row: dict[str, Any] = {"requests": len(result.records), "failed": len(result.records) - len(ok),
               "prefix_hit_rate": sum(r.cached_tokens or 0 for r in ok) / sum(r.prompt_len for r in ok),
               "later_turns_hit_rate": sum(r.cached_tokens or 0 for r in later) / sum(r.prompt_len for r in later),
               "ttft_p50_ms": percentile([r.ttft for r in ok], 50) * 1e3,
               "ttft_p99_ms": percentile([r.ttft for r in ok], 99) * 1e3,
               "duration_s": result.duration_s}
        if vllm and router == "prefix":
            row["vllm_bench"] = vllm_bench(srv.url, args)
    print(router, json.dumps(row), flush=True)
    return row


def vllm_bench(url: str, args: argparse.Namespace) -> dict[str, Any]:
    """vLLM's benchmark client (random prompts) against the service: did every request succeed?"""
    tok = str(resolve_model(None).path)
    with tempfile.TemporaryDirectory() as d:
        cmd = [str(VLLM_PY), "-c", VLLM_BENCH, "--backend", "openai", "--base-url", url, "--endpoint",
               "/v1/completions", "--model", "SmolLM2-135M-Instruct", "--tokenizer", tok, "--dataset-name", "random",
               "--random-input-len", "128", "--random-output-len", "32", "--num-prompts", str(args.vllm_prompts),
               "--max-concurrency", "8", "--ignore-eos", "--result-dir", d]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        return {"error": (out.stderr or out.stdout)[-800:]}
    return json.loads(line[len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--routers", default="prefix,round_robin,pow2")
    ap.add_argument("--conversations", type=int, default=32)
    ap.add_argument("--max-turns", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--flags", default="--dtype bfloat16 --enforce-eager --max-model-len 4096",
                    help="tinyserve serve flags of every replica (eager: a fresh service per run starts in seconds)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--vllm-bench", action="store_true")
    ap.add_argument("--vllm-prompts", type=int, default=64)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    conversations = sample_multi_turn(load_tokenizer(None), args.conversations, min_turns=3, max_turns=args.max_turns,
                                      max_total_len=3000)
    out: dict[str, Any] = {"machine": machine_info(), "conversations": len(conversations),
                           "turns": sum(len(c.turns) for c in conversations), "concurrency": args.concurrency,
                           "flags": args.flags, "routers": {}}
    routers = args.routers.split(",")
    runs: dict[str, list[dict[str, Any]]] = {r: [] for r in routers}
    for i in range(args.rounds):  # each router first in turn: the machine's drift does not favour one
        for router in rotated(routers, i):
            vllm = args.vllm_bench and i == 0
            runs[router].append(run_router(router, args.flags.split(), conversations, args, vllm))
    keys = ("prefix_hit_rate", "later_turns_hit_rate", "ttft_p50_ms", "ttft_p99_ms", "failed")
    out["routers"] = {r: {**{k: statistics.median([x[k] for x in rows]) for k in keys}, "runs": rows}
                      for r, rows in runs.items()}
    report(out, args.json)


if __name__ == "__main__":
    main()
