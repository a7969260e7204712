"""`tinyserve bench cuda-check`: the engine on a GPU, for a session lent one.

Correctness on a tiny random Llama in fp32 (our greedy == transformers' greedy on the device; compiled ==
eager; a batch == its sequences alone; chunked prefill + prefix cache; draft-model speculation == plain;
vLLM-shaped logprobs), then offline decode speed on random weights of real shapes (SmolLM2-135M,
Qwen2.5-0.5B) in bf16, eager vs compiled. One JSON line per result, written as it goes, so a time-out
keeps what was done. Needs only torch and transformers beside the engine: the weights are random and the
tokenizer is any HF tokenizer directory (the bundled model's export has one). `--device cpu` runs the
correctness part here: a dry run of the check itself.

    python -m tinyserve_lab.cuda_check --tokenizer DIR --out cuda-check.jsonl [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import transformers

from tinyserve import LLM, SamplingParams

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


class Check:
    def __init__(self, tokenizer: Path, out: Path, device: str) -> None:
        self.tokenizer, self.out, self.device = tokenizer, out, device

    def emit(self, **row: Any) -> None:
        print(json.dumps(row), flush=True)
        with self.out.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def sync(self) -> None:
        if self.device != "cpu":
            torch.cuda.synchronize()

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

    def speed(self, name: str, arch: str, cfg: dict[str, Any]) -> None:
        path = self.checkpoint(arch, widen=False, **cfg)
        prompts = [list(range(1000 + i, 1128 + i)) for i in range(32)]
        params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
        for eager in (True, False):
            start = time.perf_counter()
            llm = LLM(path, device=self.device, dtype="bfloat16", enforce_eager=eager, kv_cache_memory_gb=4)
            row: dict[str, Any] = {"model": name, "mode": "eager" if eager else "compiled",
                                   "startup_s": round(time.perf_counter() - start, 1)}
            llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4))  # warm the paths
            for batch in (1, 32):
                self.sync()
                start = time.perf_counter()
                outs = llm.generate(prompts[:batch], params)
                self.sync()
                row[f"b{batch}_out_tok_s"] = round(sum(len(o.outputs[0].token_ids) for o in outs)
                                                   / (time.perf_counter() - start), 1)
            self.emit(**row)
            del llm
            if self.device != "cpu":
                torch.cuda.empty_cache()


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", required=True, help="an HF tokenizer directory (tokenizer.json, ...)")
    p.add_argument("--out", default="cuda-check.jsonl", help="JSON lines, one per result")
    p.add_argument("--device", default="cuda", help="cuda[:N], or cpu for a dry run of the correctness part")


def run(args: argparse.Namespace) -> None:
    check = Check(Path(args.tokenizer), Path(args.out), args.device)
    on_gpu = args.device != "cpu"
    check.emit(torch=torch.__version__, transformers=transformers.__version__,
               device=torch.cuda.get_device_name() if on_gpu else "cpu")
    check.correctness()
    for name, (arch, cfg) in SHAPES.items() if on_gpu else ():
        check.speed(name, arch, cfg)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_args(parser)
    run(parser.parse_args())
