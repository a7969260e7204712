"""Prefix-cache counters read off a server's Prometheus `/metrics`, around a benchmark point, so a
result says how much of its prompts the server found cached (tinyserve's and vLLM's names)."""

from __future__ import annotations

import httpx

_COUNTERS = {
    "queries": ("tinyserve_prefix_cache_queries_total", "vllm:prefix_cache_queries_total"),
    "hits": ("tinyserve_prefix_cache_hits_total", "vllm:prefix_cache_hits_total"),
}


def prefix_cache_counters(base_url: str, timeout_s: float = 10.0) -> dict[str, float] | None:
    """{'queries': tokens looked up, 'hits': tokens found}, summed over label sets; None when the
    server exposes neither (no /metrics, or no prefix cache)."""
    root = base_url.rstrip("/").removesuffix("/v1")
    try:
        text = httpx.get(root + "/metrics", timeout=timeout_s).text
    except httpx.HTTPError:
        return None
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        key, value = line.rsplit(" ", 1)
        name = key.split("{", 1)[0]
        for field, names in _COUNTERS.items():
            if name in names:
                found[field] = found.get(field, 0.0) + float(value)
    return found if len(found) == len(_COUNTERS) else None


def prefix_cache_delta(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, float] | None:
    """What one benchmark point added: queries, hits and the hit rate (hits / queries)."""
    if before is None or after is None:
        return None
    q, h = after["queries"] - before["queries"], after["hits"] - before["hits"]
    return {"queries": q, "hits": h, "hit_rate": h / q if q else 0.0}
