"""The `paged` back end: decodes read the KV pool in place, through a small native CPU kernel.

csrc/paged_decode.cpp scores each K row against the query heads that share it and sums V rows in
the same pass order, straight out of the pool's blocks: no gathered copy of the context. It is
compiled on first use for this machine (-march=native) into the tinyserve cache, keyed by the
source, the CPU and the torch version, so a later start loads it in milliseconds.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import time
from pathlib import Path

import torch

from tinyserve.config import cpu_flags, cpu_model

from .base import AttentionBackend, DecodeMeta

log = logging.getLogger(__name__)
SOURCE = Path(__file__).parent / "csrc" / "paged_decode.cpp"
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffast-math"]


def build_dir() -> Path:
    from tinyserve.models.loader import cache_dir  # the loader imports the model, which imports us

    key = "|".join([SOURCE.read_text(), " ".join(CFLAGS), cpu_model(), " ".join(sorted(cpu_flags())),
                    torch.__version__])
    return cache_dir() / "ext" / f"paged_decode-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


@functools.cache
def load_native() -> None:
    """Build (once per machine) and load the kernel; raises RuntimeError when it cannot be built."""
    from torch.utils import cpp_extension

    try:
        import ninja  # the pip wheel's binary: the venv's bin/ is not always on PATH

        os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
    except ImportError:
        pass
    out = build_dir()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        cpp_extension.load(name="tinyserve_paged_decode", sources=[str(SOURCE)], extra_cflags=CFLAGS,
                           extra_ldflags=["-fopenmp"], build_directory=str(out), is_python_module=False)
    except Exception as e:  # no compiler, no headers, a build error: say so, in one line
        raise RuntimeError(f"cannot build the paged attention kernel ({type(e).__name__}: {e}); "
                           "use --attention-backend sdpa") from e
    log.info("paged attention kernel ready in %.1fs (%s)", time.perf_counter() - start, out)

    @torch.library.register_fake("tinyserve::paged_decode")
    def _(q, k_cache, v_cache, block_tables, context_lens, scale):  # shapes for torch.compile
        return torch.empty_like(q)


class PagedBackend(AttentionBackend):
    name = "paged"
    index_dtype = torch.int32

    def __init__(self) -> None:
        load_native()

    def decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: DecodeMeta,
               scale: float) -> torch.Tensor:
        # A copy, not q.contiguous(): q is a view of the fused QK projection, contiguous only when it
        # has one row, and asking would make torch.compile guard on (specialize) batch 1.
        q = q.clone(memory_format=torch.contiguous_format)
        return torch.ops.tinyserve.paged_decode(q, k_cache, v_cache, meta.block_tables, meta.context_lens, scale)
