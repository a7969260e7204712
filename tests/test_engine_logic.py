"""Engine logic on a tiny random model: stops, lengths, validation, leaks, failures, the block manager,
the scheduler's limits and chunked prefill, and chat."""

from __future__ import annotations

import json
import shutil

import pytest

from tinyserve import LLM, SamplingParams
from tinyserve.engine.scheduler import QueueFullError
from tinyserve.kv.block_manager import BlockManager
from tinyserve.tokenizer import IncrementalDetokenizer

from conftest import TINY  # noqa: E402  (one engine thread for tiny models)

pytestmark = pytest.mark.usefixtures("restore_torch_threads")


PROMPT = "The quick brown fox"
GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), **TINY, num_kv_blocks=64, block_size=4)


def _all_free(llm) -> bool:
    b = llm.engine.blocks
    return b.num_free == b.num_blocks and all(c == 0 for c in b.ref_counts)


def _idle(llm) -> bool:
    e = llm.engine
    return not e.scheduler.waiting and not e.scheduler.running and not e.requests and _all_free(llm)


_GREEDY_CACHE: dict = {}


def _greedy(llm, prompt=PROMPT, n=24):
    """The unconstrained greedy output (cached per engine: it is deterministic)."""
    key = (id(llm), prompt, n)
    if key not in _GREEDY_CACHE:
        out = llm.generate(prompt, SamplingParams(max_tokens=n, **GREEDY))[0].outputs[0]
        assert len(out.token_ids) == n and out.finish_reason == "length"
        _GREEDY_CACHE[key] = out
    return _GREEDY_CACHE[key]


def _deltas(llm, prompt, token_ids):
    """The text each generated token adds, exactly as the engine's detokenizer produces it."""
    det = IncrementalDetokenizer(llm.tokenizer, llm.engine.encode_prompt(prompt))
    return [det.step(t) for t in token_ids]


def _spy(llm, monkeypatch):
    """Record every scheduled batch: [(request_id, tokens fed, num_computed before)]."""
    batches = []
    real = llm.engine.runner.execute

    def spy(seqs, num_tokens):
        batches.append([(s.request_id, n, s.num_computed) for s, n in zip(seqs, num_tokens)])
        return real(seqs, num_tokens)

    monkeypatch.setattr(llm.engine.runner, "execute", spy)
    return batches


# -- stop conditions -------------------------------------------------------------------------
def test_max_tokens_gives_length(llm):
    out = llm.generate(PROMPT, SamplingParams(max_tokens=5, **GREEDY))[0]
    c = out.outputs[0]
    assert out.finished and len(c.token_ids) == 5 and c.finish_reason == "length" and c.stop_reason is None
    assert c.text == llm.tokenizer.decode(c.token_ids)
    assert _idle(llm)


def test_unbounded_max_tokens_stops_at_the_context(tiny_llama_dir):
    small = LLM(str(tiny_llama_dir), **TINY, num_kv_blocks=16, block_size=4, max_model_len=24)
    ids = small.engine.encode_prompt(PROMPT)
    c = small.generate(PROMPT, SamplingParams(max_tokens=None, **GREEDY))[0].outputs[0]
    assert c.finish_reason == "length" and len(ids) + len(c.token_ids) == 24
    assert _idle(small)


def test_stop_token_id(llm):
    greedy = _greedy(llm).token_ids
    k = next(i for i in range(3, 20) if greedy[i] not in greedy[:i])
    c = llm.generate(PROMPT, SamplingParams(max_tokens=24, stop_token_ids=[greedy[k], 3], **GREEDY))[0].outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == greedy[k]
    assert c.token_ids == greedy[: k + 1]
    assert _idle(llm)


def test_min_tokens_suppresses_stop_token_ids(llm):
    greedy = _greedy(llm).token_ids
    k = next(i for i in range(2, 20) if greedy[i] not in greedy[:i])
    sp = SamplingParams(max_tokens=12, min_tokens=k + 3, stop_token_ids=[greedy[k]], **GREEDY)
    c = llm.generate(PROMPT, sp)[0].outputs[0]
    assert len(c.token_ids) >= k + 3
    assert c.token_ids[:k] == greedy[:k]
    assert greedy[k] not in c.token_ids[: k + 3]
    assert c.finish_reason == "length" or (c.finish_reason == "stop" and c.token_ids[-1] == greedy[k])
    assert _idle(llm)


def _boundary_stop(llm, deltas, text, lo=2):
    """A 4-char stop string made of the last 2 chars of one token's text and the first 2 of the next's,
    occurring first exactly there. Returns (token index of its end, stop string, its offset in text)."""
    pos = 0
    for i, d in enumerate(deltas[:-1]):
        pos += len(d)
        nxt = deltas[i + 1]
        if i >= lo and len(d) >= 2 and len(nxt) >= 2:
            s = d[-2:] + nxt[:2]
            if text.find(s) == pos - 2:
                return i + 1, s, pos - 2
    pytest.skip("no token boundary with a unique 4-char stop string")


def test_stop_string_spanning_two_tokens_is_caught_and_truncated(llm):
    g = _greedy(llm)
    deltas = _deltas(llm, PROMPT, g.token_ids)
    assert "".join(deltas) == g.text
    end, stop, at = _boundary_stop(llm, deltas, g.text)
    sp = SamplingParams(max_tokens=24, stop=stop, **GREEDY)
    c = llm.generate(PROMPT, sp)[0].outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert c.token_ids == g.token_ids[: end + 1]  # generation ended on the token completing the string
    assert c.text == g.text[:at]
    sp = SamplingParams(max_tokens=24, stop=stop, include_stop_str_in_output=True, **GREEDY)
    c = llm.generate(PROMPT, sp)[0].outputs[0]
    assert c.text == g.text[: at + len(stop)] and c.text.endswith(stop)
    assert _idle(llm)


def test_earliest_of_several_stop_strings_wins(llm):
    g = _greedy(llm)
    deltas = _deltas(llm, PROMPT, g.token_ids)
    # a whole token's text (unique, at least 3 chars) late in the output, and a boundary string earlier
    end, early, at = _boundary_stop(llm, deltas, g.text, lo=1)
    late_idx = next((i for i in range(end + 2, len(deltas)) if len(deltas[i]) >= 3
                     and g.text.find(deltas[i]) == len("".join(deltas[:i]))), None)
    if late_idx is None:
        pytest.skip("no unique late token text")
    late = deltas[late_idx]
    c = llm.generate(PROMPT, SamplingParams(max_tokens=24, stop=[late, early], **GREEDY))[0].outputs[0]
    assert c.stop_reason == early and c.text == g.text[:at]
    c = llm.generate(PROMPT, SamplingParams(max_tokens=24, stop=[late], **GREEDY))[0].outputs[0]
    assert c.stop_reason == late and c.token_ids == g.token_ids[: late_idx + 1]
    assert c.text == "".join(deltas[:late_idx])


def test_min_tokens_defers_stop_strings(llm):
    g = _greedy(llm)
    deltas = _deltas(llm, PROMPT, g.token_ids)
    end, stop, at = _boundary_stop(llm, deltas, g.text)
    if g.text.find(stop, at + 1) != -1:
        pytest.skip("stop string occurs twice")
    c = llm.generate(PROMPT, SamplingParams(max_tokens=24, stop=stop, min_tokens=end + 2, **GREEDY))[0].outputs[0]
    assert c.finish_reason == "length" and c.token_ids == g.token_ids


@pytest.fixture(scope="module")
def eos_llm(tiny_llama_dir, tmp_path_factory, llm):
    """The same weights with the EOS id set to a token the model greedily emits at position 3."""
    greedy = _greedy(llm).token_ids
    k = next(i for i in range(3, 20) if greedy[i] not in greedy[:i])
    path = tmp_path_factory.mktemp("tiny-eos") / "m"
    shutil.copytree(tiny_llama_dir, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["eos_token_id"] = greedy[k]
    (path / "config.json").write_text(json.dumps(cfg))
    eos = LLM(str(path), **TINY, num_kv_blocks=64, block_size=4)
    assert greedy[k] in eos.engine.tokenizer.eos_token_ids
    return eos, greedy, k


def test_eos_stops_with_no_stop_reason(eos_llm):
    eos, greedy, k = eos_llm
    c = eos.generate(PROMPT, SamplingParams(temperature=0, max_tokens=24))[0].outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason is None
    assert c.token_ids == greedy[: k + 1]
    assert _idle(eos)


def test_ignore_eos_continues_past_eos(eos_llm):
    eos, greedy, k = eos_llm
    c = eos.generate(PROMPT, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0].outputs[0]
    assert c.finish_reason == "length" and c.token_ids == greedy


def test_min_tokens_suppresses_eos(eos_llm):
    eos, greedy, k = eos_llm
    c = eos.generate(PROMPT, SamplingParams(temperature=0, max_tokens=24, min_tokens=k + 4))[0].outputs[0]
    assert len(c.token_ids) >= k + 4
    assert c.token_ids[:k] == greedy[:k] and c.token_ids[k] != greedy[k]
    assert greedy[k] not in c.token_ids[: k + 4]
    # sampled, too: EOS is banned for every draw, not only the argmax
    out = eos.generate(PROMPT, SamplingParams(n=8, temperature=1.0, top_k=2, seed=0, max_tokens=k + 4,
                                              min_tokens=k + 4))[0]
    for c in out.outputs:
        assert len(c.token_ids) == k + 4 and greedy[k] not in c.token_ids
    assert _idle(eos)


# -- bad input --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llm64(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), **TINY, num_kv_blocks=32, block_size=4, max_model_len=64)


@pytest.mark.parametrize(
    "make,field",
    [
        (lambda tok: ("", None), "prompt"),
        (lambda tok: ([], None), "prompt"),  # an empty token list
        (lambda tok: ("word " * 100, None), "prompt"),
        (lambda tok: (list(range(10, 74)), None), "prompt"),  # exactly the context: no room to generate
        (lambda tok: ([5, -1, 7], None), "prompt"),
        (lambda tok: ([5, tok.vocab_size, 7], None), "prompt"),
        (lambda tok: ([5, 10**9], None), "prompt"),
        (lambda tok: (PROMPT, dict(stop_token_ids=[tok.vocab_size])), "stop_token_ids"),
    ],
)
def test_bad_prompt_raises_and_engine_carries_on(llm64, make, field):
    reference = _greedy(llm64, n=6).token_ids
    prompt, extra = make(llm64.tokenizer)
    sp = SamplingParams(max_tokens=6, **GREEDY, **(extra or {}))
    with pytest.raises(ValueError, match=field):
        llm64.generate([prompt], sp)
    # a batch with one bad prompt queues nothing
    with pytest.raises(ValueError, match=field):
        llm64.generate([PROMPT, prompt], sp)
    assert _idle(llm64)
    again = llm64.generate([PROMPT, "other"], SamplingParams(max_tokens=6, **GREEDY))
    assert again[0].outputs[0].token_ids == reference
    assert _idle(llm64)


def test_longest_prompt_that_fits_generates_one_token(llm64):
    c = llm64.generate([list(range(10, 73))], SamplingParams(max_tokens=10, **GREEDY))[0].outputs[0]
    assert len(c.token_ids) == 1 and c.finish_reason == "length"


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=-3), "max_tokens"),
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(min_p=1.5), "min_p"),
        (dict(n=0), "n"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(presence_penalty=2.5), "presence_penalty"),
        (dict(frequency_penalty=-2.5), "frequency_penalty"),
        (dict(min_tokens=5, max_tokens=2), "min_tokens"),
        (dict(logprobs=21), "logprobs"),
        (dict(stop=[""]), "stop"),
        (dict(stop_token_ids=[-1]), "stop_token_ids"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        SamplingParams(**kwargs)


def test_mismatched_params_list_and_duplicate_request_id(llm):
    with pytest.raises(ValueError, match="sampling_params"):
        llm.generate([PROMPT, "x"], [SamplingParams()])
    llm.engine.add_request("dup", PROMPT, SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="request_id"):
        llm.engine.add_request("dup", PROMPT, SamplingParams(max_tokens=2))
    while llm.engine.has_unfinished():
        llm.engine.step()
    assert llm.engine.pop_output("dup").finished
    assert _idle(llm)


# -- no leaks -----------------------------------------------------------------------------------
def test_blocks_freed_after_length_stop_and_n(llm):
    g = _greedy(llm)
    llm.generate([PROMPT, "a b c d e f g", "x"], [
        SamplingParams(max_tokens=7, **GREEDY),
        SamplingParams(max_tokens=24, stop_token_ids=[g.token_ids[4]], **GREEDY),
        SamplingParams(n=3, max_tokens=5, temperature=1.0, seed=1),
    ])
    assert _idle(llm)


def test_abort_while_waiting_and_while_running(tiny_llama_dir):
    small = LLM(str(tiny_llama_dir), **TINY, num_kv_blocks=32, block_size=4, max_num_seqs=1)
    e = small.engine
    e.add_request("a", PROMPT, SamplingParams(max_tokens=20, **GREEDY))
    e.add_request("b", "second prompt here", SamplingParams(max_tokens=20, **GREEDY))
    for _ in range(4):
        e.step()
    (a,), (b,) = e.requests["a"], e.requests["b"]
    assert a.status.value == "running" and len(a.output_token_ids) == 4 and a.block_table
    assert b.status.value == "waiting"
    e.abort_request("b")  # while waiting
    assert e.pop_output("b").outputs[0].finish_reason == "abort"
    e.abort_request("a")  # mid-decode
    out = e.pop_output("a")
    assert out.finished and out.outputs[0].finish_reason == "abort" and len(out.outputs[0].token_ids) == 4
    assert not e.has_unfinished() and _idle(small)
    assert e.step() == []
    e.abort_request("nonexistent")  # a no-op
    assert small.generate(PROMPT, SamplingParams(max_tokens=3, **GREEDY))[0].outputs[0].finish_reason == "length"
    assert _idle(small)


def test_abort_one_sample_of_n_and_a_preempted_request(tiny_llama_dir):
    # 8 blocks of 4 = 32 tokens for three 20+-token requests: preemption is certain
    small = LLM(str(tiny_llama_dir), **TINY, num_kv_blocks=8, block_size=4)
    e = small.engine
    e.add_request("a", PROMPT, SamplingParams(max_tokens=20, **GREEDY))
    e.add_request("b", "another prompt", SamplingParams(n=2, max_tokens=20, temperature=1.0, seed=0))
    preempted = False
    for _ in range(60):
        e.step()
        if any(s.num_preemptions and s.status.value == "waiting" for s in e.requests["b"]):
            preempted = True
            break
    assert preempted
    e.abort_request("b")
    while e.has_unfinished():
        e.step()
    assert e.pop_output("a").outputs[0].finish_reason == "length"
    assert [c.finish_reason for c in e.pop_output("b").outputs] == ["abort", "abort"]
    assert _idle(small)


def test_preemption_keeps_greedy_outputs_and_frees_everything(tiny_llama_dir, llm, monkeypatch):
    prompts = [PROMPT, "a b c d e", "Hello there, friend"]
    reference = [o.outputs[0].token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=20, **GREEDY))]
    small = LLM(str(tiny_llama_dir), **TINY, num_kv_blocks=8, block_size=4)
    preemptions = []
    real = small.engine.scheduler.schedule

    def schedule():
        batch = real()
        preemptions.extend(batch.preempted)
        return batch

    monkeypatch.setattr(small.engine.scheduler, "schedule", schedule)
    outs = small.generate(prompts, SamplingParams(max_tokens=20, **GREEDY))
    assert preemptions
    assert [o.outputs[0].token_ids for o in outs] == reference
    assert _idle(small)


def test_step_failure_fails_that_batch_frees_blocks_and_engine_recovers(tiny_llama_dir, llm, monkeypatch):
    reference = {p: o.outputs[0].token_ids for p, o in zip(
        [PROMPT, "x y z"], llm.generate([PROMPT, "x y z"], SamplingParams(max_tokens=8, **GREEDY)))}
    small = LLM(str(tiny_llama_dir), **TINY, num_kv_blocks=32, block_size=4, max_num_seqs=1)
    real = small.engine.runner.execute
    calls = {"n": 0}

    def flaky(seqs, num_tokens):
        calls["n"] += 1
        if calls["n"] == 3:  # mid-decode of the first request; the second is still waiting
            raise RuntimeError("injected failure")
        return real(seqs, num_tokens)

    monkeypatch.setattr(small.engine.runner, "execute", flaky)
    outs = small.generate([PROMPT, "x y z"], SamplingParams(max_tokens=8, **GREEDY))
    first, second = outs[0].outputs[0], outs[1].outputs[0]
    assert first.finish_reason == "error" and len(first.token_ids) == 2
    assert second.finish_reason == "length" and second.token_ids == reference["x y z"]
    assert _idle(small)
    assert small.generate(PROMPT, SamplingParams(max_tokens=8, **GREEDY))[0].outputs[0].token_ids == reference[PROMPT]
    assert _idle(small)


def test_step_failure_error_is_recorded(tiny_llama_dir, monkeypatch):
    small = LLM(str(tiny_llama_dir), **TINY, num_kv_blocks=16, block_size=4)
    e = small.engine
    monkeypatch.setattr(e.runner, "execute", lambda seqs, num_tokens: (_ for _ in ()).throw(ValueError("boom")))
    seqs = e.add_request("r", PROMPT, SamplingParams(n=2, max_tokens=4, **GREEDY))
    done = e.step()
    assert set(done) == set(seqs) and all(s.finish_reason == "error" and "boom" in s.error for s in seqs)
    assert e.pop_output("r").finished and _idle(small)


# -- block manager ------------------------------------------------------------------------------
def test_block_manager_grow_share_release_refcounts():
    bm = BlockManager(num_blocks=6, block_size=4)
    a: list[int] = []
    assert bm.blocks_needed(a, 0) == 0 and bm.blocks_needed(a, 1) == 1 and bm.blocks_needed(a, 9) == 3
    bm.grow(a, 5)
    assert len(a) == 2 and bm.num_free == 4 and all(bm.ref_counts[b] == 1 for b in a)
    bm.grow(a, 8)  # still fits in two blocks
    assert len(a) == 2
    b: list[int] = []
    assert bm.can_take(list(a), 9)
    bm.take(b, list(a))  # b shares both blocks
    assert b == a and b is not a and all(bm.ref_counts[x] == 2 for x in a) and bm.num_free == 4
    bm.grow(b, 9)  # b alone gets a third block
    assert len(b) == 3 and bm.ref_counts[b[2]] == 1 and bm.num_free == 3
    shared = list(a)
    bm.release(a)
    assert a == [] and all(bm.ref_counts[x] == 1 for x in shared) and bm.num_free == 3  # still held by b
    assert not bm.can_grow([], 4 * 4) and bm.can_grow([], 4 * 3)
    bm.release(b)
    assert b == [] and bm.num_free == 6 and bm.ref_counts == [0] * 6 and bm.usage == 0.0
    with pytest.raises(AssertionError):
        bm.release(list(shared[:1]))  # a double release is caught


def test_block_manager_exhaustion():
    bm = BlockManager(num_blocks=3, block_size=2)
    t: list[int] = []
    bm.grow(t, 6)
    assert bm.num_free == 0 and bm.usage == 1.0 and sorted(t) == [0, 1, 2]
    assert bm.can_grow(t, 6) and not bm.can_grow(t, 7) and not bm.can_grow([], 1)
    bm.release(t)
    assert bm.num_free == 3


def test_queue_full(tiny_llama_dir):
    small = LLM(str(tiny_llama_dir), **TINY, num_kv_blocks=16, block_size=4, max_waiting=2)
    e = small.engine
    e.add_request("a", PROMPT, SamplingParams(max_tokens=2))
    e.add_request("b", PROMPT, SamplingParams(max_tokens=2))
    with pytest.raises(QueueFullError):
        e.add_request("c", PROMPT, SamplingParams(max_tokens=2))
    assert "c" not in e.requests
    e.abort_request("a")
    e.pop_output("a")
    with pytest.raises(QueueFullError):  # n=2 needs two slots; one is free
        e.add_request("d", PROMPT, SamplingParams(n=2, max_tokens=2))
    e.add_request("c", PROMPT, SamplingParams(max_tokens=2))
    while e.has_unfinished():
        e.step()
    e.pop_output("b"), e.pop_output("c")
    assert _idle(small)
    # LLM.generate feeds the bounded queue as it drains: more prompts than max_waiting is fine
    outs = small.generate([PROMPT] * 5, SamplingParams(max_tokens=2, **GREEDY))
    assert len(outs) == 5 and all(o.finished for o in outs)
    # but a request that can never fit the queue is refused up front instead of waiting forever
    with pytest.raises(ValueError, match=r"^n\b.*max_waiting"):
        small.generate(PROMPT, SamplingParams(n=3, max_tokens=2))
    with pytest.raises(ValueError, match=r"^n\b.*max_waiting"):
        e.add_request("e", PROMPT, SamplingParams(n=3, max_tokens=2))
    assert _idle(small)


# -- scheduler ----------------------------------------------------------------------------------
def test_max_num_seqs_and_token_budget_per_step(tiny_llama_dir, llm, monkeypatch):
    prompts = [PROMPT, "a b c d e f", "x", "Hello there, how are you today?", "one two"]
    reference = [o.outputs[0].token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=6, **GREEDY))]
    small = LLM(str(tiny_llama_dir), **TINY, num_kv_blocks=64, block_size=4, max_num_seqs=2, max_num_batched_tokens=5)
    batches = _spy(small, monkeypatch)
    outs = small.generate(prompts, SamplingParams(max_tokens=6, **GREEDY))
    assert [o.outputs[0].token_ids for o in outs] == reference
    assert all(len(b) <= 2 and sum(n for _, n, _ in b) <= 5 for b in batches)
    assert any(len(b) == 2 for b in batches) and any(sum(n for _, n, _ in b) == 5 for b in batches)
    assert _idle(small)


def test_chunked_prefill_spans_steps_and_decodes_go_first(tiny_llama_dir, llm, monkeypatch):
    long_prompt = list(range(1000, 1030))  # 30 tokens
    reference = [o.outputs[0].token_ids for o in
                 llm.generate(["hi", long_prompt], SamplingParams(max_tokens=10, **GREEDY))]
    small = LLM(str(tiny_llama_dir), **TINY, num_kv_blocks=64, block_size=4, max_num_batched_tokens=8)
    e = small.engine
    batches = _spy(small, monkeypatch)
    e.add_request("short", "hi", SamplingParams(max_tokens=10, **GREEDY))
    e.step()  # prefill of the short prompt
    assert len(e.requests["short"][0].output_token_ids) == 1
    e.add_request("long", long_prompt, SamplingParams(max_tokens=10, **GREEDY))
    (long_seq,) = e.requests["long"]
    chunks = []
    while not long_seq.output_token_ids:
        e.step()
        batch = batches[-1]
        assert batch[0][0] == "short" and batch[0][1] == 1  # the decode first, every step
        assert [rid for rid, _, _ in batch] == ["short", "long"]
        chunks.append(batch[1][1:])
    # the long prompt's prefill was split into budget-sized chunks at increasing offsets
    assert [n for n, _ in chunks] == [7, 7, 7, 7, 2]
    assert [c for _, c in chunks] == [0, 7, 14, 21, 28]
    while e.has_unfinished():
        e.step()
    assert e.pop_output("short").outputs[0].token_ids == reference[0]
    assert e.pop_output("long").outputs[0].token_ids == reference[1]
    assert _idle(small)


def test_prefill_alone_uses_the_whole_budget(tiny_llama_dir, monkeypatch):
    small = LLM(str(tiny_llama_dir), **TINY, num_kv_blocks=64, block_size=4, max_num_batched_tokens=8)
    batches = _spy(small, monkeypatch)
    small.generate([list(range(500, 530))], SamplingParams(max_tokens=2, **GREEDY))
    assert [b[0][1] for b in batches] == [8, 8, 8, 6, 1]


# -- chat ---------------------------------------------------------------------------------------
def test_chat_single_and_batch(llm):
    conv1 = [{"role": "user", "content": "Hi!"}]
    conv2 = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    sp = SamplingParams(max_tokens=5, **GREEDY)
    single = llm.chat(conv1, sp)
    assert len(single) == 1 and len(single[0].outputs[0].token_ids) == 5
    both = llm.chat([conv1, conv2], sp)
    assert len(both) == 2
    assert both[0].outputs[0].token_ids == single[0].outputs[0].token_ids
    ids = llm.tokenizer.apply_chat_template(conv2)
    assert both[1].prompt_token_ids == ids
    text = llm.tokenizer.decode(ids, skip_special_tokens=False)
    assert "What is 2+2?" in text and text.rstrip().endswith("assistant")  # the generation prompt
    assert both[1].outputs[0].token_ids == llm.generate([ids], sp)[0].outputs[0].token_ids
    assert _idle(llm)
