"""Does a calibrated method fit the calibration text or the model? One layer of the bundled model
(fp32), inputs from the ShareGPT calibration sample and from Hamlet windows: each linear's output
MSE after RTN and after GPTQ at several dampenings, with and without act-order.

    .venv/bin/python -m tinyserve_lab.ablations.quant_layer_error --layer 10 --bits 3 --group 32
"""

from __future__ import annotations

import argparse

import torch

from tinyserve.models.llama import RotaryEmbedding
from tinyserve.models.loader import dense_weights, model_config, resolve_model
from tinyserve.tokenizer import load_tokenizer
from tinyserve_lab.quality import shakespeare_windows
from tinyserve_lab.quantize import gptq, rtn
from tinyserve_lab.quantize.calib import calibration_tokens
from tinyserve_lab.quantize.pipeline import layer_forward
from tinyserve_lab.quantize.rtn import Spec

LINEARS = {0: "self_attn.q_proj", 2: "mlp.gate_proj", 3: "mlp.down_proj"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layer", type=int, default=10)
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group", type=int, default=32)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    src = resolve_model(None)
    cfg = model_config(src)
    w = {k: t.float() for k, t in dense_weights(src)}
    tok = load_tokenizer(src)
    cos, sin = RotaryEmbedding(cfg, a.seq_len)(torch.arange(a.seq_len), torch.float32)

    def inputs(tokens: torch.Tensor) -> dict[int, torch.Tensor]:
        """The fp32 inputs of every linear group of layer `a.layer`."""
        x, seen = w["model.embed_tokens.weight"][tokens], {}
        for i in range(a.layer + 1):
            def visit(g: int, t: torch.Tensor, i: int = i) -> torch.Tensor:
                if i == a.layer:
                    seen[g] = t.reshape(-1, t.shape[-1])
                return t
            x = layer_forward(x, w, f"model.layers.{i}.", cfg, cos, sin, visit)
        return seen

    calib = inputs(calibration_tokens(tok.hf, a.calib_samples, a.seq_len, 0))
    held_out = inputs(torch.tensor(shakespeare_windows(tok, 8, a.seq_len)[0]))
    spec = Spec("int", a.bits, a.group)
    print(f"layer {a.layer}, {a.bits}-bit g{a.group}: output MSE on calibration (ShareGPT) / held-out (Hamlet)")
    for g, name in LINEARS.items():
        weight = w[f"model.layers.{a.layer}.{name}.weight"]
        h = gptq.hessian(calib[g])

        def err(x: torch.Tensor, q: torch.Tensor) -> float:
            return float(((x @ (q - weight).t()) ** 2).mean())  # noqa: B023

        q = rtn.rtn(weight, spec).dequantize()
        print(f"{name:18s} rtn                   {err(calib[g], q):.3e} / {err(held_out[g], q):.3e}")
        for damp in (0.01, 0.1, 0.3, 1.0):
            for act in (False, True):
                q = gptq.gptq(weight, h, spec, act_order=act, damp=damp).dequantize()
                print(f"{name:18s} gptq damp {damp:<4g} act {act!s:5s} "
                      f"{err(calib[g], q):.3e} / {err(held_out[g], q):.3e}")


if __name__ == "__main__":
    main()
