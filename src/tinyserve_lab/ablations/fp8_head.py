"""Where FP8 weights' quality cost sits on the bundled model: every linear in E4M3 vs the LM head kept in
bf16 (what vLLM's fp8 method does: its head stays unquantized). Perplexity and KLD against fp32 on the
quality tool's Hamlet windows, the logits of one fresh prefill each (`tinyserve bench quality`'s).

    PYTHONPATH=src python -m tinyserve_lab.ablations.fp8_head [--windows 4 --tokens 512]
"""

from __future__ import annotations

import argparse
import json

import torch

from tinyserve import LLM
from tinyserve_lab.quality import kl_divergence, perplexity, shakespeare_windows, token_nll, window_logits


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--tokens", type=int, default=512)
    args = p.parse_args()
    kw = dict(enforce_eager=True, num_kv_blocks=-(-args.tokens // 16) + 1, max_model_len=args.tokens)
    ref = LLM(dtype="float32", quantization="none", **kw)
    windows, _ = shakespeare_windows(ref.tokenizer, args.windows, args.tokens)

    def score(llm: LLM) -> tuple[list[torch.Tensor], float]:
        logits = [window_logits(llm.engine, w)[:-1] for w in windows]
        return logits, perplexity(torch.cat([token_nll(lg, torch.tensor(w[1:])) for lg, w in zip(logits, windows)]))

    ref_logits, ref_ppl = score(ref)
    del ref
    dense, fp8 = (LLM(dtype="bfloat16", quantization=q, **kw) for q in ("none", "fp8"))
    rows = {"fp32": {"ppl": ref_ppl}}
    for name in ("fp8, every linear", "fp8, LM head bf16"):
        if name == "fp8, LM head bf16":
            fp8.engine.model.lm_head.impl = dense.engine.model.lm_head.impl
        logits, ppl = score(fp8)
        kld = torch.cat([kl_divergence(r, lg) for r, lg in zip(ref_logits, logits)]).mean().item()
        rows[name] = {"ppl": ppl, "ppl_vs_fp32": ppl / ref_ppl - 1, "kld_mean": kld}
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
