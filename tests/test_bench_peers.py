"""`tinyserve bench peers` and the naive baseline server, fast: a tiny random model, a real server process
on 127.0.0.1, the real load generator. The real peers (llama.cpp, vLLM) are benchmarks, not tests."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import httpx
import pytest

from tinyserve_lab.peers import PEERS, add_peers_args, build_specs, run_peers
from tinyserve_lab.serve_bench import run_serve_benchmark


def peer_args(*argv: str) -> argparse.Namespace:
    return add_peers_args(argparse.ArgumentParser()).parse_args(list(argv))


def test_missing_peers_are_skipped_with_install_hint(tmp_path: Path) -> None:
    args = peer_args("--peers-dir", str(tmp_path / "no-peers"))
    specs = build_specs(args, 12345, tmp_path / "m.gguf", tmp_path / "hf", slots=4)
    assert set(specs) == set(PEERS)
    for name in ("llamacpp", "vllm"):
        assert specs[name].missing and "install_peers.sh" in specs[name].missing, specs[name].missing
    assert specs["baseline"].missing is None
    assert "-np" in specs["llamacpp"].command and "4" in specs["llamacpp"].command
    assert "Q4" not in specs["baseline"].weights and "native" in specs["llamacpp"].weights
    no_gguf = build_specs(args, 12345, None, tmp_path / "hf", slots=1)["llamacpp"]
    assert no_gguf.missing and "GGUF" in no_gguf.missing


def test_baseline_server_under_the_load_generator(tiny_llama_dir: Path, tmp_path: Path, capsys) -> None:
    """The baseline as a real process, driven by the serve benchmark through `run_peers`; the peers
    that are not installed are skipped with a message; the per-point JSON records the peer."""
    args = peer_args(
        "--peers", "baseline", "llamacpp", "vllm", "--hf-dir", str(tiny_llama_dir), "--model", "tiny",
        "--peers-dir", str(tmp_path / "no-peers"), "--dataset", "random", "--num-prompts", "3",
        "--random-input-len", "24", "--random-output-len", "6", "--max-concurrency", "2", "--threads", "1",
        "--result-dir", str(tmp_path / "results"), "--disable-tqdm", "--startup-timeout", "90",
        "--request-timeout", "60", "--timeout", "120",
    )
    seen: dict = {}

    def bench(sub: argparse.Namespace, tokenizer) -> dict:
        # a few direct requests first: non-streaming usage, ignore_eos, and a clear 400
        with httpx.Client(base_url=sub.base_url, trust_env=False, timeout=30) as c:
            assert c.get("/models").json()["data"][0]["id"] == "tiny"
            r = c.post("/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 5,
                                             "temperature": 0, "ignore_eos": True}).json()
            assert r["usage"]["completion_tokens"] == 5 and r["choices"][0]["finish_reason"] == "length"
            assert r["usage"]["prompt_tokens"] == len(tokenizer.encode("Hello"))
            bad = c.post("/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 10_000})
            assert bad.status_code == 400 and "max_tokens" in bad.json()["error"]["message"]
        seen["url"] = sub.base_url
        return run_serve_benchmark(sub, tokenizer=tokenizer)

    out = run_peers(args, bench=bench)
    assert seen["url"].startswith("http://127.0.0.1:")
    assert out["peers"]["llamacpp"]["status"] == "skipped" and out["peers"]["vllm"]["status"] == "skipped"
    text = capsys.readouterr().out
    assert "llamacpp: skipped" in text and "install_peers.sh" in text

    base = out["peers"]["baseline"]
    assert base["status"] == "ok", base.get("message")
    (run,) = base["runs"]
    recs = run["requests"]
    assert len(recs) == 3 and all(r["success"] for r in recs), [r["error"] for r in recs]
    assert all(r["output_len"] == 6 == r["expected_output_len"] for r in recs)
    assert all(r["ttft"] > 0 and len(r["itl"]) >= 1 for r in recs)
    assert run["metrics"]["completed"] == 3 and run["metrics"]["failed"] == 0
    assert run["metrics"]["total_output"] == 18
    assert run["peer"]["name"] == "baseline" and "one request at a time" in run["peer"]["weights"]
    (row,) = out["rows"]
    assert row["peer"] == "baseline" and row["concurrency"] == 2 and row["x_baseline"] == pytest.approx(1.0)

    saved = [json.loads(Path(f).read_text()) for f in out["files"]]
    assert saved[0]["label"] == "baseline" and saved[0]["peer"]["name"] == "baseline"
    assert saved[-1]["schema"] == "tinyserve_lab.peers/1" and saved[-1]["peers"]["vllm"]["status"] == "skipped"
    assert Path(base["log"]).is_file()


def test_peer_that_fails_to_start_is_reported(tmp_path: Path) -> None:
    """An installed peer that dies at startup: reported with its exit status and log tail, nothing hangs."""
    fake = tmp_path / "peers" / "bin" / "llama-server"
    fake.parent.mkdir(parents=True)
    fake.write_text('#!/bin/sh\necho "fake llama-server got: $*"\nexit 3\n')
    fake.chmod(0o755)
    args = peer_args("--peers", "llamacpp", "--peers-dir", str(tmp_path / "peers"), "--gguf", str(tmp_path / "m.gguf"),
                     "--hf-dir", str(tmp_path), "--max-concurrency", "1", "4", "--result-dir", "",
                     "--startup-timeout", "30")
    out = run_peers(args, tokenizer=object(), bench=lambda *a, **k: pytest.fail("must not run the benchmark"))
    o = out["peers"]["llamacpp"]
    assert o["status"] == "failed" and "exited with status 3" in o["message"], o
    assert "fake llama-server got:" in o["message"] and "-np 1 -cb -c 2048" in o["message"]  # sized for the first point
    assert "m.gguf native" in o["weights"] and out["rows"] == []


def test_a_missing_gguf_is_a_clear_error(tmp_path: Path) -> None:
    from tinyserve_lab.peers import model_paths

    with pytest.raises(SystemExit, match="no such file .*qwen2.5-coder-1.5b"):
        model_paths(peer_args("--gguf", str(tmp_path / "nope.gguf")))
