"""Prefix caching and priority through the real server (bundled model, fp32) and the openai client:
a repeated system prompt is reported in `usage.prompt_tokens_details.cached_tokens`, the text is the
same as cold, the Prometheus counters move, and `priority` is honoured or refused with a 400."""

from __future__ import annotations

import httpx
import pytest

openai = pytest.importorskip("openai")

from tinyserve_lab.launcher import ServerProcess  # noqa: E402  (after the openai importorskip)

from conftest import server_metric, wait_server_idle  # noqa: E402

pytestmark = pytest.mark.slow

SYSTEM = ("You are a meticulous assistant for an inference-engine team. Answer in one short sentence, "
          "cite no sources, and never apologise. The team measures time to first token, time per output "
          "token and throughput, and cares about the tail latency of short requests.")


@pytest.fixture(scope="module")
def server():
    with ServerProcess(["--served-model-name", "smol", "--dtype", "float32", "--enforce-eager",
                        "--kv-cache-memory-gb", "0.25", "--scheduling-policy", "priority"]) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def counter(server, name: str) -> float:
    lines = httpx.get(server.url + "/metrics", timeout=10).text.splitlines()
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines if ln.startswith(name + "_total{"))


def test_repeated_system_prompt_is_cached_and_answers_the_same(server, client):
    def ask(question: str, priority: int = 0):
        return client.chat.completions.create(
            model="smol", max_tokens=12, temperature=0, extra_body={"priority": priority},
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}])

    q0, h0 = counter(server, "tinyserve_prefix_cache_queries"), counter(server, "tinyserve_prefix_cache_hits")
    cold = ask("What is TTFT?")
    warm = ask("What is TTFT?", priority=-3)
    other = ask("What is TPOT?", priority=7)
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    n = cold.usage.prompt_tokens
    # Everything but the block holding the last prompt token (16-token blocks).
    assert warm.usage.prompt_tokens_details.cached_tokens == (n - 1) // 16 * 16 > 0
    assert warm.choices[0].message.content == cold.choices[0].message.content
    assert 0 < other.usage.prompt_tokens_details.cached_tokens < n  # the system prompt, not the question
    hits = counter(server, "tinyserve_prefix_cache_hits") - h0
    assert counter(server, "tinyserve_prefix_cache_queries") - q0 == 2 * n + other.usage.prompt_tokens
    assert hits == warm.usage.prompt_tokens_details.cached_tokens + other.usage.prompt_tokens_details.cached_tokens


def test_completions_report_cached_tokens_per_prompt(client):
    prompt = "The history of paged attention begins with virtual memory in operating systems, where " * 3
    first = client.completions.create(model="smol", prompt=prompt, max_tokens=4, temperature=0)
    both = client.completions.create(model="smol", prompt=[prompt, prompt], max_tokens=4, temperature=0)
    assert first.usage.prompt_tokens_details is not None
    n = first.usage.prompt_tokens
    assert both.usage.prompt_tokens_details.cached_tokens == 2 * ((n - 1) // 16 * 16)
    assert both.choices[0].text == both.choices[1].text == first.choices[0].text


def test_bad_priority_is_a_400(server):
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2, "priority": "high"},
                   timeout=30)
    assert r.status_code == 400 and "priority" in r.text


def test_the_disk_tier_serves_the_prefix_after_a_restart(tmp_path):
    """A server computes a system prompt, exits on SIGTERM, and a new server over the same
    --kv-offload-path loads that prefix from disk: cached_tokens says so, the answer is the same, and the
    tier's counters moved."""
    args = ["--served-model-name", "smol", "--dtype", "float32", "--enforce-eager", "--kv-cache-memory-gb", "0.25",
            "--kv-offload-path", str(tmp_path)]
    messages = [{"role": "system", "content": SYSTEM * 3}, {"role": "user", "content": "What is TTFT?"}]

    def ask(srv: ServerProcess):
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        return client.chat.completions.create(model="smol", max_tokens=12, temperature=0, messages=messages)

    with ServerProcess(args) as first:
        cold = ask(first)
        wait_server_idle(first.url)  # the counters are published after the step that finished it
        disk_out = 'direction="out",model_name="smol",tier="disk"'  # prometheus sorts the labels
        assert server_metric(first.url, "tinyserve_kv_tier_blocks_total", disk_out) > 0
        assert first.terminate() == 0  # a clean exit: the queued writes landed
    with ServerProcess(args) as second:
        warm = ask(second)
        wait_server_idle(second.url)
        n = cold.usage.prompt_tokens
        assert cold.usage.prompt_tokens_details.cached_tokens == 0
        assert warm.usage.prompt_tokens_details.cached_tokens == (n - 1) // 16 * 16 > 0
        assert warm.choices[0].message.content == cold.choices[0].message.content
        assert server_metric(second.url, "tinyserve_kv_tier_blocks_total",
                             'direction="in",model_name="smol",tier="disk"') == (n - 1) // 16
