"""The in-process peers (ONNX Runtime GenAI, OpenVINO GenAI) without either installed: arguments, command
lines, skip messages, the worker's result line and its aggregation, and the worker's generation loops
driven by small fake runtime modules (the real runtimes are benchmarks, not tests)."""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

from tinyserve_lab import inproc_peers, inproc_worker
from tinyserve_lab.inproc_peers import (
    INPROC_PEERS,
    build_inproc_spec,
    extra_metrics,
    inproc_concurrencies,
    parse_worker_output,
    run_inproc_peer,
    to_result,
    worker_command,
)
from tinyserve_lab.metrics import RequestRecord
from tinyserve_lab.peers import ALL_PEERS, PEERS, add_peers_args, comparison_rows, run_peers

FAKE_OG = '''
import json
class Config:
    def __init__(self, path): self.path = path
    def clear_providers(self): pass
    def overlay(self, text): json.loads(text)
class Model:
    def __init__(self, config): pass
class GeneratorParams:
    def __init__(self, model): self.opts = {}
    def set_search_options(self, **kw): self.opts = kw
class Generator:
    def __init__(self, model, params):
        assert params.opts["min_length"] == params.opts["max_length"]  # EOS ignored
        self.max, self.n = params.opts["max_length"], 0
    def append_tokens(self, ids): self.n = len(ids)
    def is_done(self): return self.n >= self.max
    def generate_next_token(self): self.n += 1
    def get_next_tokens(self): return [7]
'''

FAKE_OV_GENAI = '''
__version__ = "0.0-fake"
class SchedulerConfig: pass
class GenerationConfig: pass
class GenerationStatus:
    RUNNING, FINISHED = 0, 1
class _Out:
    def __init__(self, ids): self.generated_ids = ids
class _Handle:
    def __init__(self, n): self.left, self.buf = n, []
    def can_read(self): return bool(self.buf)
    def read(self):
        out, self.buf = self.buf, []
        return {0: _Out(out)}
    def get_status(self): return GenerationStatus.RUNNING if self.left else GenerationStatus.FINISHED
class ContinuousBatchingPipeline:
    peak = 0
    def __init__(self, path, sched, device, props):
        assert device == "CPU" and props["INFERENCE_NUM_THREADS"] >= 1
        self.max_seqs, self.live = sched.max_num_seqs, []
    def add_request(self, rid, ids, cfg):
        assert cfg.ignore_eos and cfg.min_new_tokens == cfg.max_new_tokens
        h = _Handle(cfg.max_new_tokens)
        self.live.append(h)
        return h
    def step(self):
        self.live = [h for h in self.live if h.left]
        ContinuousBatchingPipeline.peak = max(ContinuousBatchingPipeline.peak, len(self.live))
        assert len(self.live) <= self.max_seqs
        for h in self.live:
            h.left -= 1
            h.buf.append(5)
    def get_metrics(self): return type("M", (), {"max_cache_usage": 1.0})()
'''


def peer_args(*argv: str) -> argparse.Namespace:
    return add_peers_args(argparse.ArgumentParser()).parse_args(list(argv))


def fake_site(tmp_path: Path) -> Path:
    """A directory with fake onnxruntime_genai / openvino_genai / openvino packages."""
    site = tmp_path / "fake-site"
    for name, body in (("onnxruntime_genai", FAKE_OG), ("openvino_genai", FAKE_OV_GENAI),
                       ("openvino", "def Tensor(a):\n    return a\n")):
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text(body)
    return site


@pytest.fixture
def fake_runtimes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    site = fake_site(tmp_path)
    monkeypatch.syspath_prepend(str(site))
    for mod in ("onnxruntime_genai", "openvino_genai", "openvino"):
        monkeypatch.delitem(sys.modules, mod, raising=False)
    return site


def fake_venvs(peers_dir: Path, site: Path) -> None:
    """Peer venvs whose python is this interpreter with the fake runtimes on its path."""
    for name, pkg in inproc_peers.PACKAGES.items():
        venv = peers_dir / f"{name}-venv"
        (venv / "bin").mkdir(parents=True)
        py = venv / "bin" / "python"
        py.write_text(f'#!/bin/sh\nPYTHONPATH="{site}" exec "{sys.executable}" "$@"\n')
        py.chmod(py.stat().st_mode | stat.S_IXUSR)
        (venv / "lib" / "python3.11" / "site-packages" / pkg).mkdir(parents=True)


def test_peer_choices_and_flags() -> None:
    assert set(INPROC_PEERS) == {"ortgenai", "openvino"} and ALL_PEERS == PEERS + INPROC_PEERS
    args = peer_args()
    assert args.peers == list(ALL_PEERS)
    assert (args.ortgenai_precision, args.ortgenai_accuracy_level, args.ortgenai_prune_lm_head) == ("int4", 4, True)
    assert (args.openvino_weight_format, args.openvino_group_size) == ("int4", 64)
    args = peer_args("--peers", "openvino", "--openvino-weight-format", "int8", "--no-ortgenai-prune-lm-head",
                     "--ortgenai-args=--warmup 0")
    assert args.peers == ["openvino"] and args.openvino_weight_format == "int8" and not args.ortgenai_prune_lm_head
    with pytest.raises(SystemExit):
        peer_args("--peers", "onnx")


def test_specs_commands_and_install_hint(tmp_path: Path) -> None:
    args = peer_args("--peers-dir", str(tmp_path / "none"), "--threads", "2")
    hf = tmp_path / "SmolHF"
    ort, ov = build_inproc_spec(args, "ortgenai", hf), build_inproc_spec(args, "openvino", hf)
    for spec in (ort, ov):
        assert spec.missing and f"install_peers.sh --only {spec.name}" in spec.missing
        assert spec.model_dir.parent == tmp_path / "none" / "models" and spec.model_dir.name.startswith("SmolHF-")
    c = ort.export_cmd
    assert c[1:3] == ["-m", "onnxruntime_genai.models.builder"] and c[c.index("-i") + 1] == str(hf)
    assert c[c.index("-p") + 1] == "int4" and c[c.index("-e") + 1] == "cpu"
    assert "accuracy_level=4" in c and "algo_config=k_quant" in c and "prune_lm_head=true" in c
    assert "pruned" in ort.weights
    c = ov.export_cmd
    assert c[1:3] == ["export", "openvino"] and c[c.index("--weight-format") + 1] == "int4"
    assert c[c.index("--group-size") + 1] == "64" and c[-1] == str(ov.model_dir)
    int8 = build_inproc_spec(peer_args("--openvino-weight-format", "int8"), "openvino", hf)
    assert "--group-size" not in int8.export_cmd and int8.model_dir.name.endswith("openvino-int8")
    fp32 = build_inproc_spec(peer_args("--ortgenai-precision", "fp32", "--no-ortgenai-prune-lm-head"), "ortgenai", hf)
    assert "--extra_options" not in fp32.export_cmd and fp32.model_dir.name.endswith("ortgenai-fp32")
    assert ort.env["OMP_NUM_THREADS"] == "2"


def test_worker_command(tmp_path: Path) -> None:
    args = peer_args("--threads", "2", "--openvino-args=--ov-prop KV_CACHE_PRECISION=u8", "--no-warmup")
    ov = build_inproc_spec(args, "openvino", tmp_path / "hf")
    cmd = worker_command(ov, args, tmp_path / "r.json", 64)
    assert cmd[1] == str(inproc_peers.WORKER) and cmd[2] == "openvino"
    assert cmd[cmd.index("--max-concurrency") + 1] == "64" and cmd[cmd.index("--threads") + 1] == "2"
    assert cmd[-2:] == ["--ov-prop", "KV_CACHE_PRECISION=u8"] and "--warmup" in cmd
    assert "--max-concurrency" not in worker_command(ov, args, tmp_path / "r.json", None)
    assert inproc_concurrencies("ortgenai", [None, 4, 64]) == [1]
    assert inproc_concurrencies("openvino", [1, None, 1]) == [1, None]
    assert inproc_peers.RESULT_PREFIX == inproc_worker.RESULT_PREFIX


def test_parse_worker_output() -> None:
    line = inproc_peers.RESULT_PREFIX + json.dumps({"records": [], "duration_s": 1.0, "load_s": 0.1})
    assert parse_worker_output(f"runtime noise\n{line}\ntrailing log\n")["load_s"] == 0.1
    with pytest.raises(ValueError, match="no result line"):
        parse_worker_output("Traceback ...\n")
    with pytest.raises(ValueError, match="records"):
        parse_worker_output(inproc_peers.RESULT_PREFIX + '{"duration_s": 1}')


def test_records_metrics_and_result_schema(tmp_path: Path) -> None:
    # two sequential requests: 100-token prompts, first token at 0.1 s, then 4 more 10 ms apart
    recs = [inproc_worker.record(i, 100, 5, t0, [t0 + 0.1 + 0.01 * k for k in range(5)])
            for i, t0 in enumerate((0.0, 0.2))]
    assert recs[0]["ttft"] == pytest.approx(0.1) and recs[0]["itl"] == pytest.approx([0.01] * 4)
    assert not inproc_worker.record(9, 3, 5, 0.0, [])["success"]
    records = [RequestRecord.from_dict(r) for r in recs]
    ex = extra_metrics(records, 1)
    assert ex["prefill_tok_s"] == pytest.approx(200 / 0.2) and ex["decode_tok_s"] == pytest.approx(100.0)
    assert extra_metrics(records, 2)["prefill_tok_s"] == pytest.approx(200 / 0.3)
    assert extra_metrics(records, 2)["decode_tok_s"] is None

    args = peer_args("--dataset", "random", "--num-prompts", "2", "--model", "m")
    spec = build_inproc_spec(args, "ortgenai", tmp_path / "hf")
    out = {"records": recs, "duration_s": 0.4, "load_s": 0.5, "max_concurrency": 1, "versions": {"x": "1"}}
    run = to_result(out, args, spec, (50.0, 99.0), {}, ["py", "worker"], 0.0, tmp_path / "log")
    m = run["metrics"]
    assert run["schema"] == "tinyserve_lab.serve/1" and run["server"]["endpoint"] == "in-process"
    assert m["output_throughput"] == pytest.approx(10 / 0.4) and m["ttft_mean_ms"] == pytest.approx(100.0)
    assert m["tpot_mean_ms"] == pytest.approx(10.0) and m["completed"] == 2
    assert run["config"]["max_concurrency"] == 1 and "in-process" in run["peer"]["note"]
    rows = comparison_rows({"ortgenai": {"runs": [run], "weights": spec.weights, "mode": "in-process"}})
    assert rows[0]["mode"] == "in-process" and rows[0]["prefill_tok_s"] == pytest.approx(1000.0)


def test_worker_ortgenai_loop(fake_runtimes: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    req = tmp_path / "req.json"
    req.write_text(json.dumps({"requests": [{"prompt_ids": [1, 2, 3], "output_len": 6},
                                            {"prompt_ids": [4] * 10, "output_len": 3}]}))
    assert inproc_worker.main(["ortgenai", "--model-dir", str(tmp_path), "--requests", str(req)]) == 0
    out = parse_worker_output(capsys.readouterr().out)
    assert [r["output_len"] for r in out["records"]] == [6, 3] and out["max_concurrency"] == 1
    assert [r["prompt_len"] for r in out["records"]] == [3, 10]
    assert out["records"][1]["start_time"] >= out["records"][0]["e2el"]  # one at a time
    assert out["settings"]["intra_op_num_threads"] == 2


def test_worker_openvino_continuous_batching(fake_runtimes: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    req = tmp_path / "req.json"
    req.write_text(json.dumps({"requests": [{"prompt_ids": [1] * (i + 1), "output_len": 3 + i} for i in range(5)]}))
    argv = ["openvino", "--model-dir", str(tmp_path), "--requests", str(req), "--warmup", "0"]
    assert inproc_worker.main([*argv, "--max-concurrency", "2"]) == 0
    out = parse_worker_output(capsys.readouterr().out)
    assert [r["output_len"] for r in out["records"]] == [3, 4, 5, 6, 7] and out["max_concurrency"] == 2
    assert sys.modules["openvino_genai"].ContinuousBatchingPipeline.peak == 2
    assert inproc_worker.main([*argv, "--ov-prop", "KV_CACHE_PRECISION=u8"]) == 0
    out = parse_worker_output(capsys.readouterr().out)
    assert out["max_concurrency"] == 5 and out["settings"]["KV_CACHE_PRECISION"] == "u8"
    assert all(r["success"] for r in out["records"])


def test_run_inproc_peer_through_the_worker_process(fake_runtimes: Path, tmp_path: Path) -> None:
    """The whole path: a 'venv' python (this interpreter + fake runtimes), an already exported model dir,
    the requests file, the worker subprocess, its result line, and the serve-schema result."""
    peers_dir = tmp_path / "peers"
    fake_venvs(peers_dir, fake_runtimes)
    args = peer_args("--peers-dir", str(peers_dir), "--dataset", "random", "--num-prompts", "3",
                     "--max-concurrency", "1", "2", "--threads", "1", "--model", "m")
    hf = tmp_path / "hf"
    for name in INPROC_PEERS:
        spec = build_inproc_spec(args, name, hf)
        assert spec.missing is None, spec.missing
        spec.model_dir.mkdir(parents=True)
        (spec.model_dir / ("genai_config.json" if name == "ortgenai" else "openvino_model.xml")).write_text("{}")
    tok = SimpleNamespace(encode=lambda text: [ord(c) for c in text])
    workload = [SimpleNamespace(prompt="abc" * (i + 1), expected_output_len=4) for i in range(3)]
    console = Console(file=open(os.devnull, "w"))  # noqa: SIM115 - closed with the test process
    ort = run_inproc_peer("ortgenai", args, hf, lambda: workload, tok, tmp_path / "logs", "t", console)
    assert ort["status"] == "ok", ort.get("message")
    assert [r["config"]["max_concurrency"] for r in ort["runs"]] == [1]  # batch 1, measured once
    assert [r["prompt_len"] for r in ort["runs"][0]["requests"]] == [3, 6, 9]
    ov = run_inproc_peer("openvino", args, hf, lambda: workload, tok, tmp_path / "logs", "t", console)
    assert ov["status"] == "ok", ov.get("message")
    assert [r["config"]["max_concurrency"] for r in ov["runs"]] == [1, 2]
    assert all(r["metrics"]["total_output"] == 12 for r in ov["runs"])
    # a worker that fails is reported with its log, not raised
    args.openvino_args = "--no-such-flag"
    bad = run_inproc_peer("openvino", args, hf, lambda: workload, tok, tmp_path / "logs", "t", console)
    assert bad["status"] == "failed" and "status 2" in bad["message"]


def test_missing_inproc_peers_are_skipped(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = peer_args("--peers", "ortgenai", "openvino", "--hf-dir", str(tmp_path / "hf"),
                     "--peers-dir", str(tmp_path / "no-peers"), "--result-dir", str(tmp_path / "res"))
    out = run_peers(args, tokenizer=object())  # the workload is never sampled for a skipped peer
    assert {k: v["status"] for k, v in out["peers"].items()} == {"ortgenai": "skipped", "openvino": "skipped"}
    text = capsys.readouterr().out
    assert "install_peers.sh --only ortgenai" in text and "install_peers.sh --only openvino" in text
    summary = json.loads(Path(out["files"][-1]).read_text())
    assert summary["peers"]["openvino"]["status"] == "skipped"


def test_install_script_flags() -> None:
    script = Path(__file__).resolve().parents[1] / "scripts" / "install_peers.sh"
    text = script.read_text()
    for flag in ("--skip-ortgenai", "--skip-openvino", "--only", "onnxruntime-genai==", "openvino-genai==",
                 "TORCH_SPEC"):
        assert flag in text, flag
    import subprocess

    bad = subprocess.run(["bash", str(script), "--only", "nope"], capture_output=True, text=True, timeout=30,
                         env={**os.environ, "PEERS_DIR": "/nonexistent/never-created"})
    assert bad.returncode == 2 and "unknown peer" in bad.stderr
    assert textwrap.dedent(subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True,
                                          timeout=30).stdout).count("--only") >= 1
