"""`tinyserve {generate,serve,bench,quantize,profile,report}`: one entry point for every face of the project."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time
from typing import Any

from tinyserve.engine_args import add_engine_args, engine_config


def cmd_generate(args: argparse.Namespace) -> int:
    """Stream one completion to the terminal, token by token."""
    from tinyserve.engine.llm_engine import LLMEngine
    from tinyserve.sampling import SamplingParams

    engine = LLMEngine(engine_config(args))
    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_tokens=args.max_tokens,
        seed=args.sampling_seed, stop=args.stop or None,
    )
    prompt: Any = args.prompt
    if args.chat:
        prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
    seq = engine.add_request("cli", prompt, params)[0]
    shown = 0
    start = time.perf_counter()
    while not seq.finished:
        engine.step()
        text = seq.visible_text()
        sys.stdout.write(text[shown:])
        sys.stdout.flush()
        shown = len(text)
    elapsed = time.perf_counter() - start
    n = len(seq.output_token_ids)
    print(f"\n[{n} tokens in {elapsed:.2f}s, {n / elapsed:.1f} tok/s, finish_reason={seq.finish_reason}]",
          file=sys.stderr)
    return 0


def _attach(p: argparse.ArgumentParser, module: str, add_args: str, run: str) -> None:
    """Flags from `module.add_args`; running the subcommand calls `module.run(args)`."""
    mod = importlib.import_module(module)
    getattr(mod, add_args)(p)
    p.set_defaults(func=lambda args: (getattr(mod, run)(args), 0)[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tinyserve", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", parents=[common], help="generate text for one prompt, streamed to the terminal")
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--sampling-seed", type=int, default=None)
    add_engine_args(gen)
    gen.set_defaults(func=cmd_generate)

    srv = sub.add_parser("serve", parents=[common], help="OpenAI-compatible HTTP server (SSE, continuous batching)")
    server_mod = importlib.import_module("tinyserve.server")  # light: FastAPI loads only when serving
    server_mod.add_serve_args(srv)
    srv.set_defaults(func=server_mod.run_server)

    bench = sub.add_parser("bench", help="benchmarks: offline sweeps, online serving load, peers")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    offline = bench_sub.add_parser("offline", parents=[common], help="batch x input x output sweep vs transformers")
    _attach(offline, "tinyserve.bench.offline", "add_offline_args", "run_offline")
    serve_b = bench_sub.add_parser("serve", parents=[common], help="load generator against any OpenAI-compatible URL")
    _attach(serve_b, "tinyserve.bench.serve_bench", "add_serve_bench_args", "run_serve_benchmark")
    peers_b = bench_sub.add_parser("peers", parents=[common],
                                    help="same workload vs baseline, llama.cpp, vLLM, ORT GenAI, OpenVINO")
    _attach(peers_b, "tinyserve.bench.peers", "add_peers_args", "run_peers")
    suite = bench_sub.add_parser("all", parents=[common], help="every instrument, then the report (make bench)")
    _attach(suite, "tinyserve.bench.suite", "add_suite_args", "run_suite")
    kv = bench_sub.add_parser("kv-math", parents=[common],
                              help="KV-cache bytes per token/request, checked against the engine's pool")
    _attach(kv, "tinyserve.bench.kv_math", "add_kv_math_args", "run_kv_math")
    quality = bench_sub.add_parser("quality", parents=[common],
                                   help="perplexity, KLD, greedy agreement vs fp32, memory, speed per precision mode")
    _attach(quality, "tinyserve.bench.quality", "add_quality_args", "run_quality")
    quant_b = bench_sub.add_parser("quant", parents=[common],
                                   help="the quantization table: method x bits x group, quality / bytes / speed")
    _attach(quant_b, "tinyserve.bench.quant_table", "add_quant_args", "run_quant")

    quant = sub.add_parser("quantize", parents=[common],
                           help="RTN / GPTQ / AWQ / NF4 weights -> a model directory the engine serves packed")
    _attach(quant, "tinyserve.quantize.pipeline", "add_quantize_args", "run_quantize")

    soak = bench_sub.add_parser("soak", parents=[common], help="minutes of mixed load with disconnects against a "
                                "server on 127.0.0.1: nothing lost, KV back to 0, RSS bounded (exit 1 if not)")
    soak_mod = importlib.import_module("tinyserve.bench.soak")
    soak_mod.add_soak_args(soak)
    soak.set_defaults(func=lambda args: 0 if soak_mod.run_soak(args)["passed"] else 1)

    prof = sub.add_parser("profile", parents=[common], help="op tables, step split and roofline for prefill/decode")
    _attach(prof, "tinyserve.bench.profile", "add_profile_args", "run_profile")
    rep = sub.add_parser("report", parents=[common], help="plots + SUMMARY.md from every result JSON under --results")
    _attach(rep, "tinyserve.bench.report", "add_report_args", "run_report")

    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ValueError as e:  # bad flags or input: a clear message, not a traceback
        parser.exit(2, f"tinyserve: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
