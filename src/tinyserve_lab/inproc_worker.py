"""Measurement script for the in-process peers; runs with the *peer's* python, not tinyserve's.

    <peer venv>/bin/python inproc_worker.py ortgenai|openvino --model-dir DIR --requests REQ.json
        [--threads N] [--max-concurrency N] [--warmup N] [--ov-cache-gb G]

Standalone on purpose: it imports only the standard library, numpy and the peer's own package
(onnxruntime_genai or openvino_genai), never tinyserve, so tinyserve's venv never loads either runtime.
REQ.json is {"requests": [{"prompt_ids": [...], "output_len": N}, ...]}. The result is one JSON line
on stdout, prefixed with RESULT_PREFIX; everything else (progress, runtime logs) goes to stderr.
Per request it records what the HTTP load generator records (ttft, itl, e2el, start_time, seconds,
relative to the benchmark start), so tinyserve aggregates both with the same code.

- ortgenai: one onnxruntime_genai Generator per request, one request at a time (batch 1); the prompt is
  prefilled by append_tokens, the first token is sampled from its logits (TTFT), then one decode step
  per token. EOS is ignored via min_length = max_length = prompt + output.
- openvino: openvino_genai.ContinuousBatchingPipeline (the scheduler behind LLMPipeline(...,
  scheduler_config=...)); every request is added at once (or --max-concurrency at a time) and the
  pipeline is stepped; a token read from a request's handle after a step is timed at that step's end.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys
import time
from typing import Any

RESULT_PREFIX = "INPROC_RESULT "


def log(msg: str) -> None:
    print(f"[inproc_worker] {msg}", file=sys.stderr, flush=True)


def record(index: int, prompt_len: int, expected: int, start: float, token_times: list[float]) -> dict[str, Any]:
    """A request's record from its start and the times its tokens appeared (benchmark-relative seconds)."""
    ok = bool(token_times)
    return {"index": index, "success": ok, "error": "" if ok else "no tokens", "prompt_len": prompt_len,
            "output_len": len(token_times), "expected_output_len": expected, "start_time": start,
            "ttft": token_times[0] - start if ok else 0.0,
            "itl": [b - a for a, b in zip(token_times, token_times[1:])],
            "e2el": token_times[-1] - start if ok else 0.0}


def run_ortgenai(args: argparse.Namespace, requests: list[dict[str, Any]]) -> dict[str, Any]:
    og: Any = importlib.import_module("onnxruntime_genai")
    config = og.Config(args.model_dir)
    config.clear_providers()  # CPU
    if hasattr(config, "overlay"):
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": args.threads, "inter_op_num_threads": 1}}}}))
    t0 = time.perf_counter()
    model = og.Model(config)
    load_s = time.perf_counter() - t0

    def generate(ids: list[int], n: int, t_base: float) -> tuple[float, list[float]]:
        params = og.GeneratorParams(model)
        total = len(ids) + n
        params.set_search_options(do_sample=False, max_length=total, min_length=total)
        start = time.perf_counter() - t_base
        gen = og.Generator(model, params)
        gen.append_tokens(ids)  # prefill: runs the model over the prompt
        times: list[float] = []
        while not gen.is_done() and len(times) < n:
            gen.generate_next_token()  # samples from the pending logits, then (next call) one decode step
            gen.get_next_tokens()
            times.append(time.perf_counter() - t_base)
        del gen
        return start, times

    for i in range(min(args.warmup, len(requests))):  # unmeasured: first-run allocations
        generate(requests[i]["prompt_ids"], 8, time.perf_counter())
    records = []
    t_base = time.perf_counter()
    for i, r in enumerate(requests):
        start, times = generate(r["prompt_ids"], int(r["output_len"]), t_base)
        records.append(record(i, len(r["prompt_ids"]), int(r["output_len"]), start, times))
        log(f"request {i + 1}/{len(requests)}: {len(times)} tokens, ttft {records[-1]['ttft'] * 1e3:.1f} ms")
    duration = time.perf_counter() - t_base
    return {"records": records, "duration_s": duration, "load_s": load_s, "max_concurrency": 1,
            "versions": {"onnxruntime-genai": getattr(og, "__version__", "?"), **_versions("onnxruntime")},
            "settings": {"providers": "cpu", "intra_op_num_threads": args.threads,
                         "overlay": hasattr(config, "overlay")}}


def run_openvino(args: argparse.Namespace, requests: list[dict[str, Any]]) -> dict[str, Any]:
    ov_genai: Any = importlib.import_module("openvino_genai")
    ov: Any = importlib.import_module("openvino")
    np: Any = importlib.import_module("numpy")
    conc = args.max_concurrency or len(requests)
    sched = ov_genai.SchedulerConfig()
    sched.cache_size = int(args.ov_cache_gb) if args.ov_cache_gb >= 1 else 1  # GB of KV cache
    sched.max_num_seqs = max(conc, 1)
    sched.enable_prefix_caching = False  # every prompt is distinct; no cache carried between requests
    sched.dynamic_split_fuse = True
    sched.max_num_batched_tokens = args.ov_max_batched_tokens
    props: dict[str, Any] = {"INFERENCE_NUM_THREADS": args.threads}
    for kv in args.ov_prop:  # e.g. KV_CACHE_PRECISION=u8
        k, _, v = kv.partition("=")
        props[k] = int(v) if v.isdigit() else v
    t0 = time.perf_counter()
    pipe = ov_genai.ContinuousBatchingPipeline(args.model_dir, sched, "CPU", props)
    load_s = time.perf_counter() - t0

    def gen_config(n: int) -> Any:
        c = ov_genai.GenerationConfig()
        c.max_new_tokens, c.min_new_tokens, c.ignore_eos, c.do_sample = n, n, True, False
        return c

    def run(batch: list[dict[str, Any]], t_base: float, first_index: int, rid: list[int]) -> list[dict[str, Any]]:
        """Run these requests to completion; admits `conc` at a time, the next as soon as one finishes."""
        pending = list(enumerate(batch, first_index))
        live: dict[int, tuple[Any, dict[str, Any], float, list[float]]] = {}
        done: list[dict[str, Any]] = []
        while pending or live:
            while pending and len(live) < conc:
                i, r = pending.pop(0)
                ids = ov.Tensor(np.asarray([r["prompt_ids"]], dtype=np.int64))
                rid[0] += 1
                handle = pipe.add_request(rid[0], ids, gen_config(int(r["output_len"])))
                live[i] = (handle, r, time.perf_counter() - t_base, [])
            pipe.step()
            now = time.perf_counter() - t_base
            for i in list(live):
                handle, r, start, times = live[i]
                while handle.can_read():
                    for out in handle.read().values():
                        times.extend([now] * len(out.generated_ids))
                if handle.get_status() != ov_genai.GenerationStatus.RUNNING and not handle.can_read():
                    done.append(record(i, len(r["prompt_ids"]), int(r["output_len"]), start, times))
                    del live[i]
        return sorted(done, key=lambda d: d["index"])

    rid = [0]
    if args.warmup:
        run([{"prompt_ids": r["prompt_ids"], "output_len": 8} for r in requests[: args.warmup]],
            time.perf_counter(), 0, rid)
    t_base = time.perf_counter()
    records = run(requests, t_base, 0, rid)
    duration = time.perf_counter() - t_base
    metrics = {}
    with contextlib.suppress(Exception):  # diagnostics only
        pm = pipe.get_metrics()
        keys = ("cache_usage", "max_cache_usage", "avg_cache_usage", "requests", "scheduled_requests")
        metrics = {"ov_metrics": {k: getattr(pm, k) for k in keys if hasattr(pm, k)}}
    return {"records": records, "duration_s": duration, "load_s": load_s, "max_concurrency": conc,
            "versions": {"openvino-genai": str(ov_genai.__version__), **_versions("openvino")},
            "settings": {"device": "CPU", **props, "cache_size_gb": sched.cache_size,
                         "max_num_seqs": sched.max_num_seqs,
                         "max_num_batched_tokens": sched.max_num_batched_tokens, "dynamic_split_fuse": True,
                         "enable_prefix_caching": False}, **metrics}


def _versions(*dists: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for d in dists:
        with contextlib.suppress(PackageNotFoundError):
            out[d] = version(d)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("backend", choices=("ortgenai", "openvino"))
    p.add_argument("--model-dir", required=True)
    p.add_argument("--requests", required=True, help='JSON: {"requests": [{"prompt_ids": [...], "output_len": N}]}')
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-concurrency", type=int, default=None, help="openvino: requests in flight (default: all)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured short requests first")
    p.add_argument("--ov-cache-gb", type=float, default=2.0, help="openvino: KV cache size")
    p.add_argument("--ov-prop", action="append", default=[], metavar="KEY=VALUE",
                   help="openvino: extra compile property (repeatable), e.g. KV_CACHE_PRECISION=u8")
    p.add_argument("--ov-max-batched-tokens", type=int, default=2048, help="openvino: tokens per scheduler step")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with open(args.requests) as f:
        requests = json.load(f)["requests"]
    runner = run_ortgenai if args.backend == "ortgenai" else run_openvino
    out = runner(args, requests)
    out["backend"] = args.backend
    print(RESULT_PREFIX + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
