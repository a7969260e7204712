"""`AsyncEngine` on a tiny random checkpoint (fast): the thread boundary, aborts, errors, queue bounds,
and the pure wire-format helpers. The real-model, real-process tests are in test_server.py."""

from __future__ import annotations

import asyncio

import pytest

from tinyserve.config import EngineConfig
from tinyserve.engine.async_engine import AsyncEngine, EngineDeadError, QueueFullError
from tinyserve.engine.llm_engine import LLMEngine
from tinyserve.engine.sequence import TokenLogprobs
from tinyserve.sampling import SamplingParams
from tinyserve.server import openai_format as fmt
from tinyserve.server.protocol import ChatCompletionRequest, CompletionRequest
from tinyserve.tokenizer import TokenText


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    return LLMEngine(EngineConfig(model=str(tiny_llama_dir), dtype="float32", enforce_eager=True, num_kv_blocks=512,
                                  block_size=4, max_num_seqs=4, max_waiting=4))


@pytest.fixture
def aengine(engine):
    ae = AsyncEngine(engine)
    ae.start()
    yield ae
    ae.stop()
    assert engine.blocks.usage == 0.0 and not engine.requests  # nothing leaks past a stop


def run(coro):
    return asyncio.run(coro)


def test_stream_matches_offline_greedy(engine, aengine):
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    prompt = [5, 6, 7, 8]

    async def go():
        text, tokens, last = "", [], None
        async for update in aengine.generate("a", prompt, params):
            for d in update.deltas:
                text += d.text
                tokens += d.token_ids
            last = update
        return text, tokens, last

    text, tokens, last = run(go())
    assert last.finished and last.deltas[-1].finish_reason == "length"
    assert last.num_prompt_tokens == 4 and last.first_token_time <= last.finish_time
    assert len(tokens) == 10
    # the same engine, driven synchronously once the thread is gone, gives the same tokens
    aengine.stop()
    seq = engine.add_request("b", prompt, params)[0]
    while not seq.finished:
        engine.step()
    assert seq.output_token_ids == tokens and seq.output_text == text
    engine.pop_output("b")


def test_validation_errors_reach_the_caller(aengine):
    async def go():
        sink: asyncio.Queue = asyncio.Queue()
        with pytest.raises(ValueError, match="prompt"):
            await aengine.add_request("bad", [], SamplingParams(), sink)
        with pytest.raises(ValueError, match="out of range"):
            await aengine.add_request("bad2", [10**9], SamplingParams(), sink)
        # the loop is still alive
        added = await aengine.add_request("ok", [1, 2, 3], SamplingParams(max_tokens=2), sink)
        assert added.prompt_token_ids == [1, 2, 3]
        while not (await sink.get()).finished:
            pass

    run(go())


def test_abort_frees_blocks_at_once(engine, aengine):
    async def go():
        sink: asyncio.Queue = asyncio.Queue()
        await aengine.add_request("long", [1, 2, 3], SamplingParams(max_tokens=200, ignore_eos=True), sink)
        first = await sink.get()
        assert first.deltas and not first.finished
        aengine.abort("long")
        while not (update := await sink.get()).finished:
            pass
        assert update.deltas[-1].finish_reason == "abort"
        for _ in range(100):  # stats are published right after the abort is handled
            if aengine.stats.kv_usage == 0.0 and aengine.stats.running == 0:
                break
            await asyncio.sleep(0.01)
        assert aengine.stats.kv_usage == 0.0 and aengine.stats.running == 0

    run(go())


def test_queue_full_is_an_exception(aengine):
    async def go():
        sink: asyncio.Queue = asyncio.Queue()
        p = SamplingParams(max_tokens=200, ignore_eos=True)
        # n=4 fills the 4 running slots; 4 more wait; the next one finds the queue full
        await aengine.add_request("r", [1, 2], SamplingParams(n=4, max_tokens=200, ignore_eos=True), sink)
        await sink.get()
        for i in range(4):
            await aengine.add_request(f"w{i}", [1, 2], p, sink)
        with pytest.raises(QueueFullError):
            await aengine.add_request("x", [1, 2], p, sink)
        # stop() aborts everything in flight and tells every listener
        aengine.stop()
        finished = set()
        while len(finished) < 5:
            u = await sink.get()
            if u.finished:
                finished.add(u.request_id)
        assert finished == {"r", "w0", "w1", "w2", "w3"}
        with pytest.raises(EngineDeadError):
            await aengine.add_request("late", [1], p, sink)

    run(go())


def test_step_failure_fails_requests_and_keeps_serving(engine, aengine, monkeypatch):
    calls = {"n": 0}
    real = engine.runner.execute

    def flaky(seqs, num_tokens):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return real(seqs, num_tokens)

    monkeypatch.setattr(engine.runner, "execute", flaky)

    async def go():
        sink: asyncio.Queue = asyncio.Queue()
        await aengine.add_request("fails", [1, 2, 3], SamplingParams(max_tokens=3), sink)
        u = await sink.get()
        assert u.finished and u.deltas[0].finish_reason == "error" and "boom" in u.deltas[0].error
        await aengine.add_request("works", [1, 2, 3], SamplingParams(max_tokens=3, ignore_eos=True), sink)
        while not (u := await sink.get()).finished:
            pass
        assert u.deltas[-1].finish_reason == "length"

    run(go())


# -- wire format -----------------------------------------------------------------------------------


def test_params_and_errors_name_the_field():
    from pydantic import ValidationError

    msgs = [{"role": "user", "content": "x"}]
    # Simple ranges are the schema's (so the OpenAPI document shows them): the 400 comes from validation.
    cases = [(CompletionRequest, dict(prompt="x", max_tokens=0), "max_tokens"),
             (CompletionRequest, dict(prompt="x", temperature=2.5), "temperature"),
             (ChatCompletionRequest, dict(messages=msgs, max_completion_tokens=-1), "max_completion_tokens")]
    for model, kw, name in cases:
        with pytest.raises(ValidationError) as v:
            model(**kw)
        assert v.value.errors()[0]["loc"] == (name,)
    # What depends on several fields is SamplingParams', still a 400 naming the field.
    with pytest.raises(fmt.ApiError) as e:
        fmt.completion_params(CompletionRequest(prompt="x", max_tokens=4, min_tokens=5))
    assert e.value.status == 400 and e.value.param == "min_tokens"
    with pytest.raises(fmt.ApiError) as e:
        fmt.chat_params(ChatCompletionRequest(messages=msgs, max_completion_tokens=4, min_tokens=5))
    assert e.value.param == "min_tokens"
    p = fmt.chat_params(ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], max_completion_tokens=7,
                                              logprobs=True, top_logprobs=3, top_k=5, seed=1, stop="\n"))
    assert (p.max_tokens, p.logprobs, p.top_k, p.seed, p.stop_strings) == (7, 3, 5, 1, ("\n",))
    assert fmt.chat_params(ChatCompletionRequest(messages=[{"role": "user", "content": "x"}])).max_tokens is None
    assert fmt.completion_params(CompletionRequest(prompt="x")).max_tokens == 16


def test_prompt_forms():
    assert fmt.completion_prompts("a") == ["a"]
    assert fmt.completion_prompts(["a", "b"]) == ["a", "b"]
    assert fmt.completion_prompts([1, 2]) == [[1, 2]]
    assert fmt.completion_prompts([[1], [2, 3]]) == [[1], [2, 3]]
    with pytest.raises(fmt.ApiError):
        fmt.completion_prompts([])


def test_logprob_shapes():
    names = {1: "Hello", 2: " world", 3: "!"}

    class Tok:
        def decode(self, ids, skip_special_tokens=False):
            return "".join(names[i] for i in ids)

    text = TokenText(Tok())
    lps = [TokenLogprobs(1, -0.5, 1, [(1, -0.5), (3, -2.0)]), TokenLogprobs(2, -float("inf"), 9, [(3, -0.1)])]
    legacy, end = fmt.completion_logprobs(lps, text, 10)
    assert legacy.tokens == ["Hello", " world"] and legacy.text_offset == [10, 15] and end == 21
    assert legacy.token_logprobs == [-0.5, -9999.0]  # JSON has no -inf
    assert legacy.top_logprobs[1] == {"!": -0.1, " world": -9999.0}
    chat = fmt.chat_logprobs(lps, text)
    assert [c.token for c in chat.content] == ["Hello", " world"]
    assert chat.content[0].bytes == list(b"Hello") and [t.token for t in chat.content[0].top_logprobs] == ["Hello", "!"]


def test_serve_subcommand_flags():
    """`tinyserve serve` parses the server's and the engine's flags (vLLM's spelling)."""
    import argparse

    from tinyserve.engine_args import engine_config
    from tinyserve.server import add_serve_args

    p = argparse.ArgumentParser()
    add_serve_args(p)
    args = p.parse_args(["--port", "9001", "--served-model-name", "a", "b", "--max-num-seqs", "3",
                         "--max-waiting", "5", "--dtype", "bfloat16", "--kv-cache-memory-gb", "0.5"])
    assert (args.host, args.port, args.served_model_name) == ("127.0.0.1", 9001, ["a", "b"])
    cfg = engine_config(args)
    assert (cfg.max_num_seqs, cfg.max_waiting, cfg.dtype, cfg.kv_cache_memory_gb) == (3, 5, "bfloat16", 0.5)
    from tinyserve.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    assert e.value.code == 0


def test_engine_flags_generated_from_engine_config():
    """Every EngineConfig knob is a flag with the field's default (and nothing else is); an instrument's
    subset keeps its own defaults and fills the rest from EngineConfig."""
    import argparse
    import dataclasses

    from tinyserve.engine_args import add_engine_args, engine_config
    from tinyserve_lab.offline import add_offline_args

    p = argparse.ArgumentParser()
    add_engine_args(p)
    args = p.parse_args([])
    knobs = [f for f in dataclasses.fields(EngineConfig) if f.init]
    assert vars(args) == {f.name: f.default for f in knobs}  # torch_dtype is derived, not a flag
    assert engine_config(p.parse_args(["--dtype", "fp32", "--quantization", "int8"])).quantization == "int8"
    with pytest.raises(SystemExit):
        p.parse_args(["--quant-group-size", "48"])

    p = argparse.ArgumentParser()
    add_offline_args(p)
    cfg = engine_config(p.parse_args(["--max-num-batched-tokens", "256"]), max_num_seqs=2)
    assert (cfg.dtype, cfg.max_num_batched_tokens, cfg.max_num_seqs, cfg.block_size) == ("float32", 256, 2, 16)
