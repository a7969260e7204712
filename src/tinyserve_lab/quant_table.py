"""`tinyserve bench quant`: the quantization table — method x bits x group size, each row a
`tinyserve quantize` directory served by the engine, against the unquantized (fp32) model.

Two stages, so that only the timings need a quiet machine:
- `--stage quality` quantizes every configuration (or reuses a directory made with the same options)
  and measures it with `bench quality`'s instrument (perplexity on Hamlet, KLD and top-1 vs fp32, greedy
  agreement; tinyserve_lab/quality.py); quantize time is measured here;
- `--stage speed` starts each directory in a fresh process (so its peak RSS is its own) and runs
  `bench quality`'s speed measurement: decode tok/s at batch 1 and 32, prefill tok/s;
- `--stage table` (also run after either stage) joins the newest result of each stage into the markdown
  table and two plots (quality vs bytes, speed vs bytes).

Rows named torchao-*, bnb-* and hf-16b are the field's tools on the same model in transformers
(tinyserve_lab/field_tools.py), measured by the same instrument against the same fp32 reference.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tinyserve_lab.field_tools import FIELD_METHODS, installed
from tinyserve_lab.quality import MODES, REFERENCE, SPEED_BATCHES, SPEED_INPUT, SPEED_OUTPUT, Mode

QUALITY_SCHEMA = "tinyserve_lab.quant-quality/1"
SPEED_SCHEMA = "tinyserve_lab.quant-speed/1"
BASELINES = ("fp32", "bf16", "gguf")  # the unquantized reference, its bf16 twin, the bundled file's own blocks
QUALITY_PACKED_MAX_BATCH = 16  # pinned in the quality stage: no kernel timing on a shared machine there


@dataclass(frozen=True)
class QuantConfig:
    method: str
    bits: int
    group: int
    act_order: bool = False  # gptq (the reference code's defaults; `tinyserve quantize` defaults differ)
    damp: float = 0.01  # gptq
    zero: str = "float"  # 3/4-bit zero points: float | int | sym (`tinyserve quantize --zero`)

    @property
    def name(self) -> str:
        return (f"{self.method}-{self.bits}b" + ("" if self.bits >= 8 else f"-g{self.group}")
                + ("-act" if self.act_order else "") + (f"-d{self.damp:g}" if self.damp != 0.01 else "")
                + ("" if self.zero == "float" else f"-z{self.zero}"))


def default_configs() -> list[QuantConfig]:
    """Where the calibrated methods must show their worth (4-bit group 64, 3-bit groups 32 and 64), RTN at
    4-bit group 32 (the bundled file's own grid: its layers are Q4_1), NF4 at both groups, int8 per channel.
    From scratch the whole list takes ~25 min on a 2-core machine (docs/REPORT.md section Q)."""
    out = [QuantConfig("rtn", 4, 32)]
    for b, g in ((4, 64), (3, 32), (3, 64)):  # GPTQ as the reference code runs it, and with act-order + damp 0.1
        out += [QuantConfig("rtn", b, g), QuantConfig("gptq", b, g), QuantConfig("gptq", b, g, True, 0.1),
                QuantConfig("awq", b, g)]
    out += [QuantConfig("nf4", 4, g) for g in (32, 64)] + [QuantConfig("rtn", 8, 0)]
    return out + [c for c in FIELD_CONFIGS if installed(c.method) is None]


# The field's tools (tinyserve_lab/field_tools.py), where they import: the transformers control row, torchao's
# int8 and int4 weight-only, bitsandbytes' NF4 and LLM.int8.
FIELD_CONFIGS = (QuantConfig("hf", 16, 0), QuantConfig("torchao", 8, 0), QuantConfig("torchao", 4, 32),
                 QuantConfig("torchao", 4, 64), QuantConfig("bnb", 4, 64), QuantConfig("bnb", 8, 0))


def is_field(c: QuantConfig) -> bool:
    return c.method in FIELD_METHODS


def parse_config(text: str) -> QuantConfig:
    """'gptq-4b-g64' / 'rtn-8b' / 'gptq-3b-g32-act-d0.1' (GPTQ act-order, dampening 0.1) / 'awq-4b-g64-zint'
    (integer zero points; -zsym: symmetric) -> QuantConfig."""
    parts = text.split("-")
    try:
        method, bits = parts[0], int(parts[1].removesuffix("b"))
        rest = parts[2:]
        group = int(rest.pop(0).removeprefix("g")) if rest and rest[0].startswith("g") else 0
        act = "act" in rest
        damp = float(next((r[1:] for r in rest if r.startswith("d")), 0.01))
        zero = next((r[1:] for r in rest if r in ("zint", "zsym")), "float")
        if set(rest) - {"act", "zint", "zsym"} - {r for r in rest if r.startswith("d")}:
            raise ValueError(rest)
    except (IndexError, ValueError):
        raise argparse.ArgumentTypeError(f"config {text!r}: expected METHOD-BITSb-gGROUP[-act][-dDAMP][-zint|-zsym], "
                                         "e.g. gptq-4b-g64") from None
    return QuantConfig(method, bits, group, act, damp, zero)


# -- checkpoints ------------------------------------------------------------------------------------------
def ensure_checkpoint(c: QuantConfig, root: Path, args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """The configuration's directory under `root`: reused when its quantization.json records the same
    options (and `--requantize` is off), made otherwise."""
    from tinyserve.models.quantized import is_quantized_dir, read_info
    from tinyserve_lab.quantize.pipeline import QuantizeOptions, quantize_model

    opts = QuantizeOptions(c.method, c.bits, c.group or 64, args.calib_samples, args.calib_seq_len, args.seed,
                           c.act_order, c.damp, zero=c.zero)
    out = root / c.name
    if not args.requantize and is_quantized_dir(out):
        info = read_info(out)
        defaults = asdict(QuantizeOptions())  # an option newer than the directory had its default then
        if all(info.get(k, defaults[k]) == v for k, v in asdict(opts).items()):
            return out, info
    return out, quantize_model(args.model, opts, out, progress=True)


def mode_of(c: QuantConfig, path: Path, packed_max_rows: int | None) -> Mode:
    return Mode(c.name, "bfloat16", "checkpoint", packed_max_rows=packed_max_rows, model=str(path))


def baseline_modes(args: argparse.Namespace) -> list[Mode]:
    """fp32 (the reference: always measured for quality), bf16, and the bundled file's own blocks."""
    names = [REFERENCE] if args.skip_baselines else BASELINES
    return [MODES[m] for m in names if args.model is None or m != "gguf"]


# -- stages --------------------------------------------------------------------------------------------------
def quality_stage(args: argparse.Namespace, configs: list[QuantConfig], root: Path) -> dict[str, Any]:
    from tinyserve_lab.quality import Reference, run_modes

    ours, field = [c for c in configs if not is_field(c)], [c for c in configs if is_field(c)]
    made = {c.name: ensure_checkpoint(c, root, args) for c in ours}
    modes = baseline_modes(args) + [mode_of(c, made[c.name][0], QUALITY_PACKED_MAX_BATCH) for c in ours]
    held: list[tuple[Reference, list[list[int]]]] = []
    doc = run_modes(modes, args.windows, args.tokens, args.prompts, speed=False, model=args.model,
                    num_threads=args.num_threads, on_reference=lambda ref, windows: held.append((ref, windows)))
    if field:
        doc["modes"] += field_quality_rows(args, field, *held[0])
    by_name = {c.name: c for c in ours}
    for r in doc["modes"]:
        if r["mode"] in by_name:
            path, info = made[r["mode"]]
            r.update(config=asdict(by_name[r["mode"]]), checkpoint=str(path),
                     checkpoint_bytes=(path / "model.safetensors").stat().st_size,
                     quantize_seconds=info["quantize_seconds"], calibration=info.get("calibration"))
    return {**doc, "schema": QUALITY_SCHEMA}


def field_quality_rows(args: argparse.Namespace, configs: list[QuantConfig], ref: Any,
                       windows: list[list[int]]) -> list[dict[str, Any]]:
    """The field's tools scored against tinyserve's fp32 reference, on the same windows and prompt ids."""
    from tqdm import tqdm

    from tinyserve.models.loader import model_config, resolve_model
    from tinyserve.tokenizer import load_tokenizer
    from tinyserve_lab import field_tools
    from tinyserve_lab.quality import CHAT_PROMPTS, GREEDY_TOKENS

    src = resolve_model(args.model)
    cfg = model_config(src)
    tok = load_tokenizer(src, eos_token_ids=cfg.eos_token_ids)
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], True) for p in CHAT_PROMPTS[:args.prompts]]
    hf_dir = str(src.hf_directory())
    return [{**field_tools.quality_row(c.name, c.method, c.bits, c.group, hf_dir, ref, windows, prompts,
                                       cfg.eos_token_ids, GREEDY_TOKENS), "config": asdict(c)}
            for c in tqdm(configs, desc="field tools")]


def field_speed_worker(c: QuantConfig, model: str | None) -> dict[str, Any]:
    """In a process of its own: the tool's model, timed like the engine, and its peak RSS."""
    from tinyserve.models.loader import model_config, resolve_model
    from tinyserve_lab import field_tools

    src = resolve_model(model)
    start = time.perf_counter()
    m, _ = field_tools.load(c.method, c.bits, c.group, str(src.hf_directory()))
    startup_s = time.perf_counter() - start
    speed = field_tools.speed(m, model_config(src).vocab_size, SPEED_BATCHES, SPEED_INPUT, SPEED_OUTPUT)
    return {"mode": c.name, "speed": speed, "startup_s": round(startup_s, 1),
            "weight_bytes_packed": field_tools.weight_bytes(m),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def speed_worker(mode: Mode, num_threads: int | None) -> dict[str, Any]:
    """In a process of its own: start the mode, time it, report peak RSS (model + KV pool + activations)."""
    from tinyserve_lab.quality import measure_speed, start_mode, weight_memory

    need = max(SPEED_BATCHES) * (SPEED_INPUT + SPEED_OUTPUT)
    llm, startup_s = start_mode(mode, num_kv_blocks=-(-need // 16) + max(SPEED_BATCHES), num_threads=num_threads)
    speed = measure_speed(llm.engine)
    held, packed = weight_memory(llm.engine.model)
    return {"mode": mode.name, "speed": speed, "startup_s": round(startup_s, 1), "weight_bytes": held,
            "weight_bytes_packed": packed, "packed_max_rows": llm.engine.packed_max_rows,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def speed_stage(args: argparse.Namespace, configs: list[QuantConfig], root: Path) -> dict[str, Any]:
    from tqdm import tqdm

    from tinyserve.models.quantized import is_quantized_dir
    from tinyserve_lab.env_info import run_header

    ours = [c for c in configs if not is_field(c)]
    missing = [c.name for c in ours if not is_quantized_dir(root / c.name)]
    if missing:
        raise ValueError(f"no checkpoint for {', '.join(missing)} under {root}: run --stage quality first")
    modes = ([] if args.skip_baselines else baseline_modes(args)) + [mode_of(c, root / c.name, None) for c in ours]
    jobs = [(m.name, ["--speed-worker", json.dumps(asdict(m))]) for m in modes]
    jobs += [(c.name, ["--field-speed-worker", json.dumps(asdict(c))] + (["--model", args.model] if args.model else []))
             for c in configs if is_field(c)]
    rows = []
    for name, worker_args in tqdm(jobs, desc="speed"):
        cmd = [sys.executable, "-m", "tinyserve_lab.quant_table", *worker_args]
        if args.num_threads:
            cmd += ["--num-threads", str(args.num_threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"speed worker for {name} failed:\n{proc.stderr[-2000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return run_header(SPEED_SCHEMA, model=args.model or "SmolLM2-135M-Instruct", batches=list(SPEED_BATCHES),
                      input_len=SPEED_INPUT, output_len=SPEED_OUTPUT, modes=rows)


# -- the table and plots -------------------------------------------------------------------------------------
def newest(result_dir: Path, schema: str) -> dict[str, Any] | None:
    """The newest result of `schema` under result_dir, its `modes` extended by the newest row of every
    mode that only older results measured (so a stage can be run in parts, e.g. the timing one in short
    exclusive slices)."""
    docs = []
    for p in sorted(result_dir.glob("quant-*.json")):
        try:
            doc = json.loads(p.read_text())
        except ValueError:
            continue
        if doc.get("schema") == schema:
            docs.append(doc)
    if not docs:
        return None
    docs.sort(key=lambda d: d["date"])
    rows: dict[str, dict[str, Any]] = {}
    for doc in docs:
        rows.update({r["mode"]: {**r, "result_date": doc["date"]} for r in doc["modes"]})
    return {**docs[-1], "modes": list(rows.values())}


def joined_rows(quality: dict[str, Any] | None, speed: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per mode: the quality stage's fields, the speed stage's under 'speed_run'."""
    speeds = {r["mode"]: r for r in (speed or {}).get("modes", [])}
    rows = [{**r, "speed_run": speeds.pop(r["mode"], None)} for r in (quality or {}).get("modes", [])]
    return rows + [{"mode": m, "speed_run": r} for m, r in speeds.items()]


def _tok_s(r: dict[str, Any], batch: int, key: str) -> str:
    pts = {p["batch"]: p for p in ((r.get("speed_run") or {}).get("speed") or [])}
    return f"{pts[batch][key]:.0f}" if batch in pts else "-"


def markdown_table(quality: dict[str, Any] | None, speed: dict[str, Any] | None) -> str:
    header = ["mode", "file MiB", "weights MiB (packed)", "peak RSS MiB", "quantize s", "decode tok/s b1",
              "decode tok/s b32", "prefill tok/s", "PPL", "ΔPPL %", "KLD mean", "KLD p99", "top-1 %", "greedy same",
              "greedy prefix %"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    mib = 2**20
    for r in joined_rows(quality, speed):
        s = r.get("speed_run") or {}
        n = len((quality or {}).get("greedy", {}).get("prompts", [])) or 1
        q = "ppl" in r
        lines.append("| " + " | ".join([
            r["mode"],
            f"{r['checkpoint_bytes'] / mib:.0f}" if r.get("checkpoint_bytes") else "-",
            f"{(r.get('weight_bytes_packed') or s.get('weight_bytes_packed', 0)) / mib:.0f}",
            f"{s['peak_rss_bytes'] / mib:.0f}" if s else "-",
            f"{r['quantize_seconds']:.0f}" if r.get("quantize_seconds") is not None else "-",
            _tok_s(r, 1, "decode_tok_s"), _tok_s(r, max(SPEED_BATCHES), "decode_tok_s"),
            _tok_s(r, max(SPEED_BATCHES), "prefill_tok_s"),
            f"{r['ppl']:.3f}" if q else "-", f"{r['ppl_delta_pct']:+.2f}" if q else "-",
            f"{r['kld_mean']:.4f}" if q else "-", f"{r['kld_p99']:.3f}" if q else "-",
            f"{100 * r['top1_agreement']:.1f}" if q else "-",
            f"{round(r['greedy_identical'] * n)}/{n}" if q else "-", f"{100 * r['greedy_prefix']:.0f}" if q else "-",
        ]) + " |")
    notes = [f"Reference: {REFERENCE} (the bundled GGUF dequantized). Modes: METHOD-BITSb-gGROUP, bf16 "
             "activations; 3-bit codes run on the int4 kernel; nf4 on tinyserve's NF4 kernel "
             "(layers/csrc/nf4_linear.cpp); 8-bit is per output channel on the int8 kernel; every quantized "
             "directory's LM head (the tied embedding) is int8 per row."]
    if any(r["mode"].split("-")[0] in FIELD_METHODS for r in joined_rows(quality, speed)):
        notes.append("hf-16b, torchao-*, bnb-*: the tool on the same model in transformers "
                     "(tinyserve_lab/field_tools.py), its own kernels and HF generate; hf-16b is transformers bf16 "
                     "unquantized (the control); torchao rows quantize the head int8 as ours, bnb rows leave it "
                     "bf16 (tied to the embedding).")
    if quality:
        t = quality["text"]
        notes.append(f"Quality: {t['windows']} x {t['window_tokens']} tokens of {t['file']} ({t['scored_tokens']:,} "
                     f"scored), {n} chat prompts x {quality['greedy']['max_tokens']} greedy tokens "
                     "(tinyserve_lab/quality.py).")
    if speed:
        notes.append(f"Speed: {speed['input_len']} prompt / {speed['output_len']} generated tokens per sequence, eager "
                     "engine, each mode in a fresh process (peak RSS: weights + KV pool + activations + runtime); "
                     f"prefill at batch {max(SPEED_BATCHES)}.")
    return "\n".join(lines) + "\n\n" + " ".join(notes) + "\n"


COLORS = {"rtn": "tab:blue", "gptq": "tab:orange", "awq": "tab:green", "nf4": "tab:purple", "torchao": "tab:red",
          "bnb": "tab:brown", "hf": "tab:olive"}


def _size_mib(r: dict[str, Any]) -> float:
    """The weights as the engine (or the tool) holds them (packed): the memory a mode really costs."""
    return float(r.get("weight_bytes_packed") or (r.get("speed_run") or {}).get("weight_bytes_packed", 0)) / 2**20


def _scatter_plot(points: list[tuple[str, float, float, str]], ylabel: str, title: str, path: Path) -> Path:
    """One log-y scatter of (mode, MiB, value, marker) points, colored by method, each point labeled:
    the figure both plots share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for mode, x, y, marker in points:
        ax.scatter(x, y, color=COLORS.get(mode.split("-")[0], "tab:gray"), marker=marker, s=40)
        ax.annotate(mode, (x, y), xytext=(3, 3), textcoords="offset points", fontsize=6)
    ax.set_yscale("log")
    ax.set_xlabel("weights in memory, MiB (packed codes + scales; bf16 dense)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot(quality: dict[str, Any] | None, speed: dict[str, Any] | None, out_dir: Path) -> list[Path]:
    """quality (KLD) vs bytes and decode speed vs bytes, one point per mode, colored by method."""
    rows = joined_rows(quality, speed)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    if quality:
        pts = [(r["mode"], _size_mib(r), max(r["kld_mean"], 1e-5), "^" if "-3b" in r["mode"] else "o")
               for r in rows if "kld_mean" in r and r["mode"] != REFERENCE]
        paths.append(_scatter_plot(pts, "mean KL(P_fp32 || P_mode) per token (log)",
                                   "Quantization: quality vs bytes (triangles: 3-bit)",
                                   out_dir / "quant_quality_vs_bytes.png"))
    if speed:
        pts = [(r["mode"], _size_mib(r), float(v), marker) for r in rows if r.get("speed_run")
               for batch, marker in ((1, "o"), (max(SPEED_BATCHES), "s"))
               if (v := _tok_s(r, batch, "decode_tok_s")) != "-"]
        paths.append(_scatter_plot(pts, f"decode tok/s (circles: batch 1, squares: batch {max(SPEED_BATCHES)})",
                                   "Quantization: decode speed vs bytes", out_dir / "quant_speed_vs_bytes.png"))
    return paths


# -- the command ----------------------------------------------------------------------------------------------
def add_quant_args(p: argparse.ArgumentParser) -> None:
    from tinyserve_lab.quantize.pipeline import QuantizeOptions

    d = QuantizeOptions()
    p.add_argument("--stage", choices=("quality", "speed", "table"), default="quality",
                   help="quality (quantize + PPL/KLD/greedy; shared machine is fine), speed (timings: run it on a "
                        "quiet machine), table (markdown + plots from the newest results)")
    p.add_argument("--configs", nargs="+", type=parse_config, default=None,
                   help="METHOD-BITSb-gGROUP (e.g. gptq-4b-g64, rtn-8b); default: the full table")
    p.add_argument("--model", default=None, help="default: the bundled SmolLM2 (its GGUF blocks are a baseline row)")
    p.add_argument("--checkpoints", default=None, help="where the quantized directories live (default: the cache)")
    p.add_argument("--requantize", action="store_true", help="quantize again even where a matching directory exists")
    p.add_argument("--skip-baselines", action="store_true",
                   help="only the quantized configs (and fp32, the quality reference): to run a stage in parts")
    p.add_argument("--calib-samples", type=int, default=d.calib_samples)
    p.add_argument("--calib-seq-len", type=int, default=d.calib_seq_len)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--windows", type=int, default=4, help="Hamlet windows for perplexity/KLD")
    p.add_argument("--tokens", type=int, default=512, help="tokens per window")
    p.add_argument("--prompts", type=int, default=16, help="chat prompts for greedy agreement")
    p.add_argument("--num-threads", type=int, default=None)
    p.add_argument("--result-dir", default="docs/results/quant", help="result JSONs (read back by --stage table)")
    p.add_argument("--plot-dir", default="docs/results/quant", help="where the plots go (beside the JSONs)")


def run_quant(args: argparse.Namespace) -> dict[str, Any] | None:
    from tinyserve.system import cache_dir
    from tinyserve_lab.env_info import save_json

    configs = args.configs or default_configs()
    root = Path(args.checkpoints) if args.checkpoints else cache_dir() / "quantized" / (
        Path(args.model).name if args.model else "SmolLM2-135M-Instruct")
    result_dir = Path(args.result_dir)
    doc = None
    if args.stage == "quality":
        doc = quality_stage(args, configs, root)
    elif args.stage == "speed":
        doc = speed_stage(args, configs, root)
    if doc is not None:
        print(f"wrote {save_json(doc, result_dir, 'quant-' + args.stage)}")
    quality, speed = newest(result_dir, QUALITY_SCHEMA), newest(result_dir, SPEED_SCHEMA)
    print(markdown_table(quality, speed))
    for path in plot(quality, speed, Path(args.plot_dir)):
        print(f"wrote {path}")
    return doc


def _worker_main() -> None:
    p = argparse.ArgumentParser()
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--speed-worker")
    g.add_argument("--field-speed-worker")
    p.add_argument("--model", default=None)
    p.add_argument("--num-threads", type=int, default=None)
    a = p.parse_args()
    if a.speed_worker:
        print(json.dumps(speed_worker(Mode(**json.loads(a.speed_worker)), a.num_threads)))
        return
    import torch

    from tinyserve.system import physical_cores

    torch.set_num_threads(a.num_threads or physical_cores())
    print(json.dumps(field_speed_worker(QuantConfig(**json.loads(a.field_speed_worker)), a.model)))


if __name__ == "__main__":
    _worker_main()
