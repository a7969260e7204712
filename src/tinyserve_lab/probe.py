"""Hand-built steps over a model runner: one sequence's next-token logits from a step of a chosen
shape (1 row or 1 + k, alone or beside copies of itself). What speculation's greedy identity rests
on is that these agree bit for bit; tests/test_compiled.py and `tinyserve bench spec rows` check it.
"""

from __future__ import annotations

import torch

from tinyserve.worker.runner import ModelRunner, SeqView


def next_token_logits(runner: ModelRunner, token_ids: list[int], drafts: list[int], batch: int = 1) -> torch.Tensor:
    """The logits after `token_ids`, from a step feeding its last token plus `drafts` as decode rows,
    for `batch` copies of the sequence at once (their own blocks, from block 1 on: block 0 is the
    warm-up's scratch). The prompt but its last token is prefilled first, in a step of its own."""
    per_seq = -(-(len(token_ids) + len(drafts)) // runner.block_size)  # blocks, rounded up
    views = [SeqView(list(token_ids), list(range(1 + per_seq * i, 1 + per_seq * (i + 1)))) for i in range(batch)]
    if len(token_ids) > 1:
        runner.execute(views, [len(token_ids) - 1] * batch)
    for v in views:
        v.num_computed, v.spec_token_ids = len(token_ids) - 1, list(drafts)
    return runner.execute(views, [1 + len(drafts)] * batch).logits[0]
