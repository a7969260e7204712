"""`tinyserve quantize --zero int --format gptq|awq`: the integer-zero grid, and exports that the field's
layouts decode to exactly our weights and that tinyserve serves back with the same tokens.

The reference decoders below are written from the layouts' published definitions (AutoGPTQ's torch
QuantLinear and AutoAWQ's `dequantize_gemm`), independently of quantize/hf_format.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tinyserve import LLM, SamplingParams
from tinyserve.layers.formats import QuantizedTensor
from tinyserve.layers.methods import CheckpointMethod
from tinyserve.layers.packed import Int4Weight, Int8Weight
from tinyserve.models.quantized import check_supported, unpack_int32
from tinyserve_lab.quantize import rtn
from tinyserve_lab.quantize.checkpoint import save_quantized
from tinyserve_lab.quantize.hf_format import pack_int32, save_hf_quantized
from tinyserve_lab.quantize.pipeline import QuantizeOptions, quantize_model, quantize_weights
from tinyserve_lab.quantize.rtn import Spec

from conftest import TINY

CPU = torch.device("cpu")


# -- the grid ------------------------------------------------------------------------------------------------
def test_int_zero_grid_is_within_half_a_step_with_fp16_exact_scales():
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(0)) * 0.05
    w[0, :32] = w[0, :32].abs()  # a group with no negative weight
    t = rtn.rtn(w, Spec("intz", 4, 32))
    assert t.zeros is not None and t.zeros.dtype == torch.uint8
    assert int(t.zeros.min()) >= 1 and int(t.zeros.max()) <= 15 and int(t.zeros[0, 0]) == 1
    s = t.scales.float()
    assert torch.equal(s.to(torch.float16).float(), s)  # what an fp16 `scales` tensor stores, exactly
    deq = t.dequantize()
    assert torch.equal(deq, (t.q.float() - t.zeros.float().repeat_interleave(32, 1)) * s.repeat_interleave(32, 1))
    err = (deq - w).abs().view(48, -1, 32)
    assert bool((err <= s[..., None] * (0.5 + 2**-7 * 16)).all())  # half a step + bf16's rounding of s
    assert bool((deq[w == 0] == 0).all()) and int((deq == 0).sum()) > 0  # 0 is on the grid


def test_symmetric_grid_has_the_middle_zero_and_half_a_step_bound():
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(1)) * 0.05
    t = rtn.rtn(w, Spec.make("gptq", 4, 32, zero="sym"))
    assert t.format == "intz" and t.zeros is not None and bool((t.zeros == 8).all())
    s = t.scales.float()
    assert torch.allclose(s, 2 * w.abs().view(48, -1, 32).amax(-1) / 15, rtol=2**-8)
    err = (t.dequantize() - w).abs().view(48, -1, 32)
    assert bool((err <= s[..., None] * (0.5 + 2**-7 * 16)).all())


def test_zero_option_errors():
    with pytest.raises(ValueError, match="no zero point"):
        QuantizeOptions("nf4", 4, zero="int")
    with pytest.raises(ValueError, match="--zero"):
        QuantizeOptions("rtn", 4, zero="half")
    with pytest.raises(ValueError, match="--zero int"):
        quantize_model(None, QuantizeOptions("rtn", 4, 64), Path("unused"), fmt="gptq")


def test_int32_nibble_words():
    v = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    p = pack_int32(v)
    assert p.dtype == torch.int32 and p.shape == (5, 8) and torch.equal(unpack_int32(p), v)
    assert int(pack_int32(torch.tensor([[15] * 8]))[0, 0]) == -1  # all 32 bits set, as a signed int32


# -- the reference decoders, from the layouts' definitions ----------------------------------------------------
def gptq_v1_dequantize(qweight, qzeros, scales, g_idx, bits=4):
    """AutoGPTQ's QuantLinear (torch): weight [K, N] = scales[g_idx] * (q - (qzeros + 1)[g_idx])."""
    wf = torch.arange(0, 32, bits, dtype=torch.int32)
    zeros = torch.bitwise_right_shift(qzeros.unsqueeze(2).expand(-1, -1, 32 // bits), wf.view(1, 1, -1))
    zeros = (torch.bitwise_and(zeros, 2**bits - 1) + 1).reshape(scales.shape)
    weight = torch.bitwise_right_shift(qweight.unsqueeze(1).expand(-1, 32 // bits, -1), wf.view(1, -1, 1))
    weight = torch.bitwise_and(weight, 2**bits - 1).reshape(-1, weight.shape[2])
    g = g_idx.long()
    return (scales.float()[g] * (weight - zeros[g]).float()).t()  # [N, K] as the HF weight


def awq_gemm_dequantize(qweight, qzeros, scales, group, bits=4):
    """AutoAWQ's dequantize_gemm: unpack nibbles in shift order, undo AWQ's interleave, (q - z) * s."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    iw = torch.bitwise_right_shift(qweight[:, :, None], shifts[None, None, :]).reshape(qweight.shape[0], -1)
    iz = torch.bitwise_right_shift(qzeros[:, :, None], shifts[None, None, :]).reshape(qzeros.shape[0], -1)
    order = torch.arange(iw.shape[-1]).view(-1, 32 // bits)[:, [0, 4, 1, 5, 2, 6, 3, 7]].reshape(-1)
    iw, iz = torch.bitwise_and(iw[:, order], 2**bits - 1), torch.bitwise_and(iz[:, order], 2**bits - 1)
    s, z = scales.float().repeat_interleave(group, 0), iz.repeat_interleave(group, 0)
    return ((iw - z).float() * s).t()


class _Tok:
    def save_pretrained(self, path: str) -> None:
        pass


@pytest.mark.parametrize("fmt,sym", [("gptq", False), ("gptq", True), ("awq", False)])
def test_export_decodes_to_our_weights_by_the_published_layout(tmp_path, fmt, sym):
    """Every quantized linear, decoded from the files by the reference decoder, equals our dequantized
    weight exactly; the int8 head is written dequantized, dense tensors as they were; config.json
    carries the quantization_config the field's loaders read (GPTQ's sym flag from the zero points)."""
    spec = Spec("intz", 4, 32, sym)
    g = torch.Generator().manual_seed(5)
    weights = {f"model.layers.0.{n}.weight": rtn.rtn(torch.randn(rows, 64, generator=g) * 0.05, spec)
               for n, rows in (("self_attn.q_proj", 64), ("self_attn.k_proj", 16), ("mlp.down_proj", 40))}
    weights["model.embed_tokens.weight"] = rtn.rtn(torch.randn(24, 64, generator=g), Spec("int8", 8, 0))
    weights["model.norm.weight"] = torch.rand(64, generator=g)
    save_hf_quantized(tmp_path, weights, {"model_type": "llama"}, _Tok(), {"method": "rtn", "damp": 0.1}, fmt)
    files = load_file(str(tmp_path / "model.safetensors"))
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"]) == (fmt, 4, 32)
    assert (qc["desc_act"], qc["sym"], qc["checkpoint_format"]) == (False, sym, "gptq") if fmt == "gptq" else \
        (qc["zero_point"], qc["version"]) == (True, "gemm")
    for name, t in weights.items():
        p = name.removesuffix(".weight")
        if isinstance(t, QuantizedTensor) and t.format == "intz":
            assert f"{name}" not in files and files[f"{p}.scales"].dtype == torch.float16
            n, k = t.shape
            if fmt == "gptq":
                assert files[f"{p}.qweight"].shape == (k // 8, n) and files[f"{p}.qzeros"].shape == (k // 32, n // 8)
                deq = gptq_v1_dequantize(files[f"{p}.qweight"], files[f"{p}.qzeros"], files[f"{p}.scales"],
                                         files[f"{p}.g_idx"])
            else:
                assert files[f"{p}.qweight"].shape == (k, n // 8) and files[f"{p}.qzeros"].shape == (k // 32, n // 8)
                deq = awq_gemm_dequantize(files[f"{p}.qweight"], files[f"{p}.qzeros"], files[f"{p}.scales"], 32)
            assert torch.equal(deq, t.dequantize()), name
        else:
            assert torch.equal(files[name], t.dequantize() if isinstance(t, QuantizedTensor) else t), name


def test_unsupported_variants_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="4 bits"):
        check_supported({"quant_method": "gptq", "bits": 8})
    with pytest.raises(ValueError, match="v1"):
        check_supported({"quant_method": "gptq", "bits": 4, "checkpoint_format": "gptq_v2"})
    with pytest.raises(ValueError, match="gemm"):
        check_supported({"quant_method": "awq", "bits": 4, "version": "gemv"})
    with pytest.raises(ValueError, match="zero points 1..15"):  # v1 cannot write a zero point of 0
        zero = torch.zeros(8, 1, dtype=torch.uint8)
        t = QuantizedTensor("intz", 4, 32, torch.zeros(8, 32, dtype=torch.uint8), torch.ones(8, 1), zero)
        save_hf_quantized(tmp_path, {"a.weight": t}, {}, _Tok(), {}, "gptq")


# -- served back --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_export_serves_on_the_int4_kernel_with_the_same_tokens(tiny_llama_dir, tmp_path, fmt, restore_torch_threads):
    """GPTQ-quantized (integer zeros) tiny model, saved both in our layout and in `fmt`: LLM(export) puts
    every linear on the int4 kernel with exactly the packed buffers of LLM(ours), and greedy tokens match."""
    from tinyserve.models.loader import hf_weights, model_config, resolve_model
    from tinyserve.tokenizer import load_tokenizer

    src = resolve_model(str(tiny_llama_dir))
    cfg = model_config(src)
    w = {k: t.float() for k, t in hf_weights(src.path)}
    calib = torch.randint(0, cfg.vocab_size, (8, 32), generator=torch.Generator().manual_seed(3))
    weights = quantize_weights(w, cfg, QuantizeOptions("gptq", 4, 32, zero="int", head="none"), calib,
                               progress=False)
    tok = load_tokenizer(resolve_model(None)).hf
    save_quantized(tmp_path / "ours", weights, cfg.to_hf(), tok, {"method": "gptq"})
    save_hf_quantized(tmp_path / fmt, weights, cfg.to_hf(), tok, {"method": "gptq"}, fmt)
    kw = {**TINY, "num_kv_blocks": 32, "block_size": 4, "packed_max_rows": 1024}
    ours, theirs = LLM(str(tmp_path / "ours"), **kw), LLM(str(tmp_path / fmt), **kw)
    assert theirs.engine.quantization == "checkpoint"
    for a, b in zip(ours.engine.model.modules(), theirs.engine.model.modules()):
        if isinstance(getattr(a, "impl", None), Int4Weight):
            assert isinstance(b.impl, Int4Weight)
            assert torch.equal(a.impl.packed, b.impl.packed) and torch.equal(a.impl.scales_zeros, b.impl.scales_zeros)
    assert not isinstance(theirs.engine.model.lm_head.impl, Int8Weight)  # head none: dense in both
    params = SamplingParams(temperature=0, max_tokens=8)
    prompts = ["Hello there", "The capital of France is"]
    assert [o.outputs[0].token_ids for o in theirs.generate(prompts, params)] == \
        [o.outputs[0].token_ids for o in ours.generate(prompts, params)]
    qkv = [weights[f"model.layers.0.self_attn.{n}_proj.weight"] for n in "qkv"]
    expect = CheckpointMethod(keep_dense=False).pack(qkv, torch.float32, CPU)
    assert torch.equal(theirs.engine.model.layers[0].self_attn.qkv_proj.impl.packed, expect.packed)


# -- the field's tools as rows ---------------------------------------------------------------------------------
def test_field_tools_rows_score_against_tinyserves_reference(tiny_llama_dir, restore_torch_threads):
    """transformers bf16 (the control) lands near tinyserve's fp32 on the same windows and prompt ids;
    torchao int4 costs more KLD than that and holds its weights in fewer bytes; byte counts look
    inside torchao's tensor subclasses."""
    from tinyserve.models.loader import resolve_model
    from tinyserve.tokenizer import load_tokenizer
    from tinyserve_lab import field_tools
    from tinyserve_lab.quality import Mode, measure_mode

    windows = [torch.randint(0, 49152, (48,), generator=torch.Generator().manual_seed(0)).tolist()]
    # the chat prompt's ids as the engine's llm.chat makes them (greedy agreement is not asserted: a random
    # model's near-uniform logits part at the first near-tie)
    prompts = [load_tokenizer(resolve_model(str(tiny_llama_dir))).apply_chat_template([{"role": "user",
                                                                                        "content": "hi"}])]
    mode = Mode("fp32", "float32", "none", model=str(tiny_llama_dir))
    _, ref = measure_mode(mode, windows, ["hi"], None, speed=False, num_threads=1, num_kv_blocks=32, block_size=4)
    rows = {m: field_tools.quality_row(m, m, b, 32, str(tiny_llama_dir), ref, windows, prompts, [0], 48)
            for m, b in (("hf", 16), ("torchao", 4))}
    assert rows["hf"]["kld_mean"] < 1e-3 and rows["hf"]["top1_agreement"] > 0.9
    assert rows["torchao"]["kld_mean"] > 2 * rows["hf"]["kld_mean"]
    assert rows["torchao"]["weight_bytes_packed"] < 0.8 * rows["hf"]["weight_bytes_packed"]
    lin = torch.nn.Linear(64, 32, bias=False).to(torch.bfloat16)
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(torch.nn.Sequential(lin), Int8WeightOnlyConfig())
    assert field_tools.weight_bytes(lin) == 32 * 64 + 32 * 4 + 32  # int8 codes; fp32 scale, int8 zero per row
