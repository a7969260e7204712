"""A short soak (`tinyserve bench soak`) against a real server on 127.0.0.1: mixed streaming and
non-streaming requests, dropped streams, abandoned requests and malformed ones, with more clients
than the server has slots (some get 503). Nothing may be lost; KV usage must return to 0."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tinyserve.cli import main
from tinyserve_lab.soak import run_soak

pytestmark = pytest.mark.slow


def test_short_soak_loses_nothing_and_frees_every_block(tmp_path, monkeypatch):
    captured = {}
    monkeypatch.setattr("tinyserve_lab.soak.run_soak", lambda args: captured.setdefault("s", run_soak(args)))
    code = main(["bench", "soak", "--duration", "20", "--concurrency", "12", "--result-dir", str(tmp_path),
                 "--server-args", "--dtype float32 --enforce-eager --max-num-seqs 4 --max-waiting 4 "
                                  "--kv-cache-memory-gb 0.1 --max-model-len 256"])
    s = captured["s"]
    assert code == 0 and s["passed"], s
    counts = s["by_status"]
    assert counts.get("lost", 0) == 0
    assert counts["ok"] > 0 and counts["rejected"] > 0 and counts["cancelled"] > 0, counts
    assert s["kv_usage_after"] == 0 and s["max_kv_usage"] > 0
    assert s["rss_growth_mb"] is not None  # RSS was sampled (the server is our child)
    doc, png = (Path(f) for f in s["files"])
    assert json.loads(doc.read_text())["summary"]["requests"] == s["requests"]
    assert png.stat().st_size > 10_000
