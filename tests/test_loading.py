"""Model sources and dtypes: clear errors for what cannot be loaded, reduced precision that works."""

from __future__ import annotations

import pytest
import torch

from tinyserve import LLM, SamplingParams
from tinyserve.models.gguf import unpermute_qk
from tinyserve.models.loader import resolve_model


def test_unknown_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="Hugging Face hub"):
        resolve_model("no-such-org/no-such-model")


@pytest.mark.parametrize("bad", ["/does/not/exist", "./nothing-here", "not a model"])
def test_bad_model_path_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="model"):
        resolve_model(bad)


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        resolve_model(str(tmp_path))


def test_unpermute_inverts_llama_cpp_permutation():
    """llama.cpp's converter permutes Q/K rows per head; ours must undo exactly that."""
    n_head, head_dim, hidden = 3, 8, 5
    w = torch.randn(n_head * head_dim, hidden).numpy()
    permuted = w.reshape(n_head, 2, head_dim // 2, hidden).swapaxes(1, 2).reshape(w.shape)
    assert (unpermute_qk(permuted, n_head) == w).all()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_precision_tracks_float32(tiny_llama_dir, dtype):
    """Same weights in bf16/fp16: the first generated tokens' logprobs stay close to fp32's."""
    prompt = [list(range(200, 240))]
    params = SamplingParams(temperature=0, max_tokens=4, logprobs=3, ignore_eos=True)
    kw = dict(kv_cache_memory_gb=0.01, enforce_eager=True)
    ref = LLM(str(tiny_llama_dir), dtype="float32", **kw).generate(prompt, params)[0]
    low = LLM(str(tiny_llama_dir), dtype=dtype, **kw).generate(prompt, params)[0]
    tok = ref.outputs[0].token_ids[0]
    assert low.outputs[0].token_ids[0] == tok
    assert abs(low.outputs[0].logprobs[0][tok].logprob - ref.outputs[0].logprobs[0][tok].logprob) < 0.1
