"""The lab: everything that measures the engine, writes checkpoints for it, or reports on it. It imports
the engine (`tinyserve`); the engine never imports it. Its commands reach `tinyserve` through
`commands.py`; submodules are imported lazily by their users, so `import tinyserve_lab` stays cheap.

- serving load: `datasets` (ShareGPT, random, shared-prefix, multi-turn), `loadgen` (asyncio streaming
  client), `metrics` (vLLM's aggregates), `serve_bench`, `peers` (+ `inproc_peers`, `inproc_worker`,
  `baseline_server`), `soak`, `launcher` (a real server process on 127.0.0.1)
- the engine offline: `offline` (vs transformers), `profile` (+ `roofline`), `decode_speed`, `kv_math`,
  `spec_bench`, `prefix_bench`, `probe` (hand-built steps of a chosen shape)
- quality and quantization: `quality`, `quant_table` (+ `field_tools`), `export_check`, `quantize/`
  (`tinyserve quantize`: RTN, GPTQ, AWQ, NF4), `offline_models` (larger GGUFs from PyPI wheels)
- `report` (plots + SUMMARY.md), `suite` (`make bench`), `ablations/` (one-off experiments behind
  numbers in docs/REPORT.md: `python -m tinyserve_lab.ablations.NAME`)
"""
