"""`tinyserve bench export-check`: does the field's engine read a `tinyserve quantize --format gptq|awq`
directory as tinyserve does?

vLLM for CPU (its own venv, scripts/install_peers.sh) and tinyserve load the same directory, bf16
activations, and run the same token ids: perplexity on the Hamlet windows of `bench quality`, and
greedy outputs for its chat prompts. A layout read wrong (a nibble order, v1's zero offset) would not
give a perplexity near tinyserve's; the kernels differ (vLLM's CPUWNA16 vs PyTorch's int4 one), so
greedy outputs may part after near-ties, as bf16 vs fp32 do. tinyserve in fp32 on the same directory
is the exact value of the stored weights.

    tinyserve bench export-check DIR [DIR ...]     # writes docs/results/quant/export-vllm-*.json

The vLLM half runs this file by its path with `--worker` in the vLLM venv, where only vllm imports:
so this module imports nothing but the standard library at its top, and the worker imports vllm alone.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

GREEDY_TOKENS = 48
MARK = "CHECK-EXPORT-RESULT "


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """In the vLLM venv: prompt log-probs of the windows, greedy outputs of the prompts."""
    vllm = importlib.import_module("vllm")  # untyped here: the lab's venv has no vllm
    LLM, SamplingParams = vllm.LLM, vllm.SamplingParams
    TokensPrompt = importlib.import_module("vllm.inputs").TokensPrompt

    llm = LLM(model=spec["model"], dtype="bfloat16", enforce_eager=True, max_model_len=1024, seed=0,
              max_num_seqs=16)
    scored = llm.generate([TokensPrompt(prompt_token_ids=w) for w in spec["windows"]],
                          SamplingParams(max_tokens=1, prompt_logprobs=0))
    nll = []
    for w, out in zip(spec["windows"], scored):
        for tok, lp in zip(w[1:], out.prompt_logprobs[1:]):
            nll.append(-lp[tok].logprob)
    greedy = llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]],
                          SamplingParams(temperature=0, max_tokens=GREEDY_TOKENS))
    return {"quantization": llm.llm_engine.model_config.quantization, "nll": nll,
            "greedy": [list(o.outputs[0].token_ids) for o in greedy]}


def tinyserve_side(model: str, dtype: str, windows: list[list[int]], prompts: list[list[int]]) -> dict[str, Any]:
    """What `worker` measures, from tinyserve at `dtype` with the kernels a decode step runs."""
    import torch

    from tinyserve import LLM, SamplingParams
    from tinyserve_lab.quality import decode_kernels, token_nll, window_logits

    llm = LLM(model, dtype=dtype, enforce_eager=True, num_kv_blocks=-(-16 * 128 // 16) + 16)
    with decode_kernels(llm.engine.model):
        nll = torch.cat([token_nll(window_logits(llm.engine, w)[:-1], torch.tensor(w[1:])) for w in windows])
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=GREEDY_TOKENS))
    return {"quantization": llm.engine.quantization, "nll": nll.tolist(),
            "greedy": [list(o.outputs[0].token_ids) for o in outs]}


def compare(model: str, windows: list[list[int]], prompts: list[list[int]], vllm_python: Path) -> dict[str, Any]:
    """One directory in vLLM (bf16) and in tinyserve (bf16 and fp32): perplexities and greedy agreement."""
    from tinyserve_lab.peers import usable_cpus
    from tinyserve_lab.quality import greedy_agreement

    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, usable_cpus()))}
    spec = json.dumps({"model": model, "windows": windows, "prompts": prompts})
    proc = subprocess.run([str(vllm_python), str(Path(__file__).resolve()), "--worker"], input=spec,
                          capture_output=True, text=True, env=env, timeout=1200)
    if proc.returncode != 0:  # a layout vLLM refuses: its own words are the result
        errors = [line for line in proc.stderr.splitlines()
                  if ("Error" in line or "error" in line) and "errors.pydantic.dev" not in line]
        return {"model": model, "vllm_error": (errors or proc.stderr.splitlines() or ["?"])[-1].strip()}
    vllm = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith(MARK))[len(MARK):])
    ours = {dtype: tinyserve_side(model, dtype, windows, prompts) for dtype in ("bfloat16", "float32")}
    ppl = {"vllm_bf16": math.exp(sum(vllm["nll"]) / len(vllm["nll"]))}
    ppl.update({f"tinyserve_{'bf16' if d == 'bfloat16' else 'fp32'}": math.exp(sum(r["nll"]) / len(r["nll"]))
                for d, r in ours.items()})
    same, prefix = greedy_agreement(ours["bfloat16"]["greedy"], vllm["greedy"])
    same32, prefix32 = greedy_agreement(ours["float32"]["greedy"], ours["bfloat16"]["greedy"])
    return {"model": model, "vllm_quantization": vllm["quantization"],
            "tinyserve_quantization": ours["bfloat16"]["quantization"], "ppl": ppl,
            "greedy_vllm_vs_tinyserve_bf16": {"identical": same, "prefix": prefix},
            "greedy_tinyserve_bf16_vs_fp32": {"identical": same32, "prefix": prefix32}}


def add_export_check_args(p: argparse.ArgumentParser) -> None:
    from tinyserve_lab.peers import DEFAULT_PEERS_DIR

    p.add_argument("models", nargs="+", help="--format gptq/awq directories")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--result-dir", default="docs/results/quant")
    p.add_argument("--peers-dir", default=str(DEFAULT_PEERS_DIR),
                   help="where install_peers.sh put the peers (vLLM: PEERS_DIR/vllm-venv)")


def run_export_check(args: argparse.Namespace) -> int:
    from tinyserve.models.loader import resolve_model
    from tinyserve.tokenizer import load_tokenizer
    from tinyserve_lab.env_info import run_header, save_json
    from tinyserve_lab.quality import CHAT_PROMPTS, shakespeare_windows

    vllm_python = Path(args.peers_dir) / "vllm-venv" / "bin" / "python"
    if not vllm_python.exists():
        raise ValueError(f"no vLLM at {vllm_python}: scripts/install_peers.sh --only vllm (or --peers-dir)")
    tok = load_tokenizer(resolve_model(args.models[0]))
    windows, text = shakespeare_windows(tok.hf, args.windows, args.tokens)
    prompts = [tok.apply_chat_template([{"role": "user", "content": c}], True) for c in CHAT_PROMPTS]
    rows = [compare(m, windows, prompts, vllm_python) for m in args.models]
    doc = run_header("tinyserve.check.export-vllm/1", text=text, prompts=len(prompts), max_tokens=GREEDY_TOKENS,
                     rows=rows)
    print(json.dumps(rows, indent=1))
    print(f"wrote {save_json(doc, Path(args.result_dir), 'export-vllm')}")
    return 0


def _worker_main() -> None:
    """`python .../export_check.py --worker` in the vLLM venv: the spec on stdin, one marked line out.
    Run by its path, Python puts this file's folder first on sys.path, where the lab's `profile.py` and
    `datasets.py` would shadow the standard library's and Hugging Face's: drop it before vllm imports."""
    if Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
        del sys.path[0]
    print(MARK + json.dumps(worker(json.loads(sys.stdin.read()))))  # vLLM prints to stdout too


if __name__ == "__main__":
    if sys.argv[1:] != ["--worker"]:
        sys.exit("run as `tinyserve bench export-check DIR...`; this file's own entry is the vLLM worker")
    _worker_main()
