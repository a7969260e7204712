# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # tinyserve, walked through on the bundled model
#
# Five pieces of the engine, each shown on its real objects and each checked: the walkthrough
# `assert`s what it shows, so it fails the day the engine stops behaving the way this page says.
#
# 1. **the KV cache math**: bytes per token from the model's shape, against the pool the engine allocated;
# 2. **one scheduled step**: decodes first, then prefill chunks under the token budget;
# 3. **the paged pool**: two requests sharing a prompt share its blocks (the prefix cache);
# 4. **a quantized linear**: the file's 4-bit blocks against their dense form: bytes, error, one product;
# 5. **a speculative step**: prompt-lookup drafts, how many the model accepts, and the same greedy text.
#
# Run it as a script (`make walkthrough`, or `python docs/walkthrough.py` from the repository root) or open
# it as a notebook (`jupytext --to notebook docs/walkthrough.py`). The model is SmolLM2-135M-Instruct, the
# GGUF the project bundles; everything runs eagerly (no compiled step) in fp32, the engine's exact path,
# on 2 threads.

# %%
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

# This checkout's engine, whether run as a script (docs/walkthrough.py) or as a notebook (cwd: docs/ or the root).
HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
sys.path.insert(0, str(next(p / "src" for p in (HERE, HERE.parent) if (p / "src" / "tinyserve").is_dir())))

from tinyserve import LLM, SamplingParams  # noqa: E402
from tinyserve.engine.scheduler import ScheduledBatch  # noqa: E402
from tinyserve.kv import quant  # noqa: E402
from tinyserve.layers.linear import weight_bytes  # noqa: E402
from tinyserve.layers.methods import GGUFMethod, Int4Method, Int8Method  # noqa: E402
from tinyserve.models.gguf import gguf_weights  # noqa: E402
from tinyserve.speculative.ngram import propose_ngram  # noqa: E402
from tinyserve.worker.runner import ModelRunner  # noqa: E402

torch.set_num_threads(2)
T0 = time.perf_counter()
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)

llm = LLM(dtype="float32", enforce_eager=True, num_threads=2, kv_cache_memory_gb=0.5, max_num_batched_tokens=64)
engine = llm.engine
mc = engine.model_config
print(f"loaded {engine.model_name} in {time.perf_counter() - T0:.1f} s: {mc.num_layers} layers, "
      f"{mc.num_heads} query heads, {mc.num_kv_heads} KV heads of {mc.head_dim}, vocabulary {mc.vocab_size}")

# %% [markdown]
# ## 1. The KV cache math
#
# Every token of context keeps a K and a V row per layer and per KV head. SmolLM2-135M has grouped-query
# attention (9 query heads share 3 KV heads), so a token costs
# `2 (K, V) x layers x kv_heads x head_dim x bytes per value`. The engine sizes its pool from this number
# once, at start (`ModelConfig.kv_bytes_per_token`); here we compute it by hand and read it back off the
# pool tensors the runner allocated: one K and one V tensor per layer, `[blocks + 1, block_size, kv_heads,
# head_dim]` (the extra block is a scratch block the block manager never hands out).

# %%
by_hand = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * torch.finfo(torch.float32).bits // 8
k0, v0 = engine.runner.kv_caches[0]
pool_blocks, block_size, kv_heads, row = k0.shape
from_pool = sum(k[0, 0].numel() * k.element_size() + v[0, 0].numel() * v.element_size()
                for k, v in engine.runner.kv_caches)
print(f"bytes per token, fp32: by hand {by_hand:,}, engine {mc.kv_bytes_per_token(torch.float32):,}, "
      f"pool tensors {from_pool:,}")
assert by_hand == mc.kv_bytes_per_token(torch.float32) == from_pool
assert (pool_blocks, block_size, kv_heads, row) == (engine.num_blocks + 1, engine.config.block_size,
                                                     mc.num_kv_heads, mc.head_dim)

budget = engine.config.kv_cache_memory_gb * 2**30
tokens = engine.num_blocks * block_size
print(f"a {engine.config.kv_cache_memory_gb} GiB budget holds {engine.num_blocks} blocks of {block_size} = "
      f"{tokens:,} tokens; the pool is {engine.runner.kv_cache_bytes / 2**20:.1f} MiB with the scratch block")
assert tokens == int(budget // (by_hand * block_size)) * block_size

# Why it matters at decode time: a step reads every weight once and every context token's K/V once per
# sequence, so batch x context tokens of KV cost what the weights cost at this many tokens.
weights = weight_bytes(engine.model)
print(f"weights: {weights / 2**20:.0f} MiB in fp32; a decode step reads as much KV as weights once "
      f"batch x context reaches {weights // by_hand:,} tokens (e.g. 16 sequences of {weights // by_hand // 16:,})")

# %% [markdown]
# Narrower formats hold more tokens in the same bytes. bf16 halves fp32; `--kv-cache-dtype int8` stores
# each (token, head) row as `head_dim` int8 codes plus its bf16 scale in the row's last two bytes, so a row
# is 66 bytes where bf16 takes 128: 1.94x the tokens of bf16. We build a second (tiny) pool in that format
# through the runner itself and quantize real K rows the prefill below writes, to see the error it costs.
# K rows are stored smoothed: each channel divided by its expected size s (from the layer's weights:
# `Attention.smooth_k_channels`), the queries multiplied by it, so q.k is unchanged and an outlier channel
# no longer sets the whole row's scale.

# %%
for fmt, dtype in (("auto", torch.bfloat16), ("int8", torch.bfloat16), ("fp8_e4m3", torch.bfloat16)):
    per_token = mc.kv_bytes_per_token(dtype, fmt)
    print(f"  kv {fmt:9s} ({str(quant.pool_dtype(fmt, dtype)).removeprefix('torch.'):13s}): {per_token:6,} B/token, "
          f"{int(budget // per_token):7,} tokens in {engine.config.kv_cache_memory_gb} GiB")
int8_runner = ModelRunner(engine.model, mc, num_blocks=2, block_size=block_size, dtype=torch.bfloat16,
                          device="cpu", kv_cache_dtype="int8")
k8 = int8_runner.kv_caches[0][0]
int8_bytes = sum(k[0, 0].numel() * k.element_size() * 2 for k, _ in int8_runner.kv_caches)
print(f"int8 pool: dtype {k8.dtype}, row of {k8.shape[-1]} = {mc.head_dim} codes + 2 scale bytes; "
      f"{int8_bytes} B/token, {mc.kv_bytes_per_token(torch.bfloat16) / int8_bytes:.2f}x bf16's tokens")
assert k8.dtype == torch.int8 and k8.shape[-1] == mc.head_dim + quant.SCALE_BYTES
assert int8_bytes == mc.kv_bytes_per_token(torch.bfloat16, "int8")
del int8_runner

# A running request's K rows, read straight from the pool: token i of a sequence lives in slot
# `block_table[i // block_size] * block_size + i % block_size` (kv/block_manager.py).
probe = engine.add_request("probe", "The key-value cache keeps one row per token, per layer and per KV head.",
                           GREEDY)[0]
engine.step()  # its whole prompt fits one step's budget: one prefill, one sampled token
slots = [probe.block_table[i // block_size] * block_size + i % block_size for i in range(probe.num_computed)]
k_rows = k0.view(-1, kv_heads, row)[slots].float()  # [tokens, kv_heads, head_dim], layer 0, after RoPE
assert k_rows.abs().sum(-1).min() > 0, "every computed token has its K in the pool"
unwritten = [probe.block_table[-1] * block_size + i for i in range(probe.num_computed % block_size, block_size)]
assert not k0.view(-1, kv_heads, row)[unwritten].any(), "and the rest of its last block is still empty"
attn0 = engine.model.layers[0].self_attn
attn0.smooth_k_channels(engine.model.layers[0].input_layernorm.weight)  # what an int8 engine sets at load
s_k = 1 / attn0.qk_scale[-kv_heads:].float()  # its K heads are multiplied by 1 / s
attn0.qk_scale = None  # this engine's pool is fp32: it stores K as is
plain = quant.dequantize(quant.quantize(k_rows), torch.float32)  # codes + scale, and back
read = quant.dequantize(quant.quantize(k_rows / s_k), torch.float32) * s_k  # smoothed, as an int8 pool holds it
int8_err = ((read - k_rows).norm() / k_rows.norm()).item()
plain_err = ((plain - k_rows).norm() / k_rows.norm()).item()
print(f"layer-0 K of {len(slots)} prompt tokens through int8 and back: relative error {int8_err:.2%} "
      f"(unsmoothed: {plain_err:.2%}); s per channel from {s_k.min():.2f} to {s_k.max():.2f}")
assert int8_err < 0.02
engine.abort_request("probe")
engine.pop_output("probe")

# %% [markdown]
# ## 2. One scheduled step
#
# Continuous batching: every step, the scheduler (`engine/scheduler.py`) fills a token budget
# (`max_num_batched_tokens`, 64 here to make chunking visible) with the running decodes first, one token
# each, then prefill chunks in the policy's order (fcfs), admitting waiting requests while sequence slots
# and KV blocks last. A prompt longer than what is left of the budget is cut into chunks. We let one
# request start decoding, queue a long and a short one, and watch the next two steps: we wrap the
# scheduler's `schedule` to print what it chose before the model runs it.

# %%
steps: list[list[tuple[str, str, int]]] = []


def describe(batch: ScheduledBatch) -> ScheduledBatch:
    """Record what a step feeds each sequence, in the scheduler's order, before the model runs it."""
    chosen = []
    for seq, n in zip(batch.seqs, batch.num_tokens):
        kind = "decode" if seq.num_computed >= seq.num_prompt_tokens else "prefill"
        chosen.append((seq.request_id, kind, n))
        span = f"tokens {seq.num_computed}..{seq.num_computed + n - 1}"
        print(f"    {seq.request_id:6s} {kind:7s} {n:3d} token(s) ({span} of {seq.num_tokens})")
    waiting = [s.request_id for s in engine.scheduler.waiting]
    budget_used = f"{sum(batch.num_tokens)} of {engine.scheduler.max_num_batched_tokens} budget tokens"
    print(f"    = {budget_used}; waiting: {waiting}")
    steps.append(chosen)
    return batch


schedule = engine.scheduler.schedule
engine.scheduler.schedule = lambda: describe(schedule())  # type: ignore[method-assign]

long_prompt = " ".join(f"item {i}," for i in range(20))
engine.add_request("first", "Paged attention splits the cache into", GREEDY)
print("step 1: 'first' alone")
engine.step()
engine.add_request("long", long_prompt, GREEDY)
engine.add_request("short", "Continuous batching means", GREEDY)
for i in (2, 3):
    print(f"step {i}:")
    engine.step()
engine.scheduler.schedule = schedule  # type: ignore[method-assign]

budget_tokens = engine.config.max_num_batched_tokens
long_len = len(engine.get_request("long")[0].prompt_token_ids)
assert steps[0] == [("first", "prefill", steps[0][0][2])]
assert steps[1][0] == ("first", "decode", 1), "decodes go first"
assert steps[1][1] == ("long", "prefill", budget_tokens - 1), "the long prompt takes what budget is left"
assert [r for r, _, _ in steps[1]] == ["first", "long"], "'short' waits: the budget is spent"
assert steps[2][:2] == [("first", "decode", 1), ("long", "prefill", long_len - (budget_tokens - 1))]
assert steps[2][2][:2] == ("short", "prefill") and sum(n for *_, n in steps[2]) <= budget_tokens
while engine.has_unfinished():
    engine.step()
for rid in ("first", "long", "short"):
    out = engine.pop_output(rid)
    assert len(out.outputs[0].token_ids) == GREEDY.max_tokens
print("all three finished with", GREEDY.max_tokens, "tokens each")

# %% [markdown]
# ## 3. The paged pool and the prefix cache
#
# The pool is a fixed set of blocks; a sequence holds a *block table*, the list of its block ids. A block
# full of computed prompt tokens is registered under the hash of its tokens and of everything before them
# (kv/block_hash.py), so a later prompt with the same prefix takes those blocks instead of recomputing
# them: the two tables share their first entries, and the blocks' reference counts say two sequences
# hold them. Only full blocks are shared; the rest of each prompt gets fresh blocks of its own.

# %%
system = ("You are a careful assistant for inference engineers. Answer in one short paragraph, give numbers "
          "with their units, say which machine they were measured on, and name the command that measured them. ")
a = engine.add_request("ask-a", system + "What does a KV block hold?", GREEDY)[0]
while a.num_computed < a.num_prompt_tokens:  # its prefill, in as many chunks as the budget makes
    engine.step()
b = engine.add_request("ask-b", system + "Why share prompt prefixes?", GREEDY)[0]
engine.step()

common = next(i for i, (x, y) in enumerate(zip(a.prompt_token_ids, b.prompt_token_ids)) if x != y)
shared_blocks = common // block_size
print(f"a's table: {a.block_table}\nb's table: {b.block_table}")
print(f"the prompts share {common} tokens = {shared_blocks} full blocks of {block_size}; b found "
      f"{b.num_cached_tokens} tokens in the cache and prefilled only {b.num_prompt_tokens - b.num_cached_tokens}")
print("reference counts of b's blocks:", [engine.blocks.ref_counts[blk] for blk in b.block_table])
assert b.num_cached_tokens == shared_blocks * block_size > 0
assert b.block_table[:shared_blocks] == a.block_table[:shared_blocks]
assert all(engine.blocks.ref_counts[blk] == 2 for blk in b.block_table[:shared_blocks])
assert not set(b.block_table[shared_blocks:]) & set(a.block_table), "past the shared prefix, blocks are b's own"
stats = engine.stats()
print(f"prefix cache so far: {stats.prefix_cache_hits} of {stats.prefix_cache_queries} prompt tokens looked up "
      f"were hits; KV usage {stats.kv_usage:.1%}")
b_table = list(b.block_table)
for rid in ("ask-a", "ask-b"):  # done with them: an abort gives the blocks back at once
    engine.abort_request(rid)
    engine.pop_output(rid)
assert all(engine.blocks.ref_counts[blk] == 0 for blk in range(engine.num_blocks)), "every block is back"
still = engine.blocks.match(b.full_block_hashes(block_size, b.num_prompt_tokens))
assert len(still) >= shared_blocks and still == b_table[:len(still)], "b's full prompt blocks stay cached"
print(f"both aborted: every block is back in the pool; {engine.blocks.num_cached} blocks stay findable by "
      "their hash until a fresh block is needed (LRU)")

# %% [markdown]
# ## 4. A quantized linear
#
# The bundled GGUF stores most projections as Q4_1: blocks of 32 weights, each a 4-bit code plus an fp16
# scale and minimum per block (20 bytes per 32 weights, 5 bits a weight). In fp32 the engine dequantizes
# them into dense weights (the exact path this walkthrough runs); with 16-bit activations it keeps the
# blocks packed and multiplies them as stored (`--quantization gguf`). We take layer 0's `down_proj` as the
# file stores it, check that the engine's dense weight is exactly its dequantization, pack it for
# PyTorch's int4 CPU kernel the way `gguf-int4` does, and compare bytes and one product on real activations
# (the inputs `down_proj` saw in a prefill, captured with a forward hook). Re-quantizing the dense weight
# (`--quantization int8` / `int4`, round to nearest) shows what those modes would cost on top, and a
# small surprise: int4 in groups of 32 (a min and a scale per group) lands on Q4_1's own grid and loses
# nothing, while int8 with one scale per 1536-wide row cannot express the per-group grid and loses more,
# despite twice the bits; groups of 64 straddle two of the file's blocks. The int4 kernel's form is a
# little larger than the file: its scales and zeros are in the activations' dtype (fp32 here), not fp16.

# %%
name = "model.layers.0.mlp.down_proj.weight"
stored_w = next(w for n, w in gguf_weights(engine.source.path) if n == name)
linear = engine.model.layers[0].mlp.down_proj
dense = linear.impl.dense_weight
assert torch.equal(stored_w.dequantize(), dense), "fp32 serves the file's values exactly"

seen: list[torch.Tensor] = []
hook = linear.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach().clone()))
llm.generate("Quantized weights trade a little accuracy for a lot of bandwidth.",
             SamplingParams(temperature=0, max_tokens=1))
hook.remove()
x = seen[0]  # [prompt tokens, intermediate_size]
reference = x @ dense.T


def nbytes(module: torch.nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in module.buffers())


cpu = torch.device("cpu")
forms = {
    "file Q4_1 on the int4 kernel": GGUFMethod(kernel="int4", keep_dense=False).pack([stored_w], torch.float32, cpu),
    "int8 per channel (RTN)": Int8Method(keep_dense=False).pack([dense], torch.float32, cpu),
    "int4 g32 (RTN)": Int4Method(32, keep_dense=False).pack([dense], torch.float32, cpu),
    "int4 g64 (RTN)": Int4Method(64, keep_dense=False).pack([dense], torch.float32, cpu),
}
print(f"{name} {tuple(dense.shape)}; x: {tuple(x.shape)} real activations")
print(f"  {'dense fp32':30s} {dense.numel() * 4:>9,} B  (bf16 would be {dense.numel() * 2:,})")
print(f"  {'the file (Q4_1 blocks)':30s} {stored_w.data.numel():>9,} B  "
      f"({8 * stored_w.data.numel() / dense.numel():.2f} bits/weight)")
errors = {}
for label, impl in forms.items():
    y = impl(x)
    errors[label] = ((y - reference).norm() / reference.norm()).item()
    print(f"  {label:30s} {nbytes(impl):>9,} B  product vs dense: relative error {errors[label]:.2e}, "
          f"y[0, :3] = {[round(v, 4) for v in y[0, :3].tolist()]}")
print(f"  {'dense reference':30s} {'':>11s} y[0, :3] = {[round(v, 4) for v in reference[0, :3].tolist()]}")
assert errors["file Q4_1 on the int4 kernel"] < 1e-5, "the packed file form is the same weight"
assert errors["int4 g32 (RTN)"] < 1e-5, "asymmetric int4 over the file's own 32-weight groups finds its grid"
assert errors["int4 g32 (RTN)"] < errors["int8 per channel (RTN)"] < errors["int4 g64 (RTN)"] < 0.2
assert nbytes(forms["file Q4_1 on the int4 kernel"]) < dense.numel() * 4 / 4

# %% [markdown]
# ## 5. A speculative step: prompt lookup
#
# At batch 1 a decode step is bound by reading the weights, so verifying k + 1 tokens costs little more
# than computing one. Prompt lookup (vLLM's `ngram` method, speculative/ngram.py) drafts without a model:
# if the last few tokens occurred earlier in the prompt or output, it proposes what followed them. The
# step feeds the drafts after the last token; the target's greedy choice at each position accepts the
# longest agreeing run and adds one token of its own (speculative/verify.py). Greedy output is therefore
# exactly the non-speculative output; we check that against the engine above, on a prompt that repeats
# itself. Each row below is one step: the drafts prompt lookup proposed (recomputed here with
# `propose_ngram` and checked against the engine's counters), how many the model accepted, and how many
# tokens the step emitted. A draft that copies the wrong animal is cut at the first disagreement.

# %%
K = 4
SPEC_GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
spec_llm = LLM(dtype="float32", enforce_eager=True, num_threads=2, kv_cache_memory_gb=0.1, max_model_len=2048,
               speculative_config={"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_max": 4,
                                   "prompt_lookup_min": 2, "adaptive": False})
spec = spec_llm.engine
cfg = spec.speculative
assert spec.spec is not None and cfg is not None
prompt = "The cat sat on the mat. The dog sat on the log. The bird sat on the"
seq = spec.add_request("spec", prompt, SPEC_GREEDY)[0]
tok = spec.tokenizer
print(f"{'step':>4s}  {'drafted':22s} accepted  emitted")
rounds = []
while not seq.finished:
    room = seq.max_output_tokens() - len(seq.output_token_ids) - 1
    decoding = seq.num_computed == seq.num_tokens - 1
    expect = propose_ngram(seq.token_ids, min(K, room), cfg.prompt_lookup_max, cfg.prompt_lookup_min) \
        if decoding and room > 0 else []
    before, emitted_before = spec.spec.stats, len(seq.output_token_ids)
    drafted0, accepted0 = before.num_draft_tokens, before.num_accepted_tokens
    spec.step()
    drafted = spec.spec.stats.num_draft_tokens - drafted0
    accepted = spec.spec.stats.num_accepted_tokens - accepted0
    emitted = len(seq.output_token_ids) - emitted_before
    assert drafted == len(expect), "the engine drafted what prompt lookup proposes"
    if drafted:
        assert emitted == accepted + 1 or seq.finished, "accepted drafts plus the target's own token"
    rounds.append((drafted, accepted, emitted))
    new_text = tok.decode(seq.output_token_ids[emitted_before:])
    print(f"{len(rounds):4d}  {tok.decode(expect)!r:22s} {accepted:>4d}/{drafted:<4d} {emitted:>4d} {new_text!r}")
spec_text = spec.pop_output("spec").outputs[0]
plain = llm.generate(prompt, SPEC_GREEDY)[0].outputs[0]
print(f"speculative: {spec_text.text!r}\nplain:       {plain.text!r}")
print(f"{len(spec_text.token_ids)} tokens in {len(rounds)} steps (the plain engine takes {len(plain.token_ids)}); "
      f"{sum(r[1] for r in rounds)} of {sum(r[0] for r in rounds)} drafted tokens accepted")
assert spec_text.token_ids == plain.token_ids, "greedy speculation changes nothing but the step count"
assert len(rounds) < len(plain.token_ids), "and some drafts were accepted"

# %%
print(f"walkthrough done in {time.perf_counter() - T0:.1f} s")
