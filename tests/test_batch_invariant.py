"""`--batch-invariant`: a greedy request's tokens are the same alone and among 31 others.

The parts: the engine config (what the mode refuses, what it implies), the scheduler's fixed prefill
chunks, and the whole on a real server with the official openai client, where prompts longer than a
chunk are cut at the same positions under load as alone.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tinyserve.config import EngineConfig
from tinyserve.engine.scheduler import Scheduler
from tinyserve.engine.sequence import Sequence
from tinyserve.kv.block_manager import BlockManager
from tinyserve.sampling import SamplingParams


def test_config_refuses_what_would_break_it_and_sets_what_it_needs():
    with pytest.raises(ValueError, match="cannot speculate"):
        EngineConfig(batch_invariant=True, speculative_config='{"method": "ngram", "num_speculative_tokens": 2}')
    with pytest.raises(ValueError, match="packed_max_rows unset"):
        EngineConfig(batch_invariant=True, packed_max_rows=8)
    with pytest.raises(ValueError, match="int8_compute has no large steps"):
        EngineConfig(batch_invariant=True, int8_compute=True)
    with pytest.raises(ValueError, match="without its disk tier"):
        EngineConfig(batch_invariant=True, kv_offload_path="/tmp/unused")
    with pytest.raises(ValueError, match="raise max_num_batched_tokens above max_num_seqs"):
        EngineConfig(batch_invariant=True, max_num_batched_tokens=64, max_num_seqs=64)
    cfg = EngineConfig(batch_invariant=True, compile="background", max_num_batched_tokens=96, max_num_seqs=32)
    assert not cfg.enable_prefix_caching and cfg.compile == "blocking" and cfg.prefill_chunk == 64
    assert EngineConfig().prefill_chunk is None


def test_dense_models_are_refused(tiny_llama_dir, restore_torch_threads):
    from tinyserve import LLM

    with pytest.raises(ValueError, match="batch_invariant serves GGUF models"):
        LLM(str(tiny_llama_dir), dtype="float32", num_kv_blocks=8, max_num_seqs=4, max_num_batched_tokens=64,
            batch_invariant=True, enforce_eager=True)


def test_a_mixed_step_runs_its_decode_rows_on_the_compiled_graph(tiny_llama_dir, restore_torch_threads):
    """Eager and compiled steps round differently, so in the batch-invariant mode a step that mixes decode
    rows with a prefill chunk runs as two forwards: the decodes on the compiled graph (here a recording
    stand-in), the chunk eagerly; the tokens are those of one forward (fp32)."""
    from tinyserve import LLM
    from tinyserve.worker.compiled import decode_forward

    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    tokens = {}
    for split in (False, True):
        llm = LLM(str(tiny_llama_dir), dtype="float32", num_kv_blocks=64, block_size=4, enforce_eager=True,
                  max_num_batched_tokens=16)
        runner, e = llm.engine.runner, llm.engine
        rows: list[int] = []

        def compiled(input_ids, positions, kv_caches, slot_mapping, block_tables, context_lens, runner=runner,
                     rows=rows):
            rows.append(input_ids.shape[0])
            return decode_forward(runner.model, input_ids, positions, kv_caches, slot_mapping, block_tables,
                                  context_lens, runner.block_size)

        runner.compiled, runner.split_mixed_steps = compiled, split
        e.add_request("a", "The quick brown fox", greedy)
        e.step()  # a's prompt
        e.add_request("b", "a much longer prompt that takes two chunks of the sixteen token budget " * 2, greedy)
        e.step()  # a's decode beside b's first chunk
        assert rows == ([1] if split else [])
        while e.has_unfinished():
            e.step()
        tokens[split] = [e.pop_output(r).outputs[0].token_ids for r in "ab"]
    assert tokens[True] == tokens[False]


def _seq(i: int, n: int) -> Sequence:
    return Sequence(request_id=f"r{i}", prompt=None, prompt_token_ids=list(range(1, n + 1)),
                    params=SamplingParams(max_tokens=4), detokenizer=None,  # type: ignore[arg-type]
                    max_len=4096, arrival_time=float(i))


def test_fixed_prefill_chunks_wait_for_room_instead_of_shrinking():
    """Chunks of 8: a 20-token prompt is fed 8, 8, 4 whatever else runs; when a step's budget left is
    smaller than its next chunk it waits (the default scheduler would feed a smaller piece)."""
    sched = Scheduler(BlockManager(64, 4, False), max_num_seqs=4, max_num_batched_tokens=10, max_waiting=8,
                      prefill_chunk=8)
    long, short = _seq(0, 20), _seq(1, 5)
    sched.add([long, short])
    batch = sched.schedule()
    assert batch.num_tokens == [8]  # short (5) would not fit in the 2 left: it waits, long goes first
    long.num_computed += 8
    batch = sched.schedule()
    assert [s.request_id for s in batch.seqs] == ["r0"] and batch.num_tokens == [8]
    long.num_computed += 8
    batch = sched.schedule()
    assert batch.num_tokens == [4, 5]  # the rest of long, then short whole
    default = Scheduler(BlockManager(64, 4, False), max_num_seqs=4, max_num_batched_tokens=10, max_waiting=8)
    default.add([_seq(0, 20)])
    assert default.schedule().num_tokens == [10]


openai = pytest.importorskip("openai")


@pytest.mark.slow
def test_32_concurrent_greedy_requests_get_their_solo_tokens():
    """The bundled model in its default dtype, 32 chat requests at once (prompts of 20 to 200 tokens,
    chunks of 64: the long ones are cut in several steps, beside others' decodes), then each alone:
    every answer is the same token for token. Eager steps keep the test's start-up short (the compiled
    step is also invariant: docs/REPORT.md measures both)."""
    from tinyserve_lab.datasets import CHAT
    from tinyserve_lab.launcher import ServerProcess

    prompts = [(CHAT[i % len(CHAT)] + " Please explain." * (i * 3)) for i in range(32)]
    with ServerProcess(["--batch-invariant", "--enforce-eager", "--max-num-seqs", "32",
                        "--max-num-batched-tokens", "96"]) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        model = client.models.list().data[0].id

        def ask(prompt: str) -> tuple[str, str | None]:
            r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                               temperature=0, max_tokens=24)
            return r.choices[0].message.content or "", r.choices[0].finish_reason

        with ThreadPoolExecutor(32) as pool:
            together = list(pool.map(ask, prompts))
        alone = [ask(p) for p in prompts]
    assert all(text for text, _ in together)
    differ = [i for i in range(32) if together[i] != alone[i]]
    assert not differ, f"{len(differ)} changed under load, first: {together[differ[0]]!r} vs {alone[differ[0]]!r}"
