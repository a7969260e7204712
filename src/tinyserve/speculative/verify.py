"""Acceptance: the rule that makes speculation exact.

Greedy: a draft is accepted while it equals the target's argmax at its position; the first
mismatch is replaced by that argmax, and when all k agree the (k+1)-th row gives a bonus token.
The output is token for token the target's own greedy output.

Sampled (Leviathan et al. 2023; Chen et al. 2023): draft x_i drawn from q_i is accepted with
probability min(1, p_i(x_i) / q_i(x_i)); the first rejected position is resampled from
norm(max(0, p_i - q_i)); all accepted, the bonus is drawn from p_{k+1}. Each emitted token is then
distributed exactly as p (the target's distribution after temperature, top-k/top-p/min-p and
penalties, which the caller has applied to the rows). A proposer without a distribution (n-gram)
is a point mass: q_i = one-hot(x_i), so acceptance is p_i(x_i) and the residual is p_i without x_i.
"""

from __future__ import annotations

import torch


def accept_greedy(argmax: list[int], drafts: list[int]) -> list[int]:
    """The tokens emitted for `drafts` given the target's argmax at each of the k + 1 rows."""
    out = []
    for target, draft in zip(argmax, drafts):
        out.append(target)
        if target != draft:
            return out
    out.append(argmax[len(drafts)])
    return out


def accept_sampled(p: torch.Tensor, q: torch.Tensor | None, drafts: list[int],
                   generator: torch.Generator | None) -> list[int]:
    """Rejection sampling over one sequence's rows. p [k + 1, vocab]: the target's probabilities at the
    k draft positions and the one after; q [k, vocab] the draft's (None: point masses)."""
    k = len(drafts)
    idx = torch.tensor(drafts, device=p.device)
    p_draft = p[:k].gather(1, idx[:, None])[:, 0]
    q_draft = torch.ones_like(p_draft) if q is None else q[:k].gather(1, idx[:, None])[:, 0]
    u = torch.rand(k, generator=generator, device=p.device, dtype=p.dtype)
    # u < p/q without the division: q(x) > 0 for every drafted x, and u * q < p also accepts p >= q.
    rejected = (u * q_draft >= p_draft).tolist()
    j = rejected.index(True) if True in rejected else k
    if j == k:
        return drafts + [_draw(p[k], generator)]
    if q is None:
        residual = p[j].clone()
        residual[drafts[j]] = 0
    else:
        residual = (p[j] - q[j]).clamp_(min=0)
    # A rejection has probability sum(max(0, q - p)) = sum(max(0, p - q)) > 0, so the residual has mass;
    # guard against rounding to zero all the same.
    token = _draw(residual if residual.sum() > 0 else p[j], generator)
    return drafts[:j] + [token]


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs, 1, generator=generator).item())
