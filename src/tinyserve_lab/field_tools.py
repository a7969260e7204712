"""The field's own quantizers as rows of `bench quant`'s table: torchao (int8 / int4 weight-only) and
bitsandbytes (NF4, LLM.int8) applied to the same model in transformers, bf16 activations, scored
by the same instrument (tinyserve_lab/quality.py: the Hamlet windows, KLD and top-1 against tinyserve's fp32
logits, greedy agreement on the same chat-prompt token ids) and timed like the engine (128-token
prompts, 32 tokens out, batch 1 and 32). `hf-16b` is transformers in bf16 with no quantization: the
control row, whose numbers should match tinyserve's bf16 row if this path measures the same thing.

The tools run in transformers' eager forward, not in tinyserve's engine: their speed is theirs
(HF generate, its dynamic cache) and says what using the tool as documented costs, not what its
kernel would do inside tinyserve. torchao's int4 CPU path (`Int4OpaqueTensor`) calls the same
`_weight_int4pack_mm_for_cpu` kernel as tinyserve's int4 rows.

What each row quantizes (as the tools do by default, or as our rows where a choice exists):
- torchao-8b: every linear, the tied LM head included, int8 per output row (Int8WeightOnlyConfig);
- torchao-4b-gG: the decoder's linears int4 in groups of G (PrototypeInt4WeightOnlyConfig: asymmetric,
  zero in the float domain: our "int" grid), the LM head int8 per row, as our 4-bit rows;
- bnb-4b-g64: NF4, blocks of 64 (bitsandbytes' default), double quantization off; bnb-8b: LLM.int8
  (outlier threshold 6.0); transformers leaves the LM head in bf16 for both.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

FIELD_METHODS = ("torchao", "bnb", "hf")
# bitsandbytes' LLM.int8 logs "inputs will be cast from bfloat16 to float16" on every forward of every
# layer; said once here instead.
logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)


def installed(method: str) -> str | None:
    """None if the tool imports here, else why not (the exact error)."""
    module = {"torchao": "torchao.quantization", "bnb": "bitsandbytes", "hf": "transformers"}[method]
    try:
        __import__(module)
    except Exception as e:  # any import failure (missing, or a wheel built for another torch) is the reason
        return f"{type(e).__name__}: {e}"
    return None


def load(method: str, bits: int, group: int, model_dir: str) -> tuple[nn.Module, float]:
    """The model in transformers, bf16, quantized by the tool; and the seconds quantizing took
    (loading included for bitsandbytes, which quantizes while it loads)."""
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    if method == "bnb":
        from transformers import BitsAndBytesConfig

        qc = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
              if bits == 4 else BitsAndBytesConfig(load_in_8bit=True))
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, quantization_config=qc,
                                                     device_map="cpu")
        return model.eval(), time.perf_counter() - start
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    start = time.perf_counter()
    if method == "torchao":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        if bits == 4:
            from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

            quantize_(model.model, PrototypeInt4WeightOnlyConfig(group_size=group))
        quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: isinstance(m, nn.Linear)
                  and (bits == 8 or fqn == "lm_head"))
    return model, time.perf_counter() - start


def tensor_bytes(t: torch.Tensor) -> int:
    """Storage bytes of a tensor, looking inside tensor subclasses (torchao's, bitsandbytes')."""
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor and type(t) is not nn.Parameter:
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    total = t.numel() * t.element_size()
    state = getattr(t, "quant_state", None)  # bitsandbytes' Params4bit keeps its absmax beside the codes
    if state is not None and getattr(state, "absmax", None) is not None:
        total += state.absmax.numel() * state.absmax.element_size()
    scb = getattr(t, "SCB", None)  # and Int8Params its row scales
    if isinstance(scb, torch.Tensor):
        total += scb.numel() * scb.element_size()
    return total


def weight_bytes(model: nn.Module) -> int:
    """Every parameter and buffer once (a tied head counts once while it stays tied)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += tensor_bytes(t)
    return total


@torch.inference_mode()
def window_logits(model: nn.Module, ids: Sequence[int]) -> torch.Tensor:
    return model(torch.tensor([list(ids)])).logits[0].float()


@torch.inference_mode()
def greedy(model: Any, prompt: Sequence[int], max_tokens: int, eos: Sequence[int]) -> list[int]:
    """Greedy tokens, one prompt at a time (no padding), up to and including the first EOS, as the engine returns."""
    out = model.generate(torch.tensor([list(prompt)]), do_sample=False, max_new_tokens=max_tokens,
                         eos_token_id=list(eos), pad_token_id=eos[0], temperature=None, top_p=None, top_k=None)
    toks = out[0, len(prompt):].tolist()
    for i, t in enumerate(toks):
        if t in eos:
            return toks[:i + 1]
    return toks


@torch.inference_mode()
def speed(model: Any, vocab: int, batches: Sequence[int], input_len: int,
          output_len: int) -> list[dict[str, float]]:
    """bench offline's measurement, through HF generate: random prompts, `output_len` tokens each
    (no early stop); prefill = one forward over the batch's prompts, decode = the rest of generate."""
    def run(batch: int, out_len: int, seed: int = 0) -> tuple[float, float]:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab, (batch, input_len), generator=g)
        t0 = time.perf_counter()
        model(ids)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.generate(ids, do_sample=False, max_new_tokens=out_len, min_new_tokens=out_len, pad_token_id=0,
                       temperature=None, top_p=None, top_k=None)
        return prefill, time.perf_counter() - t0

    run(2, 4)  # warm-up
    points = []
    for b in batches:
        prefill_s, total_s = run(b, output_len)
        points.append({"batch": b, "input_len": input_len, "output_len": output_len,
                       "prefill_tok_s": round(b * input_len / prefill_s, 1),
                       "decode_tok_s": round(b * (output_len - 1) / max(total_s - prefill_s, 1e-9), 1)})
    return points


def quality_row(name: str, method: str, bits: int, group: int, model_dir: str, ref: Any, windows: list[list[int]],
                prompts: list[list[int]], eos: Sequence[int], max_tokens: int) -> dict[str, Any]:
    """One tool's row for the quality stage, in bench quality's fields; `ref` is its fp32 Reference."""
    from tinyserve_lab.quality import (
        distribution_summary,
        greedy_agreement,
        kl_divergence,
        perplexity,
        token_nll,
        top1_agreement,
    )

    model, quantize_s = load(method, bits, group, model_dir)
    logits = [window_logits(model, w)[:-1] for w in windows]
    nll = torch.cat([token_nll(lg, torch.tensor(w[1:])) for lg, w in zip(logits, windows)])
    kld = distribution_summary(torch.cat([kl_divergence(r, lg) for r, lg in zip(ref.logits, logits)]))
    top1 = torch.cat([top1_agreement(r, lg) for r, lg in zip(ref.logits, logits)])
    identical, prefix = greedy_agreement(ref.greedy, [greedy(model, p, max_tokens, eos) for p in prompts])
    ppl = perplexity(nll)
    row = {"mode": name, "tool": method, "ppl": ppl, "ppl_delta_pct": 100 * (ppl / ref.ppl - 1),
           "kld_mean": kld["mean"], "kld_p99": kld["p99"], "kld_max": kld["max"],
           "top1_agreement": top1.double().mean().item(), "greedy_identical": identical, "greedy_prefix": prefix,
           "weight_bytes_packed": weight_bytes(model),
           "quantize_seconds": round(quantize_s, 1) if method != "hf" else None}
    del model, logits
    gc.collect()
    return row
