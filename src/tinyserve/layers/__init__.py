"""Linears and their weights; the quantization methods, registered by the name `--quantization` takes.

Each method is a factory here that imports its implementation when called (layers/methods.py), so the
flag's choices cost no torch import. `auto` is resolved by `resolve_quantization`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tinyserve.registry import Registry

if TYPE_CHECKING:
    import torch

    from tinyserve.layers.linear import QuantMethod

QUANTIZATION: Registry = Registry("quantization")
GPU_QUANTIZATION = ("none", "fp8")  # the methods that run off a CPU (the others are CPU kernels)


@QUANTIZATION.register("none")
def _none(group: int) -> QuantMethod:
    """every weight dense in the model dtype (a stored quantized weight is dequantized)"""
    from tinyserve.layers.linear import Unquantized

    return Unquantized()


@QUANTIZATION.register("int8")
def _int8(group: int) -> QuantMethod:
    """int8 per output channel from any checkpoint (round to nearest), on the int8 kernel"""
    from tinyserve.layers.methods import Int8Method

    return Int8Method()


@QUANTIZATION.register("fp8")
def _fp8(group: int) -> QuantMethod:
    """FP8 E4M3 per output channel from any checkpoint (the LM head dense); FP8 tensor-core GEMMs
    (torch._scaled_mm) on Hopper GPUs, dequantized on read elsewhere"""
    from tinyserve.layers.fp8 import Fp8Method

    return Fp8Method()


@QUANTIZATION.register("int4")
def _int4(group: int) -> QuantMethod:
    """int4 in groups of --quant-group-size from any checkpoint (round to nearest), on the int4 kernel"""
    from tinyserve.layers.methods import Int4Method

    return Int4Method(group)


@QUANTIZATION.register("gguf")
def _gguf(group: int) -> QuantMethod:
    """a GGUF's own blocks as the file stores them, on our kernel (every common block type)"""
    from tinyserve.layers.methods import GGUFMethod

    return GGUFMethod()


@QUANTIZATION.register("gguf-int4")
def _gguf_int4(group: int) -> QuantMethod:
    """a GGUF's blocks on PyTorch's int4 kernel where their type maps onto it exactly, dense otherwise"""
    from tinyserve.layers.methods import GGUFMethod

    return GGUFMethod(kernel="int4")


@QUANTIZATION.register("gguf-native")
def _gguf_native(group: int) -> QuantMethod:
    """a GGUF's blocks, every type on our kernel at every batch size, no dense copy (each row computed
    alone: --batch-invariant's mode)"""
    from tinyserve.layers.methods import GGUFMethod

    return GGUFMethod(kernel="native", keep_dense=False)


@QUANTIZATION.register("checkpoint")
def _checkpoint(group: int) -> QuantMethod:
    """a quantized directory's codes as stored (tinyserve quantize, AutoGPTQ, AutoAWQ)"""
    from tinyserve.layers.methods import CheckpointMethod

    return CheckpointMethod()


def resolve_quantization(mode: str, stored: str | None, dtype: torch.dtype, device: str = "cpu") -> str:
    """The method a model is served with. `stored`: the quantized form the model's files hold ("gguf",
    "checkpoint" or None). `auto`: a quantized directory keeps its weights as stored on a CPU, whatever
    the dtype (in fp32 the start-up measurement picks their exact dense copies where the packed kernel is
    slower); a GGUF keeps its blocks with 16-bit activations on a CPU, and fp32 dequantizes it (the exact
    reference path); anything else, and any other device, is dense. The packed kernels are CPU ones;
    `fp8` (layers/fp8.py) runs on any device, so it alone passes on a GPU."""
    import torch

    if mode == "auto":
        if device != "cpu" or stored is None:
            return "none"
        return stored if stored == "checkpoint" or dtype in (torch.bfloat16, torch.float16) else "none"
    QUANTIZATION.check(mode)
    if mode not in GPU_QUANTIZATION and device != "cpu":
        raise ValueError(f"quantization={mode!r} runs on PyTorch's CPU kernels; on {device} use one of "
                         f"{', '.join(GPU_QUANTIZATION)}")
    if (mode.startswith("gguf") and stored != "gguf") or (mode == "checkpoint" and stored != mode):
        needs = "a directory of quantized weights" if mode == "checkpoint" else "a GGUF model"
        raise ValueError(f"quantization={mode!r} needs {needs}; this model is not one")
    if mode in ("int8", "int4", "fp8") and stored == "checkpoint":
        raise ValueError("the model is already quantized; serve it with quantization='checkpoint' "
                         "(or 'none' to dequantize it)")
    return mode


def batch_invariant_quantization(mode: str, stored: str | None, device: str) -> str:
    """The method of the batch-invariant mode: every linear on our GGUF kernel, which computes each row
    alone (the dense and int4/int8 kernels round a row differently by the batch it is in)."""
    if stored == "gguf" and device == "cpu" and mode in ("auto", "gguf", "gguf-native"):
        return "gguf-native"
    raise ValueError("batch_invariant serves GGUF models on a CPU (quantization auto, gguf or gguf-native): "
                     "only our GGUF kernel computes a row independently of the others in its step")


def prefetch(quantization: str, device: str) -> None:
    """Start building what the resolved `quantization` will need, so it overlaps loading the model:
    our GGUF kernel (seconds on a cold machine, once), on a thread; not where `gguf` keeps PyTorch's
    int4 kernel throughout (a CPU without AVX-512 VNNI)."""
    if device != "cpu" or quantization not in ("gguf", "gguf-native"):
        return
    from tinyserve.layers import gguf_native
    from tinyserve.native import build_in_background

    if quantization == "gguf-native" or gguf_native.vectorized():
        build_in_background(gguf_native.SOURCE)
