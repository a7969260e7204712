"""`tinyserve quantize`: each method stays within its bound, the calibrated ones beat RTN on a tiny
model's output error, and a saved directory is served packed, as quantized, with no re-quantization."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tinyserve import LLM, SamplingParams
from tinyserve.layers.formats import NF4_CODEBOOK, QuantizedTensor
from tinyserve.layers.linear import as_dense
from tinyserve.layers.methods import CheckpointMethod
from tinyserve.layers.packed import Int4Weight, Int8Weight
from tinyserve.models.quantized import quantized_weights, unpack_nibbles
from tinyserve_lab.quantize import awq, gptq, rtn
from tinyserve_lab.quantize.checkpoint import pack_nibbles, save_quantized
from tinyserve_lab.quantize.pipeline import GROUPS, QuantizeOptions, layer_forward, quantize_weights
from tinyserve_lab.quantize.rtn import Spec

from conftest import TINY

CPU = torch.device("cpu")


def _w(n: int = 48, k: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


# -- grids and their bounds -----------------------------------------------------------------------------
@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (3, 32)])
def test_rtn_int_is_within_half_a_step(bits, group):
    w = _w()
    t = rtn.rtn(w, Spec("int", bits, group))
    assert int(t.q.max()) <= (1 << bits) - 1 and t.scales.dtype == torch.bfloat16
    err = (t.dequantize() - w).abs().view(48, -1, group)
    # half a step, plus what rounding the scale and zero to bf16 can shift the grid by (2^-8 relative)
    slack = 2**-8 * (t.zeros.float().abs() + 16 * t.scales.float())
    assert bool((err <= t.scales.float()[..., None] / 2 + slack[..., None]).all())


def test_rtn_int8_and_nf4_bounds():
    w = _w()
    t8 = rtn.rtn(w, Spec("int8", 8, 0))
    assert t8.q.dtype == torch.int8 and t8.scales.shape == (48,)
    assert bool(((t8.dequantize() - w).abs() <= t8.scales.float()[:, None] * 0.51).all())
    nf = rtn.rtn(w, Spec("nf4", 4, 32))
    gap = (NF4_CODEBOOK[1:] - NF4_CODEBOOK[:-1]).max() / 2  # the widest half-gap of the codebook
    err = (nf.dequantize() - w).abs().view(48, -1, 32)
    assert bool((err <= nf.scales.float()[..., None] * (gap + 0.01)).all())
    assert torch.allclose(nf.dequantize().abs().view(48, -1, 32).amax(-1), nf.scales.float(), rtol=1e-6)
    x = (nf.dequantize() / nf.scales.float().repeat_interleave(32, 1)).view(-1)  # on the codebook, and:
    x = torch.cat([x, torch.linspace(-1.2, 1.2, 4001)])  # between its values; codes = the nearest value's
    nearest = (x[:, None] - NF4_CODEBOOK).abs().argmin(-1)
    s = torch.ones(1, x.numel())
    assert torch.equal(rtn.codes(x[None], s, None, Spec("nf4", 4, x.numel())).long()[0], nearest)


def test_group_sizes_and_bits_give_clear_errors():
    with pytest.raises(ValueError, match="groups that do: \\[32, 64\\]"):
        Spec.make("rtn", 4, 128).check("model.layers.0.self_attn.q_proj.weight", 576)
    with pytest.raises(ValueError, match="3 or 4 bits"):
        QuantizeOptions("awq", 8)
    with pytest.raises(ValueError, match="4-bit format"):
        QuantizeOptions("nf4", 3)
    with pytest.raises(ValueError, match="--bits"):
        QuantizeOptions("rtn", 2)


def test_gptq_with_identity_hessian_is_rtn_and_with_correlated_inputs_beats_it():
    """No correlation between inputs: nothing to compensate, GPTQ = RTN code for code. Correlated
    inputs: GPTQ's loss tr((W - Q) H (W - Q)^T) is lower than RTN's."""
    w, spec = _w(), Spec("int", 4, 32)
    assert torch.equal(gptq.gptq(w, torch.eye(128), spec, damp=0).q, rtn.rtn(w, spec).q)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 16, generator=g) @ torch.randn(16, 128, generator=g) + 0.1 * torch.randn(512, 128, generator=g)
    h = gptq.hessian(x)

    def loss(t: QuantizedTensor) -> float:
        d = (t.dequantize() - w).double()
        return float(torch.einsum("ik,kl,il->", d, h.double(), d))

    for act_order in (False, True):
        t = gptq.gptq(w, h, spec, act_order=act_order)
        assert int(t.q.max()) <= 15 and t.zeros is not None
        assert loss(t) < 0.5 * loss(rtn.rtn(w, spec)), act_order
    t8 = gptq.gptq(w, h, Spec("int8", 8, 0))
    assert loss(t8) < loss(rtn.rtn(w, Spec("int8", 8, 0)))


def test_awq_scales_and_clipping_never_lose_on_their_objective():
    """s = 1 is a candidate and clipping starts at the full range: on the searched inputs neither can
    be worse than RTN; with an outlier input channel the scales are not all 1."""
    w, spec = _w(), Spec("int", 4, 32)
    x = torch.randn(256, 128, generator=torch.Generator().manual_seed(2))
    x[:, 5] *= 20
    s = awq.search_scales(x, w, spec)
    ref = x @ w.t()

    def err(wq: torch.Tensor) -> float:
        return float(((x @ wq.t() - ref) ** 2).mean())

    assert s[5] > s.median() and err(rtn.fake_quantize(w * s, spec) / s) < err(rtn.fake_quantize(w, spec))
    bounds = awq.search_clip(x, w, spec)
    assert bool((bounds <= w.abs().view(48, -1, 32).amax(-1) + 1e-7).all())
    assert err(rtn.fake_quantize(awq.clip(w, bounds, 32), spec)) <= err(rtn.fake_quantize(w, spec)) + 1e-9


# -- packing and the checkpoint -----------------------------------------------------------------------------
def test_nibbles_round_trip():
    q = torch.randint(0, 16, (8, 64), dtype=torch.uint8)
    assert pack_nibbles(q).shape == (8, 32) and torch.equal(unpack_nibbles(pack_nibbles(q)), q)


@pytest.mark.parametrize("spec", [Spec("int", 4, 32), Spec("int", 3, 64), Spec("int8", 8, 0), Spec("nf4", 4, 32)],
                         ids=["int4", "int3", "int8", "nf4"])
def test_checkpoint_round_trips_exactly_and_packs_without_requantizing(tmp_path, spec):
    """Saved, read back: the same codes, scales and zeros; the packed kernel (fp32 activations) then
    computes x @ dequantized^T."""

    class Tok:
        def save_pretrained(self, path: str) -> None:
            pass

    shards = {"a.weight": rtn.rtn(_w(32, 128, 3), spec), "b.weight": rtn.rtn(_w(16, 128, 4), spec),
              "norm.weight": torch.ones(7)}
    save_quantized(tmp_path, shards, {"model_type": "llama"}, Tok(), {"method": "rtn"})
    back = dict(quantized_weights(tmp_path))
    assert torch.equal(back["norm.weight"], shards["norm.weight"])
    for name in ("a.weight", "b.weight"):
        a, b = shards[name], back[name]
        assert isinstance(b, QuantizedTensor) and (a.format, a.bits, a.group) == (b.format, b.bits, b.group)
        assert torch.equal(a.q, b.q) and torch.equal(a.scales, b.scales) and torch.equal(a.dequantize(), b.dequantize())
    impl = CheckpointMethod(keep_dense=False).pack([back["a.weight"], back["b.weight"]], torch.float32, CPU)
    x = torch.randn(3, 128)
    ref = x @ torch.cat([back["a.weight"].dequantize(), back["b.weight"].dequantize()]).t()
    kinds = {"int": Int4Weight, "int8": Int8Weight}
    if spec.format in kinds:
        assert isinstance(impl, kinds[spec.format])
    torch.testing.assert_close(impl(x), ref, atol=1e-5, rtol=1e-5)


# -- the tiny model: calibration pays, the directory serves -------------------------------------------------
@pytest.fixture(scope="module")
def tiny_weights(tiny_llama_dir):
    """The tiny checkpoint made a little more like a trained model: low-rank token embeddings (inputs
    that correlate, which GPTQ exploits) and a few large norm channels (activation outliers, which
    AWQ exploits). Random iid weights give neither, and no method could beat RTN by much."""
    from tinyserve.models.loader import hf_weights, model_config, resolve_model

    src = resolve_model(str(tiny_llama_dir))
    cfg = model_config(src)
    w = {k: t.float() for k, t in hf_weights(src.path)}
    g = torch.Generator().manual_seed(1)
    w["model.embed_tokens.weight"] = (torch.randn(cfg.vocab_size, 8, generator=g) @ torch.randn(8, 64, generator=g)
                                      * 0.3 + 0.05 * torch.randn(cfg.vocab_size, 64, generator=g))
    for i in range(cfg.num_layers):
        for n in ("input_layernorm", "post_attention_layernorm"):
            w[f"model.layers.{i}.{n}.weight"][:4] *= 8
    return cfg, w


def _logits(cfg, weights, tokens: torch.Tensor) -> torch.Tensor:
    from tinyserve.models.llama import RotaryEmbedding

    w = {k: as_dense(v).float() for k, v in weights.items()}
    x = w["model.embed_tokens.weight"][tokens]
    cos, sin = RotaryEmbedding(cfg, tokens.shape[1])(torch.arange(tokens.shape[1]), torch.float32)
    for i in range(cfg.num_layers):
        x = layer_forward(x, w, f"model.layers.{i}.", cfg, cos, sin, lambda g, t: t)
    return F.rms_norm(x, (x.shape[-1],), w["model.norm.weight"], cfg.rms_norm_eps) @ w["lm_head.weight"].t()


def test_layer_forward_equals_the_engine_model(tiny_llama_dir, restore_torch_threads):
    """The calibration forward is the engine's decoder (fp32), so calibration sees the model that is served."""
    from tinyserve.models.loader import hf_weights, model_config, resolve_model

    src = resolve_model(str(tiny_llama_dir))
    cfg = model_config(src)
    llm = LLM(str(tiny_llama_dir), **TINY, num_kv_blocks=16, block_size=4)
    ids = [5, 900, 31, 7000, 12, 4242, 8]
    from tinyserve_lab.quality import window_logits

    torch.testing.assert_close(_logits(cfg, dict(hf_weights(src.path)), torch.tensor([ids]))[0],
                               window_logits(llm.engine, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bits", [4, 3])
def test_gptq_and_awq_beat_rtn_on_the_tiny_models_output(tiny_weights, bits):
    """Held-out tokens, logits vs the unquantized model: the calibrated methods' error is well below
    RTN's at the same bits and group (it would not be if calibration did nothing: see above, GPTQ
    without input correlations is RTN exactly, AWQ with s = 1 too)."""
    cfg, w = tiny_weights
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(0, cfg.vocab_size, (16, 64), generator=g)
    held_out = torch.randint(0, cfg.vocab_size, (8, 64), generator=g)
    ref = _logits(cfg, w, held_out)
    err = {}
    for method in ("rtn", "gptq", "awq"):
        opts = QuantizeOptions(method, bits, 32, head="none")
        out = quantize_weights({k: v.clone() for k, v in w.items()}, cfg, opts, calib, progress=False)
        err[method] = float(((_logits(cfg, out, held_out) - ref) ** 2).mean() / (ref**2).mean())
        if method == "awq":  # its scales live in the norms now; the fp32 function of the model is unchanged
            norm = "model.layers.0.input_layernorm.weight"
            assert not torch.equal(out[norm], w[norm])
    assert err["gptq"] < 0.5 * err["rtn"], err
    assert err["awq"] < 0.8 * err["rtn"], err


def test_saved_directory_serves_packed_and_generates_as_in_memory(tiny_weights, tmp_path, restore_torch_threads):
    """Quantize in memory, save, `LLM(DIR)`: every linear is on the packed int4 kernel holding exactly the
    in-memory codes (no re-quantization), and greedy tokens equal those of the in-memory weights loaded
    into the same engine."""
    from tinyserve.models.loader import resolve_model
    from tinyserve.tokenizer import load_tokenizer

    cfg, w = tiny_weights
    calib = torch.randint(0, cfg.vocab_size, (8, 32), generator=torch.Generator().manual_seed(3))
    weights = quantize_weights({k: v.clone() for k, v in w.items()}, cfg, QuantizeOptions("gptq", 4, 32), calib,
                               progress=False)
    tok = load_tokenizer(resolve_model(None)).hf
    save_quantized(tmp_path / "q", weights, {**cfg.to_hf()}, tok, {"method": "gptq"})
    kw = {**TINY, "num_kv_blocks": 32, "block_size": 4, "packed_max_rows": 1024}
    llm = LLM(str(tmp_path / "q"), **kw)
    assert llm.engine.quantization == "checkpoint"
    qkv = llm.engine.model.layers[0].self_attn.qkv_proj.impl
    assert isinstance(qkv, Int4Weight) and isinstance(llm.engine.model.lm_head.impl, Int8Weight)
    names = [f"model.layers.0.{n}.weight" for n in GROUPS[0]]
    expect = CheckpointMethod(keep_dense=False).pack([weights[n] for n in names], torch.float32, CPU)
    assert torch.equal(qkv.packed, expect.packed) and torch.equal(qkv.scales_zeros, expect.scales_zeros)
    params = SamplingParams(temperature=0, max_tokens=8)
    prompts = ["Hello there", "The capital of France is"]
    saved = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    llm.engine.model.load_weights(weights.items(), torch.float32, CPU)  # the in-memory model, same engine
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == saved
    with pytest.raises(ValueError, match="already quantized"):
        LLM(str(tmp_path / "q"), **kw, quantization="int4")


def test_calibration_sample_is_fixed_by_its_seed():
    from tinyserve.models.loader import resolve_model
    from tinyserve.tokenizer import load_tokenizer
    from tinyserve_lab.quantize.calib import calibration_tokens

    tok = load_tokenizer(resolve_model(None)).hf
    a, b = calibration_tokens(tok, 4, 64, seed=0), calibration_tokens(tok, 4, 64, seed=0)
    assert a.shape == (4, 64) and torch.equal(a, b)
    assert not torch.equal(a, calibration_tokens(tok, 4, 64, seed=1))


def test_quantize_command_writes_a_servable_directory(tiny_llama_dir, tmp_path, restore_torch_threads):
    from tinyserve.cli import main

    out = tmp_path / "rtn"
    assert main(["quantize", "--model", str(tiny_llama_dir), "--method", "rtn", "--bits", "4", "--group-size", "32",
                 "--num-threads", "1", "--out", str(out)]) == 0
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "quantization.json", "model.safetensors", "tokenizer.json"} <= files
    llm = LLM(str(out), **TINY, num_kv_blocks=16, block_size=4)
    assert len(llm.generate(["Hi"], SamplingParams(temperature=0, max_tokens=3))[0].outputs[0].token_ids) == 3
    with pytest.raises(SystemExit):  # group 128 does not divide the tiny model's 64-wide layers: a clear error
        main(["quantize", "--model", str(tiny_llama_dir), "--method", "rtn", "--group-size", "128", "--out", str(out)])


# -- the table --------------------------------------------------------------------------------------------
def test_quant_table_joins_stages_and_parses_configs(tmp_path):
    """`bench quant`'s stages write separate results; the table joins them by mode, a row that only one
    stage measured shows dashes for the other's columns, and the plots are written."""
    from tinyserve_lab import quant_table as qt

    assert qt.parse_config("gptq-4b-g64") == qt.QuantConfig("gptq", 4, 64)
    assert qt.parse_config("rtn-8b").name == "rtn-8b" and qt.QuantConfig("awq", 3, 32).name == "awq-3b-g32"
    assert qt.parse_config("gptq-3b-g32-act-d0.1") == qt.QuantConfig("gptq", 3, 32, act_order=True, damp=0.1)
    assert qt.QuantConfig("gptq", 3, 32, act_order=True, damp=0.1).name == "gptq-3b-g32-act-d0.1"
    assert qt.parse_config("awq-4b-g64-zint") == qt.QuantConfig("awq", 4, 64, zero="int")
    assert qt.parse_config("torchao-8b").name == "torchao-8b" and qt.parse_config("hf-16b").bits == 16
    with pytest.raises(Exception, match="METHOD-BITSb"):
        qt.parse_config("gptq")
    base = {"mode": "fp32", "ppl": 10.0, "ppl_delta_pct": 0.0, "kld_mean": 0.0, "kld_p99": 0.0, "top1_agreement": 1.0,
            "greedy_identical": 1.0, "greedy_prefix": 1.0, "weight_bytes_packed": 2**29}
    row = {**base, "mode": "gptq-4b-g64", "ppl": 11.0, "ppl_delta_pct": 10.0, "kld_mean": 0.1, "kld_p99": 1.0,
           "top1_agreement": 0.8, "greedy_identical": 0.5, "greedy_prefix": 0.7, "checkpoint_bytes": 2**26,
           "quantize_seconds": 42.0, "weight_bytes_packed": 2**26}
    quality = {"modes": [base, row], "text": {"windows": 2, "window_tokens": 8, "file": "f", "scored_tokens": 14},
               "greedy": {"prompts": ["a", "b"], "max_tokens": 4}}
    speed_pt = [{"batch": 1, "decode_tok_s": 50.0, "prefill_tok_s": 100.0},
                {"batch": 32, "decode_tok_s": 400.0, "prefill_tok_s": 900.0}]
    speed = {"input_len": 128, "output_len": 32, "modes": [
        {"mode": "gptq-4b-g64", "speed": speed_pt, "peak_rss_bytes": 2**30, "weight_bytes_packed": 2**26},
        {"mode": "bf16", "speed": speed_pt, "peak_rss_bytes": 2**30, "weight_bytes_packed": 2**28}]}
    table = qt.markdown_table(quality, speed)
    assert "| gptq-4b-g64 | 64 | 64 | 1024 | 42 | 50 | 400 | 900 | 11.000 | +10.00 | 0.1000 | 1.000 | 80.0 | 1/2 |" \
        in table
    assert "| fp32 | - | 512 | - | - | - | - | - | 10.000 |" in table  # quality only
    assert "| bf16 | - | 256 | 1024 | - | 50 | 400 | 900 | - |" in table  # speed only
    assert [p.name for p in qt.plot(quality, speed, tmp_path)] == ["quant_quality_vs_bytes.png",
                                                                  "quant_speed_vs_bytes.png"]
