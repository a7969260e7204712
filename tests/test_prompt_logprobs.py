"""`prompt_logprobs` on a tiny random checkpoint: equal to transformers' log_softmax over the same prompt
(fp32) whatever the chunking and preemption, and served as vLLM serves them (echo + logprobs, the
`prompt_logprobs` extra) by the real server process."""

from __future__ import annotations

import httpx
import pytest
import torch

from tinyserve import LLM, SamplingParams
from tinyserve.engine.sequence import TokenLogprobs
from tinyserve.outputs import Logprob
from tinyserve.server import openai_format as fmt
from tinyserve.tokenizer import TokenText
from tinyserve_lab.launcher import ServerProcess

from conftest import TINY, top_logprobs  # noqa: E402  (one engine thread for tiny models)

pytestmark = pytest.mark.usefixtures("restore_torch_threads")

PROMPTS = [list(range(100, 137)), [7, 8, 9, 10, 11], [5, 900]]
GREEDY = dict(temperature=0, ignore_eos=True)
ATOL = 1e-4  # our logits equal transformers' to this in fp32 (test_model_reference.py)


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    """prompt -> transformers' fp32 log_softmax at every position of it."""
    import transformers

    hf = transformers.LlamaForCausalLM.from_pretrained(tiny_llama_dir, torch_dtype=torch.float32).eval()

    def ref(prompt: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return hf(torch.tensor([prompt])).logits[0].float().log_softmax(-1)

    return ref


def assert_matches(entries: list[dict[int, Logprob] | None], prompt: list[int], ref: torch.Tensor,
                   top_n: int) -> None:
    """vLLM's shape: one entry per prompt token, the first None; entry i maps prompt[i] (its logprob after
    prompt[:i] and its rank) and the top N to their Logprobs."""
    assert len(entries) == len(prompt) and entries[0] is None
    for i, entry in enumerate(entries[1:], 1):
        assert entry is not None
        row, own = ref[i - 1], entry[prompt[i]]
        assert own.logprob == pytest.approx(row[prompt[i]].item(), abs=ATOL)
        v = row[prompt[i]].item()  # its rank among transformers' logprobs, up to ties within ATOL
        assert int((row > v + ATOL).sum()) + 1 <= own.rank <= int((row >= v - ATOL).sum())
        top = top_logprobs(entry, top_n)
        top_ids = [t for t, _ in top]
        assert top_ids == row.topk(top_n).indices.tolist()
        torch.testing.assert_close(torch.tensor([v for _, v in top]), row[top_ids], rtol=0, atol=ATOL)


def test_prompt_logprobs_equal_transformers(tiny_llama_dir, reference):
    llm = LLM(str(tiny_llama_dir), **TINY, num_kv_blocks=64, block_size=4)
    plain = llm.generate(PROMPTS, SamplingParams(max_tokens=4, logprobs=2, **GREEDY))
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=4, logprobs=2, prompt_logprobs=5, **GREEDY))
    for prompt, out, before in zip(PROMPTS, outs, plain):
        assert_matches(out.prompt_logprobs, prompt, reference(prompt), 5)
        assert before.prompt_logprobs is None
        # scoring the prompt changes nothing about what is sampled or its logprobs
        assert out.outputs[0].token_ids == before.outputs[0].token_ids
        assert out.outputs[0].logprobs == before.outputs[0].logprobs
    only_own = llm.generate(PROMPTS[1], SamplingParams(max_tokens=1, prompt_logprobs=0))[0].prompt_logprobs
    assert [list(entry) for entry in only_own[1:]] == [[t] for t in PROMPTS[1][1:]]  # each token alone
    assert_matches(only_own, PROMPTS[1], reference(PROMPTS[1]), 0)


def test_chunked_prefill_gives_the_same(tiny_llama_dir, reference, monkeypatch):
    llm = LLM(str(tiny_llama_dir), **TINY, num_kv_blocks=64, block_size=4, max_num_batched_tokens=8)
    chunks = []
    real = llm.engine.scheduler.schedule

    def schedule():
        batch = real()
        chunks.extend(n for n in batch.num_tokens if n > 1)
        return batch

    monkeypatch.setattr(llm.engine.scheduler, "schedule", schedule)
    # one request scores its prompt, its batch neighbour does not
    params = [SamplingParams(max_tokens=3, prompt_logprobs=3, **GREEDY), SamplingParams(max_tokens=3, **GREEDY)]
    outs = llm.generate(PROMPTS[:2], params)
    assert len(chunks) > len(PROMPTS[0]) // 8  # the long prompt took several steps
    assert_matches(outs[0].prompt_logprobs, PROMPTS[0], reference(PROMPTS[0]), 3)
    assert outs[1].prompt_logprobs is None


def test_preempted_and_recomputed_prompts_are_scored_once(tiny_llama_dir, reference, monkeypatch):
    # 8 blocks of 4 = 32 tokens for three requests of 12 + 10 tokens: preemption is certain
    small = LLM(str(tiny_llama_dir), **TINY, num_kv_blocks=8, block_size=4)
    prompts = [list(range(200 + 20 * i, 212 + 20 * i)) for i in range(3)]
    scored_when_preempted = []
    real = small.engine.scheduler.schedule

    def schedule():
        batch = real()
        scored_when_preempted.extend(len(s.prompt_logprobs) for s in batch.preempted)
        return batch

    monkeypatch.setattr(small.engine.scheduler, "schedule", schedule)
    outs = small.generate(prompts, SamplingParams(max_tokens=10, prompt_logprobs=4, **GREEDY))
    assert any(scored_when_preempted)  # a sequence was preempted after its prompt was scored
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].finish_reason == "length"
        assert_matches(out.prompt_logprobs, prompt, reference(prompt), 4)


@pytest.mark.parametrize("bad", [-1, 21, 1.5])
def test_bad_values_name_the_field(bad):
    with pytest.raises(ValueError, match="^prompt_logprobs"):
        SamplingParams(prompt_logprobs=bad)


def test_wire_shapes():
    text = TokenText(type("Tok", (), {"decode": lambda self, ids, **_: {1: "a", 2: "b", 3: "c"}[ids[0]]})())
    lps = [None, TokenLogprobs(2, -1.5, 2, [(3, -0.5), (2, -1.5)]), TokenLogprobs(3, -float("inf"), 40, [(1, -0.1)])]
    legacy, end = fmt.completion_logprobs(lps, text, 0, [1, 2, 3])
    assert (legacy.tokens, legacy.text_offset, end) == (["a", "b", "c"], [0, 1, 2], 3)
    assert legacy.token_logprobs == [None, -1.5, -9999.0] and legacy.top_logprobs[0] is None
    vllm = fmt.prompt_logprobs(lps, text)
    assert vllm[0] is None
    assert {t: (e.logprob, e.rank, e.decoded_token) for t, e in vllm[1].items()} == {
        2: (-1.5, 2, "b"), 3: (-0.5, 1, "c")}
    assert {t: (e.logprob, e.rank) for t, e in vllm[2].items()} == {3: (-9999.0, 40), 1: (-0.1, 1)}


# -- the real server ------------------------------------------------------------------------------------
MODEL = "tiny"
TEXT = "The quick brown fox jumps over"
GREEDY_WIRE = dict(temperature=0, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with ServerProcess(["--model", str(tiny_llama_dir), "--served-model-name", MODEL, "--dtype", "float32",
                        "--enforce-eager", "--num-threads", "1", "--num-kv-blocks", "64", "--block-size", "4"]) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_server_echo_with_logprobs(client, server, tiny_llama_dir, reference):
    ids = httpx.post(server.url + "/tokenize", json={"prompt": TEXT}).json()["tokens"]
    plain = client.completions.create(model=MODEL, prompt=TEXT, max_tokens=4, logprobs=2, **GREEDY_WIRE).choices[0]
    c = client.completions.create(model=MODEL, prompt=TEXT, max_tokens=4, logprobs=2, echo=True,
                                  **GREEDY_WIRE).choices[0]
    lp, p = c.logprobs, len(ids)
    assert c.text == TEXT + plain.text
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == p + 4
    assert "".join(lp.tokens[:p]) == TEXT
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(p + 4)]
    # the prompt's logprobs first (the first token has none), then exactly the generated ones
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref = reference(ids)
    for i in range(1, p):
        assert lp.token_logprobs[i] == pytest.approx(ref[i - 1, ids[i]].item(), abs=ATOL)
        assert len(lp.top_logprobs[i]) in (2, 3) and lp.tokens[i] in lp.top_logprobs[i]
    assert lp.tokens[p:] == plain.logprobs.tokens and lp.token_logprobs[p:] == plain.logprobs.token_logprobs
    assert lp.text_offset[p:] == [o + len(TEXT) for o in plain.logprobs.text_offset]
    # vLLM's choice-level prompt_logprobs come along, and a stream says the same
    assert c.model_extra["prompt_logprobs"][0] is None and len(c.model_extra["prompt_logprobs"]) == p
    chunks = [ch.choices[0] for ch in client.completions.create(
        model=MODEL, prompt=TEXT, max_tokens=4, logprobs=2, echo=True, stream=True, **GREEDY_WIRE)]
    assert "".join(ch.text for ch in chunks) == c.text
    assert [t for ch in chunks if ch.logprobs for t in ch.logprobs.tokens] == lp.tokens
    assert [o for ch in chunks if ch.logprobs for o in ch.logprobs.text_offset] == lp.text_offset


def test_server_prompt_logprobs_extra(client):
    c = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=2, temperature=0,
                                  extra_body={"prompt_logprobs": 2}).choices[0]
    assert c.logprobs is None
    scored = c.model_extra["prompt_logprobs"]
    assert len(scored) == len(PROMPTS[1]) and scored[0] is None
    for token, entry in zip(PROMPTS[1][1:], scored[1:]):
        assert str(token) in entry and 2 <= len(entry) <= 3
        assert {1, 2} <= {e["rank"] for e in entry.values()}
        assert all(e["logprob"] <= 0 and isinstance(e["decoded_token"], str) for e in entry.values())
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=1).choices[0].model_extra.get(
        "prompt_logprobs") is None


@pytest.mark.parametrize("body,param", [
    ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ({"prompt_logprobs": -1}, "prompt_logprobs"),
    ({"prompt_logprobs": "2"}, "prompt_logprobs"),
    ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ({"echo": True, "logprobs": 21}, "logprobs"),
])
def test_server_bad_values_get_400(server, body, param):
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "hi", **body}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
