"""Start in seconds: a real server answers while its compiled decode step is still being built, says so
on /health and /metrics, and switches to it between steps without losing or changing an answer (fp32:
the eager and compiled steps give the same greedy tokens). The build is held by tests/faults.py until
the test lets it go, so "still building" is a fact of the test, not a race."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tinyserve_lab.launcher import ServerProcess

from conftest import server_metric

pytestmark = pytest.mark.slow

HELD_SERVER = [sys.executable, str(Path(__file__).with_name("faults.py"))]  # `tinyserve serve`, build held


def test_a_server_answers_while_its_compiled_step_builds_and_switches_without_changing_an_answer(
        tiny_llama_dir, tmp_path):
    release = tmp_path / "release"
    args = ["--model", str(tiny_llama_dir), "--served-model-name", "tiny", "--dtype", "float32", "--num-threads",
            "1", "--num-kv-blocks", "64", "--block-size", "4"]  # --compile: serve's default, background
    env = {"TINYSERVE_HOLD_COMPILE": str(release), "TINYSERVE_CACHE": str(tmp_path / "cache")}
    body = {"model": "tiny", "prompt": [5, 6, 7, 8, 9], "max_tokens": 48, "temperature": 0}
    with ServerProcess(args, env=env, entry=HELD_SERVER, startup_timeout=120) as srv:
        assert httpx.get(srv.url + "/health").json() == {"status": "ok", "compiled_step": "building"}
        assert server_metric(srv.url, "tinyserve_compiled_step_ready") == 0
        eager = httpx.post(srv.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]

        # Requests back to back, from before the build is let go until after the switch: one is in
        # flight at the switch (or just before and after it), and every one must be the eager answer.
        answers: list[str] = []
        done = threading.Event()

        def keep_asking() -> None:
            with httpx.Client(timeout=60) as client:
                while not done.is_set():
                    answers.append(client.post(srv.url + "/v1/completions", json=body).json()["choices"][0]["text"])

        asker = threading.Thread(target=keep_asking)
        asker.start()
        try:
            time.sleep(0.5)
            release.touch()
            deadline = time.monotonic() + 300
            while httpx.get(srv.url + "/health").json()["compiled_step"] != "ready":
                assert time.monotonic() < deadline, "the compiled step was not built in 5 minutes"
                time.sleep(0.2)
            asked_before_ready = len(answers)
            while len(answers) < asked_before_ready + 3:  # some answered on the compiled step
                time.sleep(0.05)
        finally:
            done.set()
            asker.join(60)
        assert server_metric(srv.url, "tinyserve_compiled_step_ready") == 1
        compiled = httpx.post(srv.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        assert answers and all(a == eager for a in answers) and compiled == eager
        assert "full speed" in srv.log_tail(200)


def test_a_server_stopped_while_its_step_builds_exits_cleanly(tiny_llama_dir, tmp_path):
    """SIGTERM while the background build runs: exit status 0, the builder stopped with it."""
    args = ["--model", str(tiny_llama_dir), "--dtype", "float32", "--num-threads", "1", "--num-kv-blocks", "16",
            "--block-size", "4"]
    env = {"TINYSERVE_HOLD_COMPILE": str(tmp_path / "never"), "TINYSERVE_CACHE": str(tmp_path / "cache")}
    srv = ServerProcess(args, env=env, entry=HELD_SERVER, startup_timeout=120).start()
    try:
        assert httpx.get(srv.url + "/health").json()["compiled_step"] == "building"
        assert srv.terminate() == 0
    finally:
        srv.stop()
    assert "terminate called" not in srv.log_tail(200)
