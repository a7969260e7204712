"""Where FP8 weights' quality cost sits on the bundled model: `--quantization fp8` as served (the LM head
kept in bf16, as vLLM keeps it) vs every linear in E4M3, the head too. Perplexity and KLD against fp32 on the
quality tool's Hamlet windows, the logits of one fresh prefill each (`tinyserve bench quality`'s).

    PYTHONPATH=src python -m tinyserve_lab.ablations.fp8_head [--windows 4 --tokens 512]
"""

from __future__ import annotations

import argparse
import json

import torch

from tinyserve import LLM
from tinyserve.layers.fp8 import Fp8Method
from tinyserve.layers.linear import DenseWeight
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
    fp8 = LLM(dtype="bfloat16", quantization="fp8", **kw)
    head = fp8.engine.model.lm_head
    rows = {"fp32": {"ppl": ref_ppl}}
    for name in ("fp8, LM head bf16 (as served)", "fp8, every linear"):
        if name == "fp8, every linear":
            assert isinstance(head.impl, DenseWeight)
            head.impl = Fp8Method().pack([head.impl.weight.float()], torch.bfloat16, torch.device("cpu"))
        logits, ppl = score(fp8)
        kld = torch.cat([kl_divergence(r, lg) for r, lg in zip(ref_logits, logits)]).mean().item()
        rows[name] = {"ppl": ppl, "ppl_vs_fp32": ppl / ref_ppl - 1, "kld_mean": kld}
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
