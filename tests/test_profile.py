"""`tinyserve profile`'s step timer wraps the engine's live step phases without changing what they do."""

from __future__ import annotations

from tinyserve import LLM, SamplingParams
from tinyserve_lab.profile import PARTS, StepTimer


def test_step_timer_times_every_phase_and_generation_still_works(tiny_llama_dir, restore_torch_threads):
    llm = LLM(str(tiny_llama_dir), dtype="float32", enforce_eager=True, block_size=4, num_kv_blocks=64)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    before = llm.generate(["hello world"], params)[0].outputs[0].token_ids
    timer = StepTimer(llm.engine)
    after = llm.generate(["hello world"], params)[0].outputs[0]
    assert after.token_ids == before and after.finish_reason == "length"
    assert set(timer.totals) == set(PARTS) and all(t > 0 for t in timer.totals.values())
