"""The serving benchmark end to end: the real load generator against a real tinyserve server."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from tinyserve_lab.launcher import ServerProcess
from tinyserve_lab.serve_bench import add_serve_bench_args, run_serve_benchmark

pytestmark = pytest.mark.slow


def test_serve_benchmark_against_real_server(tmp_path):
    with ServerProcess(["--served-model-name", "smol-bench", "--max-num-seqs", "8", "--enforce-eager"]) as server:
        parser = argparse.ArgumentParser()
        add_serve_bench_args(parser)
        args = parser.parse_args([
            "--base-url", f"{server.url}/v1", "--dataset", "random", "--num-prompts", "6",
            "--random-input-len", "48", "--random-output-len", "12", "--max-concurrency", "3",
            "--result-dir", str(tmp_path), "--label", "e2e", "--disable-tqdm",
            "--goodput", "ttft:60000", "tpot:60000",
        ])
        out = run_serve_benchmark(args)
    (path,) = out["files"]
    result = json.loads(Path(path).read_text())
    m = result["metrics"]
    assert m["completed"] == 6 and m["failed"] == 0
    assert m["total_output"] == 6 * 12  # ignore_eos + max_tokens pin every output length
    assert result["server"]["model"] == "smol-bench"
    assert m["request_goodput"] > 0 and m["output_throughput"] > 0
    records = result["requests"]
    assert all(r["success"] and 0 < r["ttft"] <= r["e2el"] for r in records)
    assert all(len(r["itl"]) >= 1 for r in records)
