"""Serving-benchmark instruments: datasets, an OpenAI-compatible load generator, vLLM-style metrics.

Submodules are imported lazily by their users so that `import tinyserve_lab` stays cheap
(no torch / transformers import just to read a results file).

- `metrics`      per-request records and the vLLM `benchmark_serving` aggregate (pure functions)
- `datasets`     ShareGPT, random, shared-prefix and multi-turn request samplers
- `loadgen`      asyncio streaming client: arrival processes, TTFT/ITL/E2E capture, failures recorded
- `serve_bench`  `run_serve_benchmark(args)` + `add_serve_bench_args(parser)` for `tinyserve bench serve`
- `ablations`    one-off experiments behind numbers in docs/REPORT.md (`python -m tinyserve_lab.ablations.NAME`)
"""
