"""Replicas on Ray Serve: the router's pieces alone, then a real `tinyserve serve --data-parallel-size 2`.

The service test starts a local Ray cluster (127.0.0.1) with two replicas of the bundled model behind
one ingress, serves the official `openai` client (streamed and not), keeps a conversation on the replica
that cached it, and loses a replica under load: every request that had not started streaming still
succeeds, and Ray brings the replica back.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import psutil
import pytest

from tinyserve.server.replicas.routers import CHUNK, chunk_hashes
from tinyserve.server.replicas.service import prompt_text

MODEL = "SmolLM2-135M-Instruct"


def test_chunk_hashes_name_prefixes():
    a = "x" * CHUNK + "y" * CHUNK + "tail"
    b = "x" * CHUNK + "z" * CHUNK
    ha, hb = chunk_hashes(a), chunk_hashes(b)
    assert len(ha) == 2 and ha[0] == hb[0] and ha[1] != hb[1]  # the tail is not a whole chunk
    assert chunk_hashes("y" * CHUNK + "x" * CHUNK)[1] != ha[1]  # a chunk's hash covers what precedes it
    assert chunk_hashes("short") == []


def test_prompt_text_is_what_the_cache_would_start_with():
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}
    assert prompt_text(json.dumps(chat).encode()) == "Be brief.Hi"
    assert prompt_text(json.dumps({"prompt": "Once"}).encode()) == "Once"
    assert prompt_text(json.dumps({"prompt": ["a", "b"]}).encode()) == "a"
    assert prompt_text(b"not json") == "" and prompt_text(b"") == "" and prompt_text(b"[1]") == ""


def _replica_pids(server_pid: int) -> set[int]:
    """The Ray worker processes that host a tinyserve replica (their process title names it)."""
    out = set()
    for p in psutil.process_iter(["pid", "cmdline"]):
        if any("ServeReplica:tinyserve:Replica" in a for a in (p.info["cmdline"] or [])):
            out.add(p.info["pid"])
    return out


@pytest.mark.slow
def test_two_replicas_serve_route_by_prefix_and_survive_a_lost_replica():
    from openai import OpenAI

    from tinyserve_lab.launcher import ServerProcess

    args = ["--data-parallel-size", "2", "--router", "prefix", "--dtype", "float32", "--enforce-eager",
            "--max-model-len", "512", "--kv-cache-memory-gb", "0.1"]
    with ServerProcess(args, startup_timeout=240) as srv:
        assert srv.proc is not None
        client = OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0)
        assert r.choices[0].text and r.usage is not None and r.usage.completion_tokens == 8
        stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi!"}],
                                                max_tokens=8, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        bad = httpx.post(srv.url + "/v1/completions", json={"model": "nope", "prompt": "x"}, timeout=30)
        assert bad.status_code == 404 and bad.json()["error"]["code"] == "model_not_found"

        # A conversation's next turn goes where its history is cached: the prompt's prefix is found.
        system = "You are a helpful assistant who answers questions about the history of computing. " * 6
        messages = [{"role": "system", "content": system}, {"role": "user", "content": "Who built the ENIAC?"}]
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
        for turn in range(3):
            messages += [{"role": "assistant", "content": "I am not sure."},
                         {"role": "user", "content": f"Tell me more, part {turn}."}]
            r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
            assert r.usage is not None and r.usage.prompt_tokens_details is not None
            assert r.usage.prompt_tokens_details.cached_tokens >= 0.8 * r.usage.prompt_tokens - 32, r.usage

        # Lose a replica while 8 streams run: those that never got a byte are retried on the other.
        before = _replica_pids(srv.proc.pid)
        assert len(before) == 2
        results: list[str] = []

        def one(i: int) -> None:
            try:
                s = client.completions.create(model=MODEL, prompt=f"Story {i}: once upon a time", max_tokens=48,
                                              temperature=0, stream=True, extra_body={"ignore_eos": True})
                text = "".join(c.choices[0].text for c in s)
                results.append("ok" if text else "empty")
            except Exception as e:  # a stream cut off mid-answer: the error event, as the client sees it
                results.append(f"error: {type(e).__name__}")

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        psutil.Process(sorted(before)[0]).kill()
        for t in threads:
            t.join(120)
        assert len(results) == 8
        assert results.count("ok") >= 4, results  # at most the killed replica's started streams fail
        assert all(r == "ok" or r.startswith("error") for r in results)
        # Ray replaces the replica; the service answers throughout.
        deadline = time.monotonic() + 120
        while len(_replica_pids(srv.proc.pid) - before) < 1 and time.monotonic() < deadline:
            time.sleep(1)
        assert len(_replica_pids(srv.proc.pid) - before) == 1
        for i in range(4):
            r = client.completions.create(model=MODEL, prompt=f"After {i}", max_tokens=4, temperature=0)
            assert r.choices[0].text
        assert srv.terminate(timeout=90) == 0, srv.log_tail()
