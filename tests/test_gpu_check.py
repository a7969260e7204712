"""scripts/gpu_check.sh's Python entry (tinyserve_lab.cuda_check) end to end on the CPU at tiny sizes: every
part a CPU can run, one JSON document and a summary written, CUDA graphs recorded as skipped here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tinyserve_lab.cuda_check import DEVICE_TEST, bandwidth_tb_s

ROOT = Path(__file__).resolve().parents[1]


def test_bandwidth_by_device_name():
    assert bandwidth_tb_s("NVIDIA H100 80GB HBM3") == 3.35
    assert bandwidth_tb_s("NVIDIA H100 PCIe") == 2.0
    assert bandwidth_tb_s("NVIDIA H200") == 4.8
    assert bandwidth_tb_s("Some GPU") is None


def test_the_device_tests_are_found():
    files = [f.name for f in (ROOT / "tests").glob("test_*.py") if DEVICE_TEST.search(f.read_text())]
    assert {"test_fp8.py", "test_cuda_graphs.py"} <= set(files)


@pytest.mark.slow
def test_the_dry_run_end_to_end(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tinyserve_lab.cuda_check", "--device", "cpu", "--dry-run",
                           "--skip-tests", "--out-dir", str(tmp_path)], capture_output=True, text=True,
                          cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((tmp_path / "gpu-check.json").read_text())
    checks = [r for r in doc["rows"] if "check" in r]
    assert checks[0]["check"] == "environment" and checks[0]["device"] == "cpu"
    assert all(r.get("ok", True) for r in checks), checks
    modes = {r["mode"]: r for r in doc["rows"] if "mode" in r}
    assert "skipped" in modes["cuda-graphs"]  # refused on a CPU, recorded
    assert modes["fp8-weights+graphs"]["weights"] == "fp8" and modes["fp8-kv+graphs"]["kv"] == "fp8_e4m3"
    assert all(modes[m]["c1_out_tok_s"] > 0 for m in ("eager", "fp8-weights+graphs", "fp8-kv+graphs"))
    assert (tmp_path / "summary.md").read_text().startswith("# GPU check on cpu (dry run")
