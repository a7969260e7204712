"""Overload and shutdown on a real server with tiny limits: one running sequence, two waiting.

The queue-full test checks the bounded queue answers 503 in OpenAI's shape and that nothing else
breaks; the SIGTERM test (last: it ends the module's server) checks a graceful exit with code 0.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from tinyserve_lab.launcher import ServerProcess

pytestmark = pytest.mark.slow

LONG = {"prompt": "Tell me a long story about the sea.", "max_tokens": 2000, "ignore_eos": True, "stream": True,
        "temperature": 0}


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess(["--enforce-eager", "--max-num-seqs", "1", "--max-waiting", "2", "--kv-cache-memory-gb", "0.25",
                         "--shutdown-timeout", "30"])
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def running_waiting(server) -> tuple[float, float]:
    vals = {}
    for line in httpx.get(server.url + "/metrics", timeout=10).text.splitlines():
        for name in ("tinyserve_requests_running", "tinyserve_requests_waiting"):
            if line.startswith(name + "{"):
                vals[name] = float(line.rsplit(" ", 1)[1])
    return vals["tinyserve_requests_running"], vals["tinyserve_requests_waiting"]


def test_full_queue_gets_503_and_nothing_else_breaks(server):
    url = server.url + "/v1/completions"
    with httpx.Client(timeout=60) as c1, httpx.Client(timeout=60) as c2, httpx.Client(timeout=60) as c3:
        streams = []
        try:
            # One request runs, two wait: the queue (max 2) is now full.
            for c in (c1, c2, c3):
                cm = c.stream("POST", url, json=LONG)
                r = cm.__enter__()
                streams.append(cm)
                assert r.status_code == 200, r.read()
            deadline = time.monotonic() + 30
            while running_waiting(server) != (1, 2):
                assert time.monotonic() < deadline, running_waiting(server)
                time.sleep(0.1)
            for endpoint, body in [(url, {"prompt": "hi", "max_tokens": 2}),
                                   (server.url + "/v1/chat/completions",
                                    {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})]:
                r = httpx.post(endpoint, json=body, timeout=30)
                assert r.status_code == 503, r.text
                err = r.json()["error"]
                assert set(err) == {"message", "type", "param", "code"} and "queue" in err["message"]
            # everything that is not the queue still answers while it is full
            assert httpx.get(server.url + "/health", timeout=10).status_code == 200
            assert httpx.get(server.url + "/v1/models", timeout=10).status_code == 200
            assert httpx.post(url, json={"prompt": "hi", "max_tokens": -1}, timeout=10).status_code == 400
            metrics = httpx.get(server.url + "/metrics", timeout=10).text
            assert 'tinyserve_requests_rejected_total{model_name="SmolLM2-135M-Instruct",reason="queue_full"} 2.0' \
                in metrics
        finally:
            for cm in streams:
                cm.__exit__(None, None, None)  # disconnect: the server aborts them
    deadline = time.monotonic() + 30
    while running_waiting(server) != (0, 0):
        assert time.monotonic() < deadline, running_waiting(server)
        time.sleep(0.1)
    r = httpx.post(url, json={"prompt": "The sky is", "max_tokens": 4, "temperature": 0}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


def test_sigterm_finishes_in_flight_and_exits_zero(server):
    """SIGTERM while a stream is in flight: the stream completes, new connections are refused, exit 0."""
    lines: list[str] = []
    started = threading.Event()

    def consume() -> None:
        body = {**LONG, "max_tokens": 24}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    lines.append(line[6:])
                    started.set()

    t = threading.Thread(target=consume)
    t.start()
    assert started.wait(60), server.log_tail()
    code = server.terminate(timeout=90)
    t.join(30)
    assert code == 0, server.log_tail()
    assert lines[-1] == "[DONE]", lines[-3:]
    chunks = [json.loads(x) for x in lines[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(1 for c in chunks if c["choices"][0]["text"]) >= 12  # the whole answer arrived
    with pytest.raises(httpx.TransportError):
        httpx.get(server.url + "/health", timeout=5)
    assert "engine loop stopped" in server.log_tail(200)


def test_a_startup_timeout_reports_the_servers_log():
    """The launcher's own error path: a server not healthy in time is stopped, and the error quotes
    its log (it once raised 'I/O operation on closed file' instead, hiding why)."""
    from tinyserve_lab.launcher import ServerProcess

    srv = ServerProcess(["--no-such-flag"], startup_timeout=0.01)
    with pytest.raises(TimeoutError, match="not healthy"):
        srv.start()
    assert isinstance(srv.log_tail(), str)
