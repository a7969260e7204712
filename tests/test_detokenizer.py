"""The incremental detokenizer (UTF-8 safe, with the real SmolLM2 byte-level BPE vocabulary) and the
stop-string hold-back of `Sequence.visible_text()`."""

from __future__ import annotations

import random

import pytest

from tinyserve import LLM, SamplingParams
from tinyserve.engine.sequence import Sequence
from tinyserve.tokenizer import IncrementalDetokenizer, load_tokenizer

from conftest import TINY  # noqa: E402  (one engine thread for tiny models)

pytestmark = pytest.mark.usefixtures("restore_torch_threads")


TEXTS = [
    "Hello 👋🏽 世界! Café naïve — 🎉🎉 日本語のテキスト 🇫🇷 ok",
    "👨‍👩‍👧‍👦家族🙂",
    "数学：∑ᵢ xᵢ² ≥ 0 ✓ 한국어 텍스트 Ελληνικά עברית",
    "🎉",
    "plain ascii, nothing special\n\tindented",
]


@pytest.fixture(scope="module")
def tok():
    from tinyserve.models.loader import resolve_model

    return load_tokenizer(resolve_model(None))


def _stream(tok, prompt_ids, ids, skip=True):
    det = IncrementalDetokenizer(tok, prompt_ids, skip)
    return [det.step(t) for t in ids]


def test_the_texts_really_split_characters_across_tokens(tok):
    """Guard: the test data must exercise the hard case (a token that alone decodes to U+FFFD)."""
    ids = tok.encode(TEXTS[0], add_special_tokens=False)
    assert sum("\ufffd" in tok.decode([i]) for i in ids) >= 5
    # naive per-token decoding is broken; that is what the detokenizer fixes
    assert "\ufffd" in "".join(tok.decode([i]) for i in ids)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("prompt", [None, "Say something: ", "Emoji prompt 🎉 "])
def test_deltas_are_clean_and_concatenate_to_the_full_decode(tok, text, prompt):
    prompt_ids = tok.encode(prompt, add_special_tokens=False) if prompt else []
    ids = tok.encode(text, add_special_tokens=False)
    deltas = _stream(tok, prompt_ids, ids)
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == tok.decode(ids) == text
    # and the stream emitted something before the end (it is incremental, not all-at-once)
    if len(ids) > 3:
        assert sum(1 for d in deltas if d) > 1


def test_deltas_with_special_tokens(tok):
    ids = tok.encode(TEXTS[0], add_special_tokens=False)
    eos = tok.hf.convert_tokens_to_ids("<|im_end|>")
    ids = ids[:7] + [eos] + ids[7:] + [eos]
    assert "".join(_stream(tok, [], ids, skip=True)) == tok.decode(ids, skip_special_tokens=True)
    kept = "".join(_stream(tok, [], ids, skip=False))
    assert kept == tok.decode(ids, skip_special_tokens=False) and kept.endswith("<|im_end|>")


@pytest.mark.parametrize("seed", range(6))
def test_random_token_streams_are_prefix_consistent(tok, seed):
    """Arbitrary ids (byte fragments, stray continuation bytes, specials): what was emitted is always a
    prefix of the full decode, and all of it once the full decode ends on a complete character."""
    rng = random.Random(seed)
    pool = tok.encode("".join(TEXTS), add_special_tokens=False)
    ids = [rng.choice(pool) if rng.random() < 0.6 else rng.randrange(tok.vocab_size) for _ in range(80)]
    det = IncrementalDetokenizer(tok, [], True)
    emitted = ""
    for i, t in enumerate(ids):
        emitted += det.step(t)
        full = tok.decode(ids[: i + 1])
        assert full.startswith(emitted)
        if not full.endswith("\ufffd"):
            assert emitted == full


# -- visible_text: hold back what could still become a stop string ----------------------------
def _seq(stop, text, finished=False):
    s = Sequence(request_id="r", prompt=None, prompt_token_ids=[1], params=SamplingParams(stop=stop),
                 detokenizer=None, max_len=100)
    s.output_text = text
    if finished:
        s.finish("stop", "x")
    return s


def test_visible_text_holds_back_a_possible_stop_prefix():
    assert _seq(None, "hello wor").visible_text() == "hello wor"
    # longest stop is 3 chars: a 2-char tail could be its start ("wo" of "wor"), so it waits
    assert _seq(["wor", "x"], "hello wo").visible_text() == "hello "
    assert _seq(["wor", "x"], "he").visible_text() == ""
    assert _seq(["END"], "abc").visible_text() == "a"
    assert _seq(["!"], "abc").visible_text() == "abc"  # a 1-char stop string needs no hold-back
    assert _seq(["wor"], "hello wo", finished=True).visible_text() == "hello wo"  # finished: all of it


def test_streamed_visible_text_never_shows_what_a_stop_string_cuts(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), **TINY, num_kv_blocks=32, block_size=4)
    prompt = "Streaming test prompt"
    greedy = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0].outputs[0]
    det = IncrementalDetokenizer(llm.tokenizer, llm.engine.encode_prompt(prompt))
    deltas = [det.step(t) for t in greedy.token_ids]
    # a 5-char stop string starting 2 chars before a token boundary, late enough to stream first
    pos, stop, at = 0, None, None
    for i, d in enumerate(deltas[:-1]):
        pos += len(d)
        if i >= 4 and len(d) >= 2 and len(deltas[i + 1]) >= 3:
            cand = d[-2:] + deltas[i + 1][:3]
            if greedy.text.find(cand) == pos - 2:
                stop, at = cand, pos - 2
                break
    if stop is None:
        pytest.skip("no suitable stop string in this model's output")
    e = llm.engine
    (seq,) = e.add_request("s", prompt, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=stop))
    shown = []
    while e.has_unfinished():
        e.step()
        shown.append(seq.visible_text())
    final = e.pop_output("s").outputs[0]
    assert final.finish_reason == "stop" and final.text == greedy.text[:at]
    for a, b in zip(shown, shown[1:]):
        assert b.startswith(a)  # a stream only ever appends
    assert all(final.text.startswith(s) for s in shown)
    assert shown[-1] == final.text
    assert any(0 < len(s) < len(final.text) for s in shown)  # it did stream before the end
