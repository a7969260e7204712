"""What this process runs on, and where tinyserve keeps its files: CPU features and cores, the cache.

Read at run time, never assumed: the same wheel runs on CPUs with and without AVX512-BF16 or AMX.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path


def cache_dir() -> Path:
    """GGUF exports, native kernel builds, measured kernel choices: $TINYSERVE_CACHE or ~/.cache/tinyserve."""
    return Path(os.environ.get("TINYSERVE_CACHE", Path.home() / ".cache" / "tinyserve"))


def physical_cores() -> int:
    """Physical cores available to this process: torch threads beyond this oversubscribe and slow down."""
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
    except Exception:  # pragma: no cover - psutil is a dependency, but stay robust
        n = None
    avail = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(n or avail, avail))


def _cpuinfo(key: str) -> str | None:
    """The first `key: value` line of /proc/cpuinfo (Linux); None elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags; empty where unknown."""
    return frozenset((_cpuinfo("flags") or "").split())


def cpu_model() -> str:
    """The CPU's model name; the platform's processor string where /proc/cpuinfo has none."""
    import platform

    return _cpuinfo("model name") or platform.processor() or "unknown"


def cpu_has_fast_bf16() -> bool:
    """bf16 matmuls run natively (AVX512-BF16 dot products or AMX tiles) rather than emulated."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
