"""The compiled decode step: same answers as eager on every regime, a package built once and loaded
by every later start, a damaged one rebuilt, one made for anything else never used."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tinyserve import LLM, SamplingParams
from tinyserve.layers import bf16_gemm
from tinyserve.worker import served_model
from tinyserve_lab.probe import next_token_logits

from conftest import TINY

pytestmark = pytest.mark.slow  # every test here compiles graphs (a minute of the suite)

EAGER = TINY
COMPILED = {**TINY, "enforce_eager": False, "compile": "blocking"}


def _prompts(vocab: int) -> list[list[int]]:
    return [[(7 * i + 3) % vocab for i in range(n)] for n in (40, 5, 1, 23)]


def _no_eager_fallback(caplog) -> None:
    assert not [r for r in caplog.records if "matches no compiled graph" in r.getMessage()]


def _assert_agree(ref: list, got: list, kv_cache_dtype: str = "auto") -> None:
    """Eager's and the graph's outputs: the same greedy tokens, logprobs equal to fp32 rounding. On the
    int8 pool the graph's K/V equal eager's to fp32 rounding, but rounded to codes a value that close to
    a code's boundary lands one code off (a few codes per decode-written row, measured): logprobs move
    by a few 1e-2 and a later near-tie can flip. There, the same tokens through the first decode steps,
    each within 0.15 (a wrong graph, such as unsmoothed queries, is off by far more). The fp8 pool rounds
    alike (to E4M3 values instead of codes)."""
    for a, b in zip(ref, got):
        ta, tb = a.outputs[0].token_ids, b.outputs[0].token_ids
        if kv_cache_dtype != "auto":
            same = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), len(ta))
            assert same >= 4, (ta, tb)
            ta, tb = ta[:same], tb[:same]
        assert ta == tb
        for tok, la, lb in zip(ta, a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert la[tok].logprob == pytest.approx(lb[tok].logprob, abs=1e-4 if kv_cache_dtype == "auto" else 0.15)


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8", "fp8_e4m3"])
def test_compiled_equals_eager(tiny_llama_dir, restore_torch_threads, caplog, kv_cache_dtype):
    """Greedy tokens equal, logprobs equal to fp32 rounding, for steps of 1..4 decodes, every one of
    them on a compiled graph (none falls back to eager); with the int8 pool too (its rotation and
    quantization traced into the graph, and nothing of the trace left for the eager engine after it)."""
    params = SamplingParams(temperature=0, max_tokens=20, logprobs=2, ignore_eos=True)
    kw = dict(block_size=4, num_kv_blocks=128, kv_cache_dtype=kv_cache_dtype)
    eager = LLM(str(tiny_llama_dir), **EAGER, **kw)
    compiled = LLM(str(tiny_llama_dir), **COMPILED, **kw)
    assert compiled.engine.runner.compiled is not None and eager.engine.runner.compiled is None
    assert compiled.engine.compiled_step == "ready" and eager.engine.compiled_step == "off"
    prompts = _prompts(eager.engine.model_config.vocab_size)
    ref = eager.generate(prompts, params) + [eager.generate([p], params)[0] for p in prompts]
    got = compiled.generate(prompts, params) + [compiled.generate([p], params)[0] for p in prompts]
    _no_eager_fallback(caplog)
    _assert_agree(ref, got, kv_cache_dtype)


def test_greedy_equals_transformers_with_compilation(tiny_llama_dir, restore_torch_threads):
    import transformers

    hf = transformers.LlamaForCausalLM.from_pretrained(tiny_llama_dir, torch_dtype=torch.float32).eval()
    llm = LLM(str(tiny_llama_dir), **COMPILED, block_size=4, num_kv_blocks=128)
    prompt = _prompts(llm.engine.model_config.vocab_size)[0]
    ours = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))[0]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, min_new_tokens=16)[0]
    assert ours.outputs[0].token_ids == ref[len(prompt):].tolist()


STARTUP = """
import json, logging, sys, time
logging.basicConfig(level=logging.INFO)
from tinyserve import LLM, SamplingParams
t = time.perf_counter()
llm = LLM(sys.argv[1], num_threads=1, dtype="float32", num_kv_blocks=64, compile="blocking")
startup = time.perf_counter() - t
out = llm.generate([[5, 6, 7, 8]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
print(json.dumps({"compile_s": llm.engine.compile_seconds, "startup_s": startup, "tokens": out.outputs[0].token_ids}))
"""


def _start(model_dir, cache) -> tuple[dict, str]:
    out = subprocess.run([sys.executable, "-c", STARTUP, str(model_dir)], capture_output=True, text=True,
                         env={"TINYSERVE_CACHE": str(cache), "PATH": "/usr/bin:/bin"}, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


def test_a_restart_loads_the_package_and_a_corrupt_one_is_rebuilt(tiny_llama_dir, tmp_path):
    """Fresh processes on one cache: the first compiles the step into it, the next loads it in well
    under a second with the same tokens; a package damaged on disk is ignored with a warning and built
    again, and the start after that loads again."""
    cache = tmp_path / "cache"
    first, log1 = _start(tiny_llama_dir, cache)
    assert first["compile_s"] < 300 and "compiled 1-" in log1  # a 2-layer model, one graph, one thread
    second, log2 = _start(tiny_llama_dir, cache)
    assert second["compile_s"] < 5.0 and "loaded from" in log2 and second["tokens"] == first["tokens"]
    (package,) = (cache / "compiled").rglob("*.pt2")
    package.write_bytes(b"not a zip file")
    third, log3 = _start(tiny_llama_dir, cache)
    assert "ignoring the unreadable compiled package" in log3 and "compiled 1-" in log3
    assert third["tokens"] == first["tokens"]
    fourth, log4 = _start(tiny_llama_dir, cache)
    assert "loaded from" in log4 and fourth["tokens"] == first["tokens"]


def test_a_package_for_anything_else_is_not_used(tiny_llama_dir, restore_torch_threads, monkeypatch, tmp_path):
    """The key names what shapes the graph: another torch, mode, dtype, machine or traced code is another
    directory, and a directory without this step's packages loads nothing (the step is built instead)."""
    from tinyserve.worker import compiled as c

    llm = LLM(str(tiny_llama_dir), **EAGER, block_size=4, num_kv_blocks=16)
    model, runner = llm.engine.model, llm.engine.runner
    kv, index = runner.kv_caches[0][0], llm.engine.attention.index_dtype
    key = c.artifact_key(model, kv, index, 4, None)
    assert key == c.artifact_key(model, kv, index, 4, None)  # stable
    variants = [c.artifact_key(model, kv, index, 4, 2), c.artifact_key(model, kv.to(torch.bfloat16), index, 4, None),
                c.artifact_key(model, kv, index, 8, None)]
    monkeypatch.setattr(torch, "__version__", "0.0.0+other")
    variants.append(c.artifact_key(model, kv, index, 4, None))
    monkeypatch.undo()
    monkeypatch.setattr(c, "_TRACED", ("models",))  # as if the code that traces had changed
    variants.append(c.artifact_key(model, kv, index, 4, None))
    assert all(v != key for v in variants) and len({json.dumps(v, sort_keys=True) for v in variants}) == len(variants)
    step = c.CompiledDecode(model, 4, None, 8)
    assert not step.load(runner.kv_caches, index, runner.scratch_block, c.artifact_dir(tmp_path, variants[0]))
    assert step.fns == []


def test_packed_and_dense_regimes_each_have_a_graph(tiny_llama_dir, restore_torch_threads, caplog):
    """int8 linears: batches above the packed/dense crossover get their own graph, and the
    engine's answers match eager on both sides of it (fp32 activations: no near-tie flips)."""
    kw = dict(quantization="int8", packed_max_rows=2, block_size=4, num_kv_blocks=128)
    eager = LLM(str(tiny_llama_dir), **{**EAGER, **kw})
    compiled = LLM(str(tiny_llama_dir), **{**COMPILED, **kw})
    assert compiled.engine.packed_max_rows == 2 and compiled.engine.runner.compiled.regimes[0] == (1, 2)
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=1, ignore_eos=True)
    prompts = _prompts(eager.engine.model_config.vocab_size)  # 4 sequences: above the crossover of 2
    got = compiled.generate(prompts, params) + compiled.generate(prompts[:2], params)
    _no_eager_fallback(caplog)
    ref = eager.generate(prompts, params) + eager.generate(prompts[:2], params)
    _assert_agree(ref, got)


def test_speculation_runs_on_the_compiled_graphs(tiny_llama_dir, restore_torch_threads, caplog):
    """Verification rows (1 + k per sequence) and a draft model's catch-up rows are decode rows: they
    run the compiled graphs, with the eager engine's tokens, none falling back to eager."""
    spec = {"model": str(tiny_llama_dir), "num_speculative_tokens": 3, "adaptive": False}
    kw = dict(block_size=4, num_kv_blocks=128, speculative_config=spec)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    eager = LLM(str(tiny_llama_dir), **EAGER, **kw)
    compiled = LLM(str(tiny_llama_dir), **COMPILED, **kw)
    prompts = _prompts(eager.engine.model_config.vocab_size)
    got = compiled.generate(prompts, params)
    _no_eager_fallback(caplog)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in eager.generate(prompts, params)]
    stats = compiled.engine.spec.stats
    assert stats.num_accepted_tokens == stats.num_draft_tokens > 0  # the target drafting for itself


@pytest.mark.parametrize("quantization", ["int4", "none"])
def test_a_row_computes_alike_in_a_step_of_one_row_and_of_many(tiny_llama_dir, restore_torch_threads, quantization):
    """The same bits for a sequence's next-token logits whether its step carries 1 row (a plain
    decode) or 1 + k rows (verifying drafts), alone or beside another sequence, on the compiled
    graphs: what speculation's greedy identity rests on. A graph specialized for batch 1 (PyTorch's
    default) rounds its fused loops differently and fails this on the int4 kernel. Dense bf16
    linears run a 1-row step as two rows (on the bundled model the compiled 1-row linear rounds
    differently; this tiny one cannot show that, so the flag is checked), except where they are packed
    for our GEMM (layers/bf16_gemm.py), which computes each row alone: there the 1-row step runs as
    one row and must agree by itself. bf16, as served; fp32's
    dense GEMM agrees across no row counts (MKL), so it is not asked. Crossing the packed/dense
    crossover changes a row's kernel, hence its bits, by design (REPORT SD)."""
    llm = LLM(str(tiny_llama_dir), **{**COMPILED, "dtype": "bfloat16"}, quantization=quantization, block_size=4,
              num_kv_blocks=64, packed_max_rows=64)  # every step on the packed kernel: this is about graphs
    runner = llm.engine.runner
    on_ours = bf16_gemm.packed(llm.engine.model)
    assert runner.compiled is not None and runner.compiled.two_row_minimum == (quantization == "none" and not on_ours)
    ids = _prompts(llm.engine.model_config.vocab_size)[0][:21]
    plain = next_token_logits(runner, ids, [])
    for drafts, batch in (([], 2), (ids[3:6], 1), (ids[3:6], 2)):
        assert torch.equal(next_token_logits(runner, ids, drafts, batch), plain), (drafts, batch)


def test_a_step_no_graph_covers_runs_eager(tiny_llama_dir, restore_torch_threads, caplog):
    """A step of more rows than any compiled regime covers runs eager (same logits), with a warning,
    never an error."""
    from tinyserve.worker.compiled import CompiledDecode, decode_forward

    llm = LLM(str(tiny_llama_dir), **EAGER, quantization="int8", packed_max_rows=2, block_size=4, num_kv_blocks=16)
    runner, bs = llm.engine.runner, llm.engine.config.block_size
    step = CompiledDecode(llm.engine.model, bs, packed_max_rows=2, top=2)  # one regime, 1-2 rows, not loaded
    args = [torch.tensor([5, 6, 7]), torch.zeros(3, dtype=torch.long), runner.kv_caches,
            torch.zeros(3, dtype=torch.long), torch.zeros(3, 2, dtype=llm.engine.attention.index_dtype),
            torch.ones(3, dtype=llm.engine.attention.index_dtype)]
    with torch.inference_mode():
        got = step(*args)
        want = decode_forward(llm.engine.model, *args, bs)
    assert torch.equal(got, want)
    assert any("matches no compiled graph" in r.getMessage() for r in caplog.records)


def test_a_step_that_cannot_be_built_leaves_the_engine_eager(tiny_llama_dir, restore_torch_threads, monkeypatch,
                                                             tmp_path):
    """No compiler, an op that cannot be exported: the engine starts anyway, eager, says "failed", and
    answers as eager does."""
    from tinyserve.worker.compiled import CompiledDecode

    def cannot(*_a, **_k):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setenv("TINYSERVE_CACHE", str(tmp_path))  # nothing built there to load instead
    monkeypatch.setattr(CompiledDecode, "prepare", cannot)
    llm = LLM(str(tiny_llama_dir), **COMPILED, block_size=4, num_kv_blocks=32)
    assert llm.engine.runner.compiled is None and llm.engine.compiled_step == "failed"
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    eager = LLM(str(tiny_llama_dir), **EAGER, block_size=4, num_kv_blocks=32)
    prompt = _prompts(eager.engine.model_config.vocab_size)[0]
    got, want = (m.generate([prompt], params)[0].outputs[0].token_ids for m in (llm, eager))
    assert got == want


def test_int8_compute_runs_in_the_graph_above_the_crossover(tiny_llama_dir, restore_torch_threads, caplog,
                                                           monkeypatch):
    """--int8-compute: the compiled step's products above the crossover are int8 x int8 (an eager engine
    with the same products forced into its decode steps agrees as the int8 pool does: a value at a code's
    boundary may round the other way), eager steps keep the dense copy, and the int8 answers are not the
    dense ones. (As on a CPU with AMX: without, eager steps take the int8 copy too, the next test.)"""
    from tinyserve.layers.packed import PackedWeight

    monkeypatch.setattr(served_model, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    kw = dict(quantization="int8", packed_max_rows=2, block_size=4, num_kv_blocks=128)
    compiled = LLM(str(tiny_llama_dir), **{**COMPILED, **kw, "int8_compute": True})
    eager = LLM(str(tiny_llama_dir), **{**EAGER, **kw, "int8_compute": True})
    dense = LLM(str(tiny_llama_dir), **{**EAGER, **kw})
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=1, ignore_eos=True)
    prompts = _prompts(eager.engine.model_config.vocab_size)  # 4 decodes: above the crossover of 2
    plain = dense.generate(prompts, params)
    assert [o.outputs[0].logprobs for o in eager.generate(prompts, params)] == \
        [o.outputs[0].logprobs for o in plain]  # eager steps: the dense copy
    got = compiled.generate(prompts, params)
    _no_eager_fallback(caplog)
    int8 = [m for m in eager.engine.model.modules() if isinstance(m, PackedWeight) and m.dense_q is not None]
    assert {n.split(".")[-2] for n, m in eager.engine.model.named_modules() if m in int8} == \
        {"o_proj", "gate_up_proj"}  # "...o_proj.impl": the Linear's weight module
    real = eager.engine.runner.execute

    def execute(seqs, num_tokens):  # the decode steps on the int8 copies, as in the graph
        for w in int8:
            w.int8_active = all(n == 1 for n in num_tokens)
        return real(seqs, num_tokens)

    monkeypatch.setattr(eager.engine.runner, "execute", execute)
    _assert_agree(eager.generate(prompts, params), got, kv_cache_dtype="int8")
    moved = [abs(a.outputs[0].logprobs[i][t].logprob - b.outputs[0].logprobs[i][t].logprob)
             for a, b in zip(plain, got) for i, t in enumerate(a.outputs[0].token_ids[:4])
             if t in b.outputs[0].logprobs[i]]
    assert max(moved) > 1e-4, "the graph's products were not the int8 ones"


def test_int8_compute_without_amx_takes_eager_steps_to_the_int8_copy(tiny_llama_dir, restore_torch_threads,
                                                                      monkeypatch):
    """On a CPU without AMX, --int8-compute multiplies eager steps above the crossover (prefills) on the int8
    copy as well: their products are those of an engine whose int8 copies are switched on by hand, not the
    dense ones."""
    from tinyserve.layers.packed import INT8_CHUNK_ROWS, PackedWeight

    # no prefix cache: the second engine's prompts run twice, and must be computed again the second time
    kw = dict(quantization="int8", packed_max_rows=2, block_size=4, num_kv_blocks=128, enable_prefix_caching=False)
    params = SamplingParams(temperature=0, max_tokens=4, logprobs=1, ignore_eos=True)
    monkeypatch.setattr(served_model, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    no_amx = LLM(str(tiny_llama_dir), **{**EAGER, **kw, "int8_compute": True})
    int8 = [m for m in no_amx.engine.model.modules() if isinstance(m, PackedWeight) and m.dense_q is not None]
    assert int8 and all(w.int8_active and w.int8_chunk_rows == INT8_CHUNK_ROWS for w in int8)
    monkeypatch.setattr(served_model, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    amx = LLM(str(tiny_llama_dir), **{**EAGER, **kw, "int8_compute": True})
    by_hand = [m for m in amx.engine.model.modules() if isinstance(m, PackedWeight) and m.dense_q is not None]
    assert not any(w.int8_active for w in by_hand)
    prompts = _prompts(no_amx.engine.model_config.vocab_size)
    dense = amx.generate(prompts, params)
    for w in by_hand:
        w.int8_active = True
    got, want = no_amx.generate(prompts, params), amx.generate(prompts, params)
    assert [o.outputs[0].logprobs for o in got] == [o.outputs[0].logprobs for o in want]
    assert [o.outputs[0].logprobs for o in got] != [o.outputs[0].logprobs for o in dense]
