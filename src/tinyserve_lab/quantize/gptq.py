"""GPTQ (Frantar et al. 2022): quantize one column at a time and push each column's rounding error
onto the columns not yet quantized, weighted by the inverse Hessian of the layer's reconstruction
loss ||X W^T - X Q^T||^2, H = 2 X^T X / n (X: the calibration inputs of the layer).

Rows are independent given H, so a fused projection (q/k/v share one input) is one call. Group
parameters are fitted on the error-compensated weights as each group starts (the reference code's
way); with act-order (columns in order of decreasing H diagonal, the most sensitive first) they are
fitted up front on the original weights instead ("static groups"), so groups stay contiguous along K
as the int4 kernel needs them, whatever order the columns are visited in.
"""

from __future__ import annotations

import torch

from tinyserve.layers.formats import QuantizedTensor
from tinyserve_lab.quantize.rtn import Spec, codes, decode, fit, pack


def hessian(x: torch.Tensor) -> torch.Tensor:
    """2 X^T X / n for inputs x [n, K], in fp32 (as the reference code; the dampening keeps it
    positive definite)."""
    x = x.reshape(-1, x.shape[-1]).float()
    return 2 / x.shape[0] * (x.t() @ x)


def gptq(w: torch.Tensor, h: torch.Tensor, spec: Spec, act_order: bool = False, damp: float = 0.01,
         block: int = 128) -> QuantizedTensor:
    """Codes for w [N, K] that minimize the calibration loss under `spec`'s grid."""
    if spec.format == "nf4":
        raise ValueError("gptq quantizes onto the int grids (3, 4, 8 bits); nf4 is its own method")
    w = w.float().clone()
    n, k = w.shape
    h = h.float().clone()
    dead = h.diagonal() == 0  # inputs that are always zero: any weight serves, pick 0
    h[dead, dead] = 1
    w[:, dead] = 0
    group = spec.group if spec.grouped else k
    block = max(block // group, 1) * group if group < k else k  # every group inside one block
    static = act_order or spec.format == "int8"
    scales, zeros = fit(w, spec) if static else (None, None)
    perm = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    h.diagonal().add_(damp * h.diagonal().mean())
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    g_scales = torch.zeros(n, k // group if spec.grouped else 1)
    g_zeros = torch.zeros_like(g_scales)
    if static:
        assert scales is not None
        g_scales = scales.view(n, -1)
        g_zeros = zeros.view(n, -1) if zeros is not None else g_zeros
    # Column-major from here (wt [K, N]): each column is a contiguous row, so the per-column
    # rank-1 update of the block's remaining columns is one contiguous BLAS call.
    wt, qt = w.t().contiguous(), torch.zeros(k, n)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, err = wt[i1:i2].clone(), torch.zeros(i2 - i1, n)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            g = col // group
            if not static and col % group == 0:  # a group starts: fit it on the compensated weights
                s, z = fit(w1[i:i + group].t().contiguous(), spec)
                g_scales[:, g], g_zeros[:, g] = s.view(-1), z.view(-1) if z is not None else 0
            s_col = g_scales[:, g]
            z_col = g_zeros[:, g] if spec.grouped else None
            qc = codes(w1[i], s_col, z_col, spec)
            qt[i1 + i] = qc
            e = (w1[i] - decode(qc, s_col, z_col, spec)) / hinv1[i, i]
            w1[i:].addr_(hinv1[i, i:], e, alpha=-1)
            err[i] = e
        wt[i2:] -= hinv[i1:i2, i2:].t() @ err
    q = qt.t().contiguous()
    out = torch.empty_like(q)
    out[:, perm] = q  # back to the original column order
    return pack(out, g_scales.view(-1) if spec.format == "int8" else g_scales,
                g_zeros if spec.grouped else None, spec)
