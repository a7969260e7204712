"""The identity of a full KV block for prefix caching: its tokens chained with its parent's identity.

Block i of a sequence holds the K/V of tokens [i*bs, (i+1)*bs), and those depend on every token
before them, so block i's identity is SHA-256(identity of block i-1 || block i's token ids). Two
blocks share an identity only if their whole prefixes are equal: a cryptographic hash makes an alias
between different prefixes as likely as a SHA-256 collision (vLLM's `sha256` prefix-caching hash;
Python's `hash()` would not do: equal hashes of different prefixes are easy to construct).
Within one engine the model, dtype and block size are fixed, so the tokens are all that vary.
"""

from __future__ import annotations

import hashlib
from array import array

BlockHash = bytes

_ROOT = b"tinyserve-prefix-v1"  # the parent of block 0


def extend_block_hashes(hashes: list[BlockHash], token_ids: list[int], block_size: int, num_tokens: int) -> None:
    """Append to `hashes` the identities of the full blocks among the first `num_tokens` tokens
    (the ones already in `hashes` are kept: a sequence's tokens never change once appended)."""
    for i in range(len(hashes), num_tokens // block_size):
        parent = hashes[i - 1] if i else _ROOT
        block = array("q", token_ids[i * block_size:(i + 1) * block_size]).tobytes()
        hashes.append(hashlib.sha256(parent + block).digest())
