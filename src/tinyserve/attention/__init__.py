"""Attention back ends: `sdpa` (gather + SDPA, any device) and `paged` (in place, native CPU kernel).

`select_backend("auto", device)` picks `paged` on a CPU when its kernel builds, else `sdpa`.
"""

from __future__ import annotations

import logging

from .base import AttentionBackend, AttentionMetadata, BatchLayout, DecodeMeta, PrefillChunk, SeqSpan
from .paged import PagedBackend
from .sdpa import SdpaBackend

log = logging.getLogger(__name__)
BACKENDS: dict[str, type[AttentionBackend]] = {"sdpa": SdpaBackend, "paged": PagedBackend}

__all__ = ["BACKENDS", "AttentionBackend", "AttentionMetadata", "BatchLayout", "DecodeMeta", "PrefillChunk",
           "SeqSpan", "select_backend"]


def select_backend(name: str, device: str) -> AttentionBackend:
    """The back end called `name` ("auto" resolves per device); ValueError when it cannot run here."""
    cpu = device == "cpu"
    if name == "auto":
        if not cpu:
            return SdpaBackend()
        try:
            return PagedBackend()
        except RuntimeError as e:
            log.warning("%s; falling back to the sdpa attention back end", e)
            return SdpaBackend()
    if name not in BACKENDS:
        raise ValueError(f"attention_backend must be one of auto, {', '.join(BACKENDS)}; got {name!r}")
    if name == "paged" and not cpu:
        raise ValueError(f"the paged attention back end is CPU-only (device {device!r}); use sdpa")
    try:
        return BACKENDS[name]()
    except RuntimeError as e:
        raise ValueError(str(e)) from None
