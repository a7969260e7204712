"""Attention back ends over the paged KV pool, registered by the name `--attention-backend` takes.

Each back end is a module with an `AttentionBackend` subclass (base.py has the shared part) and a
factory here that imports it when called, so the flag's choices cost no torch import. `auto` is
resolved by `select_backend`.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import TYPE_CHECKING

from tinyserve.registry import Registry

if TYPE_CHECKING:
    import torch

    from tinyserve.attention.base import AttentionBackend

log = logging.getLogger(__name__)
ATTENTION_BACKENDS: Registry = Registry("attention_backend")


@ATTENTION_BACKENDS.register("sdpa")
def _sdpa(device: str) -> AttentionBackend:
    """gathers each context into a copy, then SDPA; any device"""
    from tinyserve.attention.sdpa import SdpaBackend

    return SdpaBackend()


@ATTENTION_BACKENDS.register("paged")
def _paged(device: str) -> AttentionBackend:
    """reads the pool in place through a native CPU kernel, built on first use"""
    if device != "cpu":
        raise ValueError(f"the paged attention back end is CPU-only (device {device!r}); use sdpa")
    from tinyserve.attention.paged import PagedBackend

    try:
        return PagedBackend()
    except RuntimeError as e:  # no compiler: the caller picks another back end
        raise ValueError(str(e)) from None


@ATTENTION_BACKENDS.register("triton")
def _triton(device: str) -> AttentionBackend:
    """reads the pool in place through Triton kernels (decodes and chunks over cached context); CUDA"""
    if not device.startswith("cuda"):
        raise ValueError(f"the triton attention back end runs on CUDA (device {device!r}); use paged or sdpa")
    if importlib.util.find_spec("triton") is None:  # looked up, not imported: no start-up cost when absent
        raise ValueError("the triton attention back end needs the triton package (CUDA builds of torch ship "
                         "it); use sdpa")
    try:
        from tinyserve.attention.triton_backend import TritonBackend
    except ImportError as e:  # torch before 2.6 has no torch.library.triton_op
        raise ValueError(f"the triton attention back end cannot load ({e}); use sdpa") from None
    return TritonBackend()


def prefetch(name: str, device: str, dtype: torch.dtype) -> None:
    """Start what `select_backend(name, device)` will need, so it overlaps loading the model: the paged
    back end's native kernels, built on threads (seconds on a cold machine, once)."""
    if name in ("auto", "paged") and device == "cpu":
        from tinyserve.attention import prefill
        from tinyserve.attention.paged import SOURCE
        from tinyserve.native import build_in_background

        build_in_background(SOURCE)
        prefill.prefetch(device, dtype)


def select_backend(name: str, device: str, kv_cache_dtype: str = "auto") -> AttentionBackend:
    """The back end called `name`; `auto` is `paged` on a CPU where its kernel builds (but for an fp8 pool),
    `triton` on CUDA where triton is installed, `sdpa` elsewhere. A ValueError when the named one cannot
    run here."""
    # The paged kernel is a CPU one for bf16/fp32/int8 pools; fp8 KV is a GPU format (the triton back end
    # reads it; sdpa's gather dequantizes it anywhere), so the CPU kernel was not taught it.
    fp8 = kv_cache_dtype == "fp8_e4m3"
    if name == "paged" and fp8:
        raise ValueError("the paged attention back end does not read an fp8_e4m3 KV pool; use sdpa (or auto)")
    if name != "auto":
        return ATTENTION_BACKENDS[name](device)
    if not (device == "cpu" and fp8):
        try:
            return ATTENTION_BACKENDS["paged" if device == "cpu" else "triton"](device)
        except ValueError as e:
            log.warning("%s; falling back to the sdpa attention back end", e)
    return ATTENTION_BACKENDS["sdpa"](device)
