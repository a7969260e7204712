"""Shared fixtures: tiny random HF checkpoints (fast logic tests) and the real bundled model."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

# Tests share two cores with whatever else runs; oversubscription makes everything slower.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


# A tiny model gains nothing from a second thread, and on a shared 2-core machine one thread is many
# times faster than two fighting the neighbours. The engine sets torch's (process-wide) thread count,
# so modules that use TINY restore it afterwards with `restore_torch_threads`. fp32: the exact path,
# where the invariants (batch invariance, equality with transformers) hold bit for bit.
TINY = dict(num_threads=1, dtype="float32", enforce_eager=True)


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu",
                     help="where the tests that take the `device` fixture run (scripts/gpu_check.sh: cuda)")


def pytest_collection_modifyitems(config, items):
    """With --device other than cpu, only the tests that take it run (the rest ran on the CPU already, and
    need what a bare GPU image may lack: the bundled model's tokenizer)."""
    if config.getoption("--device") == "cpu":
        return
    skip = pytest.mark.skip(reason="not a device test (runs in the CPU suite)")
    for item in items:
        if "device" not in getattr(item, "fixturenames", ()):
            item.add_marker(skip)


@pytest.fixture
def device(request) -> str:
    """The device of the run (--device): tests taking it check on a GPU what they check here on a CPU."""
    return request.config.getoption("--device")


@pytest.fixture(scope="module")
def restore_torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def bundled_tokenizer_dir() -> Path:
    """The bundled model's vocabulary as tokenizer.json (converted once, cached)."""
    from tinyserve.models.loader import resolve_model
    from tinyserve.tokenizer import load_tokenizer

    tok = load_tokenizer(resolve_model(None))
    return Path(tok.hf.name_or_path)


def make_tiny_checkpoint(path: Path, arch: str = "llama", tie: bool = False, seed: int = 0, **overrides) -> Path:
    """A random-weight transformers checkpoint with real tokenizer files, saved as an HF directory."""
    import transformers

    torch.manual_seed(seed)
    common = dict(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=tie, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
    )
    common.update(overrides)
    if arch == "llama":
        cfg = transformers.LlamaConfig(rope_theta=10000.0, **common)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(rope_theta=10000.0, **common)
        model = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # default init is tiny; widen it so logits are far from ties
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(path)
    for f in bundled_tokenizer_dir().iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, path / f.name)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"), "llama", tie=False)


@pytest.fixture(scope="session")
def bundled_llm():
    """The real SmolLM2 in fp32, shared by the end-to-end tests."""
    from tinyserve import LLM

    return LLM(dtype="float32", enforce_eager=True)


def top_logprobs(entry: dict, n: int) -> list[tuple[int, float]]:
    """The top n of a vLLM-shaped logprobs entry (token id -> Logprob), most likely first: (token id, logprob)."""
    return [(t, lp.logprob) for t, lp in sorted(entry.items(), key=lambda kv: kv[1].rank) if lp.rank <= n]


def server_metric(url: str, name: str, label: str = "") -> float:
    """The sum of the Prometheus series `name` at url/metrics over its label sets that contain `label`."""
    import httpx

    total = 0.0
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        key = line.rsplit(" ", 1)[0]
        if key.split("{", 1)[0] == name and label in key:
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_server_idle(url: str, timeout: float = 30) -> None:
    """Until nothing runs or waits and every KV block is back in the pool (fails after `timeout`)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        vals = [server_metric(url, n) for n in ("tinyserve_requests_running", "tinyserve_requests_waiting",
                                                "tinyserve_kv_cache_usage_ratio")]
        if vals == [0, 0, 0]:
            return
        assert time.monotonic() < deadline, vals
        time.sleep(0.2)


def assert_same_under_preemption(engine, prompts: list[str], params, want: list[list[int]]) -> list:
    """Run `prompts` and two of them again on `engine` (a pool too small for them all): the greedy
    tokens must equal `want` (theirs alone) although sequences were preempted. Returns the sequences."""
    seqs = [s for i, p in enumerate(prompts + prompts[:2]) for s in engine.add_request(f"r{i}", p, params)]
    while engine.has_unfinished():
        engine.step()
    assert [s.output_token_ids for s in seqs] == want + want[:2]
    assert sum(s.num_preemptions for s in seqs) > 0, "the pool was meant to force preemption"
    return seqs
