"""`tinyserve bench cuda-check` (and scripts/gpu_check.sh): the engine on a GPU, for a session lent one.

Correctness on a tiny random Llama in fp32 (our greedy == transformers' greedy on the device; compiled ==
eager; a batch == its sequences alone; chunked prefill + prefix cache; draft-model speculation == plain;
vLLM-shaped logprobs; bf16 greedy against fp32), then offline decode speed on random weights of real
shapes (SmolLM2-135M, Qwen2.5-0.5B) in bf16 per serving mode (eager, CUDA graphs, compiled, FP8
weights, FP8 KV): c=1 and c=32 throughput, batch-1 decode tok/s and the weight bytes it streams per
second against the card's memory bandwidth. Before that, the test files that take a `device` fixture,
run with `--device cuda`, and the Triton kernels' tests on the GPU (when pytest is importable). One JSON
line per result, written as it goes, so a time-out keeps what was done; at the end one JSON document and
a markdown summary beside it.

Needs only torch and transformers beside the engine, from a checkout (`PYTHONPATH=src`): the weights are
random and the tokenizer is a word-level one built here unless `--tokenizer` names an HF tokenizer
directory. `--device cpu --dry-run` runs every part at tiny sizes (what a CPU can: no CUDA graphs).

    PYTHONPATH=src python -m tinyserve_lab.cuda_check --out-dir gpu-check [--device cuda] [--dry-run]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import transformers

from tinyserve import LLM, SamplingParams
from tinyserve.layers.linear import weight_bytes

TINY: dict[str, Any] = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
SHAPES = {  # name -> (architecture, config): random weights, real shapes
    "SmolLM2-135M shapes": ("llama", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                          num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                          max_position_embeddings=2048, tie_word_embeddings=True)),
    "Qwen2.5-0.5B shapes": ("qwen2", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                          num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                          max_position_embeddings=4096, tie_word_embeddings=True)),
}
VOCAB = max(cfg["vocab_size"] for _, cfg in SHAPES.values())
# Serving modes timed per shape (engine knobs); the compiled one only on the first shape, after the rest
# (its build is the slow part of the check). `--compile off` leaves CUDA graphs (on by default on a GPU) serving the
# decode steps, so the FP8 modes compare with "cuda-graphs".
MODES: dict[str, dict[str, Any]] = {
    "eager": dict(enforce_eager=True),
    "cuda-graphs": dict(compile="off", cuda_graphs=True),  # refused on a CPU: recorded as skipped
    "compiled": dict(compile="blocking"),
    "fp8-weights+graphs": dict(compile="off", quantization="fp8"),
    "fp8-kv+graphs": dict(compile="off", kv_cache_dtype="fp8_e4m3"),
}
# Memory bandwidth by device name, most specific first (vendor figures).
BANDWIDTH_TB_S = (("H200", 4.8), ("H100 NVL", 3.9), ("H100 PCIe", 2.0), ("H100", 3.35), ("A100", 2.0))
DEVICE_TEST = re.compile(r"def test_\w+\([^)]*\bdevice\b")


def bandwidth_tb_s(device_name: str) -> float | None:
    return next((bw for key, bw in BANDWIDTH_TB_S if key in device_name), None)


def word_tokenizer(path: Path, vocab: int) -> None:
    """A word-level tokenizer of `vocab` tokens ("<unk>", "<s>", "</s>", then t3, t4, ...) saved as an HF
    tokenizer directory: enough to load, detokenize and serve random-weight models with no hub."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *(f"t{i}" for i in range(3, vocab))])}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                         unk_token="<unk>").save_pretrained(path)


class Check:
    def __init__(self, tokenizer: Path, out_dir: Path, device: str, dry_run: bool = False,
                 budget_s: float = 1e9) -> None:
        self.tokenizer, self.out_dir, self.device, self.dry_run = tokenizer, out_dir, device, dry_run
        self.deadline = time.monotonic() + budget_s  # speed modes are skipped past it; the summary still written
        self.on_gpu = device != "cpu"
        self.rows: list[dict[str, Any]] = []
        out_dir.mkdir(parents=True, exist_ok=True)
        self.lines = out_dir / "gpu-check.jsonl"
        self.lines.write_text("")

    def emit(self, **row: Any) -> None:
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        with self.lines.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def sync(self) -> None:
        if self.on_gpu:
            torch.cuda.synchronize()

    def environment(self) -> None:
        import platform

        row: dict[str, Any] = dict(check="environment", python=platform.python_version(), torch=torch.__version__,
                                   cuda=torch.version.cuda, transformers=transformers.__version__)
        try:
            row["triton"] = importlib.import_module("triton").__version__
        except ImportError:
            row["triton"] = None
        if self.on_gpu:
            props = torch.cuda.get_device_properties(self.device)
            row.update(device=props.name, capability=list(torch.cuda.get_device_capability(self.device)),
                       memory_gib=round(props.total_memory / 2**30, 1), bandwidth_tb_s=bandwidth_tb_s(props.name))
            if shutil.which("nvidia-smi"):
                smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,power.limit",
                                      "--format=csv,noheader"], capture_output=True, text=True)
                row["nvidia_smi"] = smi.stdout.strip()
        else:
            row["device"] = "cpu"
        self.emit(**row)

    def device_tests(self, root: Path) -> None:
        """The test files with tests that take the `device` fixture, run on this device."""
        files = sorted(str(f) for f in (root / "tests").glob("test_*.py") if DEVICE_TEST.search(f.read_text()))
        try:
            import pytest  # noqa: F401  # only whether it is there
        except ImportError:
            self.emit(check="device tests", skipped="pytest is not importable here")
            return
        self.pytest(root, "device tests", ["--device", self.device, *files], {})
        # The Triton kernels' tests pick their device from the environment (tests/triton_interp.py).
        triton = sorted(str(f) for f in (root / "tests").glob("test_triton_*.py"))
        if self.on_gpu and triton:
            self.pytest(root, "triton tests", triton, {"TINYSERVE_TRITON_DEVICE": "cuda"})

    def pytest(self, root: Path, name: str, args: list[str], env: dict[str, str]) -> None:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args],
                              capture_output=True, text=True, cwd=root, env={**os.environ, **env})
        (self.out_dir / f"{name.replace(' ', '-')}.txt").write_text(proc.stdout + proc.stderr)
        tail = [ln for ln in proc.stdout.splitlines() if ln.strip()][-1:] or [""]
        self.emit(check=name, ok=proc.returncode == 0, summary=tail[0], seconds=round(time.perf_counter() - start, 1))

    def checkpoint(self, arch: str, widen: bool = True, **cfg: Any) -> str:
        """A random-weight transformers checkpoint with the tokenizer's files, in a temporary directory."""
        torch.manual_seed(0)
        path = Path(tempfile.mkdtemp())
        model: Any = (transformers.LlamaForCausalLM(transformers.LlamaConfig(bos_token_id=1, eos_token_id=2, **cfg))
                      if arch == "llama" else
                      transformers.Qwen2ForCausalLM(transformers.Qwen2Config(bos_token_id=1, eos_token_id=2, **cfg)))
        if widen:  # default init is tiny; widen it so logits are far from ties
            with torch.no_grad():
                for p in model.parameters():
                    if p.dim() > 1:
                        p.normal_(0, 0.2)
        model.save_pretrained(path)
        for f in self.tokenizer.iterdir():
            if f.is_file():
                shutil.copy(f, path / f.name)
        return str(path)

    def correctness(self) -> None:
        tiny = self.checkpoint("llama", **TINY)
        prompts = [list(range(100, 140)), [7, 8, 9, 10], [5]]
        greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
        hf: Any = transformers.LlamaForCausalLM.from_pretrained(tiny, dtype=torch.float32)
        hf = hf.to(self.device).eval()
        with torch.inference_mode():
            ref = [hf.generate(torch.tensor([p], device=self.device), max_new_tokens=16, min_new_tokens=16,
                               do_sample=False)[0, len(p):].tolist() for p in prompts]
        kw: dict[str, Any] = dict(device=self.device, dtype="float32", num_kv_blocks=256, block_size=16)
        eager = LLM(tiny, enforce_eager=True, **kw)

        def tokens(llm: LLM, ps: list[list[int]]) -> list[list[int]]:
            return [o.outputs[0].token_ids for o in llm.generate(ps, greedy)]

        got = tokens(eager, prompts)
        self.emit(check="fp32 eager == transformers greedy", ok=got == ref, attention=eager.engine.attention.name,
                  quantization=eager.engine.quantization)
        self.emit(check="fp32 batch == each sequence alone", ok=[tokens(eager, [p])[0] for p in prompts] == got)
        if self.on_gpu:
            graphs = LLM(tiny, compile="off", **kw)
            self.emit(check="fp32 CUDA graphs == eager", ok=tokens(graphs, prompts) == got,
                      graphs=sorted(graphs.engine.runner.graphs.graphs) if graphs.engine.runner.graphs else None)
        if not self.dry_run:  # the compiled step's build takes minutes on a CPU
            start = time.perf_counter()
            compiled = LLM(tiny, enforce_eager=False, **kw)
            self.emit(check="compiled start-up", seconds=round(time.perf_counter() - start, 1),
                      compile_seconds=round(compiled.engine.compile_seconds, 1))
            self.emit(check="fp32 compiled == eager", ok=tokens(compiled, prompts) == got)
        chunked = LLM(tiny, enforce_eager=True, max_num_batched_tokens=8, **kw)
        shared = [list(range(300, 340)) + [i] for i in range(3)]
        first = tokens(chunked, shared)
        again = chunked.generate(shared, greedy)
        self.emit(check="chunked prefill + prefix cache == eager",
                  ok=[o.outputs[0].token_ids for o in again] == first == tokens(eager, shared),
                  cached_tokens=[o.num_cached_tokens for o in again])
        spec = LLM(tiny, enforce_eager=True, **kw,
                   speculative_config={"model": tiny, "num_speculative_tokens": 3, "adaptive": False})
        self.emit(check="draft-model speculation == plain", ok=tokens(spec, prompts) == got,
                  drafted=spec.engine.stats().spec_decode_num_draft_tokens,
                  accepted=spec.engine.stats().spec_decode_num_accepted_tokens)
        out = eager.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=3, logprobs=2,
                                                          prompt_logprobs=1))[0]
        first_token, lps, scored = out.outputs[0].token_ids[0], out.outputs[0].logprobs, out.prompt_logprobs
        self.emit(check="vLLM-shaped logprobs", ok=lps is not None and scored is not None
                  and lps[0][first_token].rank == 1 and scored[0] is None and prompts[0][1] in (scored[1] or {}))
        low = tokens(LLM(tiny, enforce_eager=True, device=self.device, dtype="bfloat16", num_kv_blocks=256), prompts)
        self.emit(check="bf16 greedy tokens equal to fp32's (random weights: near-ties)",
                  same=sum(a == b for x, y in zip(low, got) for a, b in zip(x, y)), of=16 * len(prompts))

    def speed(self, name: str, arch: str, cfg: dict[str, Any], modes: dict[str, dict[str, Any]]) -> None:
        """Offline generate per mode: c=1 and c=N output tok/s (128-token prompts, 64 out; N = 32, 4 in a dry
        run), and batch 1's
        decode alone (the time past a 1-token run) with the weight bytes it streams per second."""
        path = self.checkpoint(arch, widen=False, **cfg)
        out_len = 8 if self.dry_run else 64
        prompts = [list(range(1000 + i, 1128 + i)) for i in range(32)]
        batches = (1, 4) if self.dry_run else (1, 32)
        params = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)
        name_bw = bandwidth_tb_s(torch.cuda.get_device_name(self.device)) if self.on_gpu else None
        for mode, knobs in modes.items():
            if time.monotonic() > self.deadline:
                self.emit(model=name, mode=mode, skipped="out of time (--budget-s)")
                continue
            start = time.perf_counter()
            try:
                llm = LLM(path, device=self.device, dtype="bfloat16", kv_cache_memory_gb=4 if self.on_gpu else 0.25,
                          **knobs)
            except ValueError as e:  # a mode this device cannot run (CUDA graphs on a CPU)
                self.emit(model=name, mode=mode, skipped=str(e))
                continue
            row: dict[str, Any] = {"model": name, "mode": mode, "startup_s": round(time.perf_counter() - start, 1),
                                   "weights": llm.engine.quantization, "kv": llm.engine.config.kv_cache_dtype}
            llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4))  # warm the paths
            for batch, key in zip(batches, ("c1", "cN")):
                row[f"{key}_out_tok_s"] = round(batch * out_len / self.timed(llm, prompts[:batch], params), 1)
            prefill = self.timed(llm, prompts[:1], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
            decode_tok_s = (out_len - 1) / max(self.timed(llm, prompts[:1], params) - prefill, 1e-9)
            step_bytes = weight_bytes(llm.engine.model, dense_copies=False)
            row.update(b1_decode_tok_s=round(decode_tok_s, 1), weight_mib=round(step_bytes / 2**20, 1),
                       b1_weight_gb_s=round(decode_tok_s * step_bytes / 1e9, 1))
            if name_bw:
                row["b1_bandwidth_fraction"] = round(decode_tok_s * step_bytes / (name_bw * 1e12), 3)
            self.emit(**row)
            del llm
            if self.on_gpu:
                torch.cuda.empty_cache()

    def timed(self, llm: LLM, prompts: list[list[int]], params: SamplingParams) -> float:
        self.sync()
        start = time.perf_counter()
        llm.generate(prompts, params)
        self.sync()
        return time.perf_counter() - start

    def finish(self, seconds: float) -> None:
        """One JSON document and a markdown summary of every row."""
        doc = {"device": self.device, "dry_run": self.dry_run, "seconds": round(seconds, 1), "rows": self.rows}
        (self.out_dir / "gpu-check.json").write_text(json.dumps(doc, indent=1))
        checks = [r for r in self.rows if "check" in r]
        failed = [r["check"] for r in checks if r.get("ok") is False]
        lines = [f"# GPU check on {self.device} ({'dry run, ' if self.dry_run else ''}{seconds:.0f} s)", "",
                 f"checks: {sum(r.get('ok') is True for r in checks)} ok, {len(failed)} failed"
                 + (f" ({'; '.join(failed)})" if failed else ""), ""]
        lines += [f"- {r['check']}: " + ", ".join(f"{k}={v}" for k, v in r.items() if k != "check") for r in checks]
        speed = [r for r in self.rows if "mode" in r]
        if speed:
            keys = ["model", "mode", "weights", "kv", "c1_out_tok_s", "cN_out_tok_s", "b1_decode_tok_s",
                    "b1_weight_gb_s", "b1_bandwidth_fraction", "startup_s", "skipped"]
            lines += ["", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in speed]
        (self.out_dir / "summary.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", default=None, help="an HF tokenizer directory (default: a word-level one built here)")
    p.add_argument("--out-dir", default="gpu-check", help="gpu-check.jsonl (as it goes), gpu-check.json, summary.md")
    p.add_argument("--device", default="cuda", help="cuda[:N], or cpu (with --dry-run: every part at tiny sizes)")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes and 8-token outputs; no compiled-step build")
    p.add_argument("--skip-tests", action="store_true", help="do not run the device test files")
    p.add_argument("--budget-s", type=float, default=420, help="no new speed mode starts after this many seconds")


def run(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    tokenizer = Path(args.tokenizer) if args.tokenizer else Path(tempfile.mkdtemp())
    if not args.tokenizer:
        word_tokenizer(tokenizer, TINY["vocab_size"] if args.dry_run else VOCAB)
    check = Check(tokenizer, Path(args.out_dir), args.device, args.dry_run, args.budget_s)
    try:
        check.environment()
        if not args.skip_tests:
            check.device_tests(Path(__file__).resolve().parents[2])
        check.correctness()
        shapes = {"tiny": ("llama", TINY)} if args.dry_run else SHAPES
        for name, (arch, cfg) in shapes.items():
            check.speed(name, arch, cfg, {m: k for m, k in MODES.items() if m != "compiled"})
        if not args.dry_run:  # last: its build is the slowest part, and the budget may not reach it
            name, (arch, cfg) = next(iter(shapes.items()))
            check.speed(name, arch, cfg, {"compiled": MODES["compiled"]})
    finally:  # what was done is summarized even when a part raised
        check.finish(time.perf_counter() - start)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_args(parser)
    run(parser.parse_args())
