"""Our forward equals transformers' on the same weights (fp32, tight tolerance)."""

from __future__ import annotations

import pytest
import torch

from tinyserve import LLM, SamplingParams
from tinyserve.attention.base import AttentionMetadata
from tinyserve.config import ModelConfig
from tinyserve.models.llama import rope_inv_freq
from tinyserve.models.loader import hf_config, load_model, resolve_model
from tinyserve.worker.runner import ModelRunner

from conftest import make_tiny_checkpoint, top_logprobs

CASES = [  # (arch, tied head, kv heads)
    ("llama", False, 2),
    ("llama", True, 4),
    ("llama", True, 1),
    ("qwen2", False, 2),
    ("qwen2", True, 4),
]


def _hf_model(path, arch):
    import transformers

    cls = transformers.LlamaForCausalLM if arch == "llama" else transformers.Qwen2ForCausalLM
    return cls.from_pretrained(path, torch_dtype=torch.float32).eval()


@pytest.mark.parametrize("arch,tie,kv_heads", CASES)
def test_prefill_logits_match_transformers(tmp_path, arch, tie, kv_heads):
    path = make_tiny_checkpoint(tmp_path, arch, tie=tie, num_key_value_heads=kv_heads, seed=kv_heads)
    src = resolve_model(str(path))
    cfg = hf_config(path, "tiny")
    assert cfg.attention_bias == (arch == "qwen2") and cfg.tie_word_embeddings == tie
    ours = load_model(src, cfg, 512, torch.float32, "cpu")
    runner = ModelRunner(ours, cfg, num_blocks=8, block_size=16, dtype=torch.float32, device="cpu")
    ids = torch.randint(0, cfg.vocab_size, (37,))
    meta = AttentionMetadata.fresh_prompt(37, "cpu")
    with torch.inference_mode():
        logits = ours.compute_logits(ours(ids, torch.arange(37), runner.kv_caches, meta))
        ref = _hf_model(path, arch)(ids[None]).logits[0]
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch,tie,kv_heads", CASES[::2])
def test_paged_decode_and_chunked_prefill_match_transformers(tmp_path, arch, tie, kv_heads):
    """Through the whole engine: chunked prefill + paged decode; every generated position's
    logprobs equal transformers' on the same token sequence."""
    path = make_tiny_checkpoint(tmp_path, arch, tie=tie, num_key_value_heads=kv_heads)
    llm = LLM(str(path), dtype="float32", block_size=4, max_num_batched_tokens=16, kv_cache_memory_gb=0.01,
              enforce_eager=True)
    prompts = [list(range(100, 150)), list(range(7, 12)), [5]]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, logprobs=5, ignore_eos=True))
    hf = _hf_model(path, arch)
    for prompt, out in zip(prompts, outs):
        gen = out.outputs[0].token_ids
        assert len(gen) == 12
        with torch.inference_mode():
            ref = hf(torch.tensor([prompt + gen])).logits[0].log_softmax(-1)
        for i, lp in enumerate(out.outputs[0].logprobs):
            row = ref[len(prompt) - 1 + i]
            assert gen[i] == int(row.argmax())
            top = top_logprobs(lp, 5)
            top_ids = [t for t, _ in top]
            assert top_ids == row.topk(5).indices.tolist()
            torch.testing.assert_close(torch.tensor([v for _, v in top]), row[top_ids], rtol=0, atol=1e-4)


def test_rope_scaling_variants_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    base = dict(vocab_size=10, hidden_size=256, intermediate_size=10, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=131072, rope_theta=500000.0)
    for scaling in (
        {"rope_type": "linear", "factor": 4.0},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 8192},
    ):
        hf_cfg = LlamaConfig(**base, rope_scaling=dict(scaling))
        ref, _ = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf_cfg, "cpu")
        ours = rope_inv_freq(ModelConfig.from_hf(hf_cfg.to_dict()))
        torch.testing.assert_close(ours, ref.float(), rtol=1e-6, atol=0)


def test_unsupported_rope_scaling_is_a_clear_error():
    cfg = ModelConfig(10, 8, 8, 1, 2, 2, 4, rope_scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="yarn"):
        rope_inv_freq(cfg)
