"""End-to-end on the real bundled SmolLM2: greedy equals transformers, batch invariance, no leaks."""

from __future__ import annotations

import random

import pytest
import torch

from tinyserve import SamplingParams
from tinyserve.models.loader import bundled_gguf_path

pytestmark = pytest.mark.slow

PLAIN = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "The three primary colors are",
]
CHATS = [
    [{"role": "user", "content": "What is the boiling point of water?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name two planets."}],
]


@pytest.fixture(scope="module")
def hf_smollm():
    from transformers import AutoModelForCausalLM

    path = bundled_gguf_path()
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, torch_dtype=torch.float32).eval()


def test_greedy_matches_transformers_generate(bundled_llm, hf_smollm):
    tok = bundled_llm.tokenizer
    prompts = [tok.encode(p) for p in PLAIN] + [tok.apply_chat_template(c) for c in CHATS]
    outs = bundled_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=48))
    for ids, out in zip(prompts, outs):
        with torch.inference_mode():
            ref = hf_smollm.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False, eos_token_id=2,
                                     pad_token_id=2)[0, len(ids):].tolist()
        assert out.outputs[0].token_ids == ref, tok.decode(ids)
        assert out.outputs[0].finish_reason == ("stop" if ref[-1] == 2 else "length")
    assert sum(len(o.outputs[0].token_ids) for o in outs) >= 5 * 48 * 0.5  # mostly long continuations


def _mixed_prompts(tok, n: int) -> list[list[int]]:
    rng = random.Random(0)
    text = " ".join(PLAIN * 40)
    base = tok.encode(text)
    lengths = [1, 2, 3, 5, 9, 17, 33, 64, 100, 150, 200, 257, 300, 350, 400] + [rng.randint(1, 400) for _ in range(n)]
    return [base[rng.randint(0, 50) :][:length] for length in lengths[:n]]


def test_batch_invariance_with_staggered_arrival_and_preemption(bundled_llm):
    """24 prompts (1 to 400 tokens) arriving over time into a pool far too small for all of them:
    each greedy output equals the same prompt generated alone (by a default engine)."""
    from tinyserve import LLM

    prompts = _mixed_prompts(bundled_llm.tokenizer, 24)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    solo = [bundled_llm.generate([p], params)[0].outputs[0].token_ids for p in prompts]

    # 40 blocks of 16 tokens = 640 tokens of KV for ~4.8k tokens of demand; small prefill chunks.
    engine = LLM(dtype="float32", num_kv_blocks=40, max_num_batched_tokens=128, enforce_eager=True).engine
    pending = list(enumerate(prompts))
    preemptions = step = 0
    while pending or engine.has_unfinished():
        if pending and step % 3 == 0:  # staggered arrival: a new request every 3 steps
            i, p = pending.pop(0)
            engine.add_request(f"inv-{i}", p, params)
        for seq in engine.step():
            preemptions = max(preemptions, seq.num_preemptions)
        step += 1
    outs = {i: engine.pop_output(f"inv-{i}") for i in range(len(prompts))}
    assert engine.blocks.num_free == 40, "blocks leaked"
    assert preemptions > 0, "the pool was meant to be small enough to force preemption"
    for i, p in enumerate(prompts):
        assert outs[i].outputs[0].token_ids == solo[i], f"prompt {i} ({len(p)} tokens) diverged"
