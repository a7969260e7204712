"""AWQ (Lin et al. 2023): protect the weights that meet large activations by scaling them up before
rounding and the activations down by the same factor — folded into the op before (an RMSNorm's
weight, or the rows of the previous linear), so the fp model is unchanged and only rounding moves.

Per group of linears sharing one input, the scale of input channel j is s_j = mean|x_j|^a /
mean|w_j|^(1-a) (normalized), with `a` chosen on a grid by the error of the group's outputs on
calibration inputs; s = 1 (plain RTN) is always a candidate, so the search never loses to RTN on its
own objective. Then, per linear, a clipping search shrinks each group's range where that lowers the
error of the group's partial products (AutoAWQ's auto_clip; q/k are left unclipped, as there).
The objective here is each linear group's output, not the whole attention / MLP block's output
as in the reference code: ~3x cheaper, and what the engine's per-linear kernels see. o_proj is
clipped but not scaled (its scales could fold only into v_proj, and only without GQA).
"""

from __future__ import annotations

import torch

from tinyserve_lab.quantize.rtn import Spec, fake_quantize


def search_scales(x: torch.Tensor, w: torch.Tensor, spec: Spec, grid: int = 20) -> torch.Tensor:
    """Per-input-channel scales [K] for the group's stacked weights w [N, K], inputs x [n, K]."""
    x, w = x.float(), w.float()
    x_mean = x.abs().mean(0)
    wg = w.abs().view(w.shape[0], -1, spec.group)
    w_mean = (wg / wg.amax(-1, keepdim=True).clamp(min=1e-8)).view(w.shape).mean(0)
    ref = x @ w.t()
    best, best_err = torch.ones_like(x_mean), ((x @ fake_quantize(w, spec).t() - ref) ** 2).mean().item()
    for r in range(grid):
        a = r / grid
        s = (x_mean.pow(a) / w_mean.pow(1 - a).clamp(min=1e-4)).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = ((x @ (fake_quantize(w * s, spec) / s).t() - ref) ** 2).mean().item()
        if err < best_err:
            best, best_err = s, err
    return best


def search_clip(x: torch.Tensor, w: torch.Tensor, spec: Spec, grid: int = 20, max_shrink: float = 0.5,
                rows_per_chunk: int = 256) -> torch.Tensor:
    """Per-group clip bounds [N, G] for w [N, K]: the absmax shrink (1, 0.95, ... down to 1 - max_shrink)
    whose quantized group gives the smallest error of the group's partial products over x [n, K]."""
    x, w = x.float(), w.float()
    n_rows, k = w.shape
    g = spec.group
    xg = x.view(x.shape[0], -1, g)  # [n, G, g]
    bounds = []
    for r0 in range(0, n_rows, rows_per_chunk):  # bounded memory: [n, rows, G] partial products
        wc = w[r0:r0 + rows_per_chunk]
        wcg = wc.view(wc.shape[0], -1, g)
        ref = torch.einsum("tgk,ogk->tog", xg, wcg)
        top = wcg.abs().amax(-1)  # [rows, G]
        best, best_err = top.clone(), torch.full_like(top, float("inf"))
        for i in range(int(max_shrink * grid)):
            bound = top * (1 - i / grid)
            clipped = torch.maximum(torch.minimum(wcg, bound[..., None]), -bound[..., None])
            dq = fake_quantize(clipped.reshape(wc.shape), spec).view_as(wcg)
            err = ((torch.einsum("tgk,ogk->tog", xg, dq) - ref) ** 2).mean(0)
            better = err < best_err
            best_err, best = torch.where(better, err, best_err), torch.where(better, bound, best)
        bounds.append(best)
    return torch.cat(bounds)


def clip(w: torch.Tensor, bounds: torch.Tensor, group: int) -> torch.Tensor:
    wg = w.float().view(w.shape[0], -1, group)
    return torch.maximum(torch.minimum(wg, bounds[..., None]), -bounds[..., None]).view(w.shape)
