"""Prompt lookup (vLLM's `ngram` method): if the sequence's last n tokens occurred before, propose
the tokens that followed them. No model, no KV: a byte search over the token ids.

It pays where the output copies its input: summaries quoting a document, code edits, extraction.
Longer suffixes are tried first (a longer match predicts better); among occurrences of one suffix
the most recent wins (the nearest context is the likeliest to be continued).
"""

from __future__ import annotations

from array import array


def propose_ngram(tokens: list[int], k: int, n_max: int, n_min: int) -> list[int]:
    """Up to `k` tokens that followed the latest earlier occurrence of the longest matching suffix
    of `tokens` (n_max down to n_min tokens long); [] when no suffix occurred before."""
    size = len(tokens)
    if size < n_min + 1 or k < 1:
        return []
    data = array("i", tokens).tobytes()
    item = array("i").itemsize
    for n in range(min(n_max, size - 1), n_min - 1, -1):
        pattern = data[(size - n) * item:]
        end = (size - 1) * item  # a match must end before the suffix's last token: something follows it
        while (at := data.rfind(pattern, 0, end)) != -1:
            if at % item == 0:  # aligned: a match of whole tokens, not of bytes across two
                return _copy_from(tokens, at // item + n, k)
            end = at + len(pattern) - 1
    return []


def _copy_from(tokens: list[int], start: int, k: int) -> list[int]:
    """k tokens copied from `start` on, as if the copy continued: a match close to the end runs into
    the suffix itself, so a repeating pattern keeps repeating (5 5 5 5 -> 5 5 5, not just 5)."""
    out: list[int] = []
    for i in range(start, start + k):
        out.append(tokens[i] if i < len(tokens) else out[i - len(tokens)])
    return out
