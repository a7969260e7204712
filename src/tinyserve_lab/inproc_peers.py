"""In-process peers for `tinyserve bench peers`: ONNX Runtime GenAI and OpenVINO GenAI, offline.

These have no HTTP server to drive, so each is measured by inproc_worker.py run with the python of the
peer's own venv (.peers/<name>-venv, made by scripts/install_peers.sh): tinyserve's venv never imports
onnxruntime or openvino. It gets the very requests the HTTP peers get (sampled by serve_bench from the
same flags and seed, tokenized by the same tokenizer, passed as token ids in a temp JSON file) and
prints one JSON line with per-request records (ttft, itl, e2el, start_time), which are aggregated by
`metrics.compute_metrics` like an HTTP run, so the result files share the `tinyserve bench serve`
schema. Differences, also written into every result (`peer.note`):
- no HTTP, no detokenization, no request parsing: the numbers are an upper bound for a server built
  on the same runtime;
- --request-rate is ignored: requests are submitted all at once, at most --max-concurrency in flight;
- ortgenai runs one request at a time (batch 1) whatever the concurrency: it is measured once, at
  concurrency 1, and reported as that point;
- openvino times a token at the end of the scheduler step that produced it.

Models are exported from the same HF dir the other peers use (the fp32 export of the bundled GGUF),
once, into <peers-dir>/models/ (scripts/install_peers.sh does it ahead of time via `prepare`):
- ortgenai: `python -m onnxruntime_genai.models.builder -i HF -o OUT -p int4 -e cpu` with
  accuracy_level=4 (int8 activations in the int4 MatMulNBits kernels), algo_config=k_quant (same
  format and speed as its default RTN, closer to fp32) and prune_lm_head=true (prefill computes the
  last position's logits only);
- openvino: `optimum-cli export openvino --model HF --weight-format int4|int8 OUT` (int4: --group-size 64
  --ratio 1.0; its default group of 128 does not divide the hidden size 576).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .metrics import RequestRecord, compute_metrics

DEFAULT_PEERS_DIR = Path(__file__).resolve().parents[2] / ".peers"  # <repo>/.peers: install_peers.sh puts them there

INPROC_PEERS = ("ortgenai", "openvino")
WORKER = Path(__file__).resolve().parent / "inproc_worker.py"
RESULT_PREFIX = "INPROC_RESULT "  # the same constant as inproc_worker.RESULT_PREFIX (that file stays standalone)
INSTALL_HINT = "scripts/install_peers.sh --only {name}"
NOTE = ("in-process, offline: no HTTP/detokenization; requests submitted at once up to the concurrency, "
        "request rate ignored")
PACKAGES = {"ortgenai": "onnxruntime_genai", "openvino": "openvino_genai"}


def add_inproc_args(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--ortgenai-precision", choices=("int4", "int8", "fp32", "bf16"), default="int4",
                   help="ortgenai: model builder -p")
    g.add_argument("--ortgenai-accuracy-level", type=int, choices=(0, 1, 2, 3, 4), default=4,
                   help="ortgenai int4/int8: MatMulNBits accuracy level (4 = int8 activations, fastest on CPU)")
    g.add_argument("--ortgenai-algo", choices=("default", "rtn", "k_quant"), default="k_quant",
                   help="ortgenai int4/int8: the builder's algo_config; k_quant keeps greedy output close to fp32 "
                        "here (plain RTN drifts within 10 tokens) at the same kernel speed")
    g.add_argument("--ortgenai-prune-lm-head", action=argparse.BooleanOptionalAction, default=True,
                   help="ortgenai: the builder's prune_lm_head (prefill computes logits of the last position only)")
    g.add_argument("--openvino-weight-format", choices=("int4", "int8", "fp16", "fp32"), default="int4",
                   help="openvino: optimum-cli export --weight-format")
    g.add_argument("--openvino-group-size", type=int, default=64,
                   help="openvino int4: NNCF group size (must divide 576 here: 32 or 64; its default 128 fails)")
    g.add_argument("--openvino-cache-gb", type=float, default=2.0, help="openvino: KV cache size (SchedulerConfig)")
    g.add_argument("--inproc-timeout", type=float, default=1800.0,
                   help="seconds for one in-process measurement (and for a model export)")


@dataclass
class InprocSpec:
    """How to export and run one in-process peer; `missing` is why it cannot run here (None = runnable)."""

    name: str
    python: Path
    model_dir: Path
    export_cmd: list[str]
    weights: str
    env: dict[str, str] = field(default_factory=dict)
    missing: str | None = None


def venv_python(peers_dir: Path, name: str) -> Path:
    return peers_dir / f"{name}-venv" / "bin" / "python"


def installed(peers_dir: Path, name: str) -> bool:
    py = venv_python(peers_dir, name)
    site = peers_dir / f"{name}-venv" / "lib"
    return os.access(py, os.X_OK) and any(site.glob(f"python3*/site-packages/{PACKAGES[name]}"))


def build_inproc_spec(args: argparse.Namespace, name: str, hf_dir: Path) -> InprocSpec:
    peers_dir, t = Path(args.peers_dir), str(args.threads)
    py = venv_python(peers_dir, name)
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": t, "MKL_NUM_THREADS": t,
           "TOKENIZERS_PARALLELISM": "false"}
    missing = None if installed(peers_dir, name) else (
        f"not installed ({py.parent.parent}): run {INSTALL_HINT.format(name=name)}")
    if name == "ortgenai":
        prec, acc, algo = args.ortgenai_precision, args.ortgenai_accuracy_level, args.ortgenai_algo
        quant = prec in ("int4", "int8")
        tag = (f"{prec}-{algo}-acc{acc}" if quant else prec) + ("-prune" if args.ortgenai_prune_lm_head else "")
        out = peers_dir / "models" / f"{hf_dir.name}-ortgenai-{tag}"
        cmd = [str(py), "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out), "-p", prec,
               "-e", "cpu", "-c", str(peers_dir / "models" / "ortgenai-cache")]
        extra = ([f"accuracy_level={acc}", f"algo_config={algo}"] if quant else []) + (
            ["prune_lm_head=true"] if args.ortgenai_prune_lm_head else [])
        if extra:
            cmd += ["--extra_options", *extra]
        weights = f"{prec} ONNX by the onnxruntime-genai model builder" + (
            f" ({algo}, block 32, accuracy level {acc} = int8 activations)" if quant else "") + (
            ", LM head pruned to the last position" if args.ortgenai_prune_lm_head else "") + f" from {hf_dir.name}"
    elif name == "openvino":
        wf, gs = args.openvino_weight_format, args.openvino_group_size
        int4 = wf == "int4"
        out = peers_dir / "models" / (f"{hf_dir.name}-openvino-{wf}" + (f"-g{gs}" if int4 else ""))
        cmd = [str(py.parent / "optimum-cli"), "export", "openvino", "--model", str(hf_dir),
               "--task", "text-generation-with-past", "--weight-format", wf]
        # its int4 default group size 128 does not divide this model's hidden size (576): export fails
        cmd += (["--group-size", str(gs), "--ratio", "1.0"] if int4 else []) + [str(out)]
        weights = (f"{wf} OpenVINO IR by optimum-cli export openvino (NNCF"
                   + (f", group size {gs}, all linears int4" if int4 else "") + f") from {hf_dir.name}")
    else:
        raise ValueError(f"unknown in-process peer {name!r}")
    return InprocSpec(name, py, out, cmd, weights, env, missing)


def exported(spec: InprocSpec) -> bool:
    marker = "genai_config.json" if spec.name == "ortgenai" else "openvino_model.xml"
    return (spec.model_dir / marker).is_file()


def export_model(spec: InprocSpec, log_path: Path, timeout_s: float) -> float:
    """Export once (skipped when the output is already there); seconds spent. RuntimeError on failure."""
    if exported(spec):
        return 0.0
    spec.model_dir.parent.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(log_path, "ab") as log:
        log.write(f"$ {shlex.join(spec.export_cmd)}\n".encode())
        log.flush()
        rc = subprocess.run(spec.export_cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, **spec.env}, timeout=timeout_s).returncode
    if rc != 0 or not exported(spec):
        raise RuntimeError(f"model export failed (status {rc}); log {log_path}:\n{_tail(log_path)}")
    if spec.name == "ortgenai":
        _ortgenai_threads(spec.model_dir / "genai_config.json", None)
    return time.monotonic() - t0


def _ortgenai_threads(config_path: Path, threads: int | None) -> None:
    """Set session_options threads in genai_config.json (older builds have no Config.overlay)."""
    if threads is None:
        return
    cfg = json.loads(config_path.read_text())
    so = cfg.setdefault("model", {}).setdefault("decoder", {}).setdefault("session_options", {})
    if so.get("intra_op_num_threads") != threads:
        so["intra_op_num_threads"] = threads
        config_path.write_text(json.dumps(cfg, indent=4))


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def worker_requests(workload: list, tokenizer: Any) -> list[dict[str, Any]]:
    """The sampled requests as token ids (what the HTTP peers' tokenizers make of the prompt text)."""
    out = []
    for req in workload:
        ids = list(tokenizer.encode(req.prompt))
        out.append({"prompt_ids": [int(i) for i in ids], "output_len": int(req.expected_output_len)})
    return out


def worker_command(spec: InprocSpec, args: argparse.Namespace, requests_path: Path,
                   concurrency: int | None) -> list[str]:
    cmd = [str(spec.python), str(WORKER), spec.name, "--model-dir", str(spec.model_dir),
           "--requests", str(requests_path), "--threads", str(args.threads)]
    if spec.name == "openvino":
        cmd += ["--ov-cache-gb", f"{args.openvino_cache_gb:g}"]
        if concurrency:
            cmd += ["--max-concurrency", str(concurrency)]
    if not args.warmup:
        cmd += ["--warmup", "0"]
    return cmd + shlex.split(getattr(args, f"{spec.name}_args", "") or "")


def parse_worker_output(stdout: str) -> dict[str, Any]:
    """The worker's result line (the last one with RESULT_PREFIX); ValueError when there is none."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            out = json.loads(line[len(RESULT_PREFIX):])
            if not isinstance(out, dict) or "records" not in out or "duration_s" not in out:
                raise ValueError("worker result lacks records/duration_s")
            return out
    raise ValueError("no result line in the worker's output")


def extra_metrics(records: list[RequestRecord], max_concurrency: int) -> dict[str, float | None]:
    """Prefill and decode rates from the records.

    prefill_tok_s: input tokens / time until the last request had its first token, from the first start
    (batch 1: the sum of TTFTs, sampling of the first token included); decode_tok_s: tokens after the
    first / time spent producing them, per request summed (batch 1: 1 / mean TPOT, weighted)."""
    ok = [r for r in records if r.success]
    if not ok:
        return {"prefill_tok_s": None, "decode_tok_s": None}
    total_in = sum(r.prompt_len for r in ok)
    if max_concurrency == 1:
        prefill_s = sum(r.ttft for r in ok)
    else:
        prefill_s = max(r.start_time + r.ttft for r in ok) - min(r.start_time for r in ok)
    decode_tokens = sum(r.output_len - 1 for r in ok)
    decode_s = sum(r.e2el - r.ttft for r in ok)
    per_seq = decode_tokens / decode_s if decode_s > 0 else None
    return {"prefill_tok_s": total_in / prefill_s if prefill_s > 0 else None,
            "decode_tok_s_per_seq": per_seq,
            "decode_tok_s": per_seq if max_concurrency == 1 else None}


def to_result(out: dict[str, Any], args: argparse.Namespace, spec: InprocSpec, percentiles: tuple[float, ...],
              slos: dict[str, float], cmd: list[str], export_s: float, log_path: Path) -> dict[str, Any]:
    """The worker's output as one `tinyserve bench serve` result dict (plus the peer block)."""
    from .env_info import git_commit, machine_info
    from .serve_bench import RESULT_SCHEMA

    records = [RequestRecord.from_dict(r) for r in out["records"]]
    metrics = compute_metrics(records, float(out["duration_s"]), percentiles, slos or None)
    conc = int(out.get("max_concurrency") or len(records))
    config = {
        "dataset": args.dataset, "num_prompts": args.num_prompts, "num_requests": len(records),
        "request_rate": "inf", "burstiness": None, "max_concurrency": conc, "ignore_eos": True,
        "max_tokens": args.max_tokens, "temperature": 0.0, "seed": args.seed, "percentiles": list(percentiles),
        "goodput_slos_ms": slos, "tokenizer": args.tokenizer or "bundled:SmolLM2-135M-Instruct", "timed_out": False,
        "dataset_args": {k: v for k, v in vars(args).items()
                         if k.startswith(("random_", "shared_", "sharegpt_", "multi_turn_", "num_prefixes"))},
    }
    m = {**metrics.to_dict(), **extra_metrics(records, conc)}
    return {"schema": RESULT_SCHEMA, "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "label": spec.name, "git": git_commit(), "machine": machine_info(),
            "server": {"base_url": None, "model": args.model, "endpoint": "in-process"},
            "config": config, "metrics": m, "requests": [r.to_dict() for r in records],
            "peer": {"name": spec.name, "mode": "in-process", "note": NOTE, "command": cmd, "weights": spec.weights,
                     "model_dir": str(spec.model_dir), "export_command": spec.export_cmd,
                     "export_s": round(export_s, 1), "load_s": out.get("load_s"), "versions": out.get("versions"),
                     "settings": out.get("settings"), "env": spec.env, "log": str(log_path),
                     **({"ov_metrics": out["ov_metrics"]} if "ov_metrics" in out else {})}}


def inproc_concurrencies(name: str, concurrencies: list[int | None]) -> list[int | None]:
    """The concurrency points to measure: ortgenai only ever runs one at a time (once, as concurrency 1)."""
    if name == "ortgenai":
        return [1]
    return list(dict.fromkeys(concurrencies))


def run_inproc_peer(name: str, args: argparse.Namespace, hf_dir: Path, workload: Callable[[], list], tokenizer: Any,
                    log_dir: Path, stamp: str, console: Any) -> dict[str, Any]:
    """Export if needed, run the worker for each concurrency point; the outcome dict `peers.run_peers` keeps.
    `workload()` gives the sampled requests (called only when the peer can run)."""
    from .metrics import parse_goodput
    from .serve_bench import parse_percentiles, sweep_points

    spec = build_inproc_spec(args, name, hf_dir)
    if spec.missing:
        console.print(f"[yellow]peer {name}: skipped: {spec.missing}[/yellow]")
        return {"status": "skipped", "message": spec.missing}
    log_path = log_dir / f"peer-{name}-{stamp}.log"
    outcome: dict[str, Any] = {"status": "ok", "runs": [], "startup_s": [], "weights": spec.weights,
                               "env": spec.env, "log": str(log_path), "mode": "in-process"}
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        if not exported(spec):
            console.print(f"peer {name}: exporting the model: {shlex.join(spec.export_cmd)}")
        export_s = export_model(spec, log_path, args.inproc_timeout)
        if name == "ortgenai":
            _ortgenai_threads(spec.model_dir / "genai_config.json", args.threads)
        percentiles, slos = parse_percentiles(args.percentiles), parse_goodput(args.goodput)
        concs = inproc_concurrencies(name, [c for _, c in sweep_points(args.request_rate, args.max_concurrency)])
        reqs = worker_requests(workload(), tokenizer)
        if args.max_tokens:
            for r in reqs:
                r["output_len"] = args.max_tokens
        with tempfile.TemporaryDirectory(prefix=f"tinyserve-{name}-") as tmp:
            req_path = Path(tmp) / "requests.json"
            req_path.write_text(json.dumps({"requests": reqs}))
            for conc in concs:
                cmd = worker_command(spec, args, req_path, conc)
                console.rule(f"peer {name} (in-process, {conc or 'all'} in flight): {shlex.join(cmd)}")
                t0, load0 = time.monotonic(), _loadavg()
                with open(log_path, "ab") as log:
                    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                                          env={**os.environ, **spec.env}, timeout=args.inproc_timeout)
                stdout = proc.stdout.decode(errors="replace")
                if proc.returncode != 0:
                    raise RuntimeError(f"worker exited with status {proc.returncode}; log {log_path}:\n"
                                       f"{_tail(log_path)}")
                out = parse_worker_output(stdout)
                run = to_result(out, args, spec, percentiles, slos, cmd, export_s, log_path)
                # the 1-min load average around the run: above --threads, something else shared the cores
                run["peer"]["loadavg_1m"] = {"before": load0, "after": _loadavg()}
                outcome["startup_s"].append(out.get("load_s"))
                m = run["metrics"]
                console.print(f"peer {name}: {m['completed']} requests in {time.monotonic() - t0:.1f} s; "
                              f"output {m['output_throughput']:.1f} tok/s, prefill {_fmt(m['prefill_tok_s'])} tok/s, "
                              f"TTFT mean {m['ttft_mean_ms']:.1f} ms, TPOT mean {m['tpot_mean_ms']:.2f} ms")
                outcome["runs"].append(run)
    except Exception as e:  # noqa: BLE001 - one broken peer must not stop the others
        outcome.update(status="failed", message=f"{type(e).__name__}: {e}")
        console.print(f"[red]peer {name}: {outcome['message']}[/red]")
    return outcome


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def prepare(argv: list[str] | None = None) -> int:
    """`python -m tinyserve_lab.inproc_peers prepare NAME... [--hf-dir D] [--peers-dir P] [...]`: export the
    models ahead of time (scripts/install_peers.sh); the exit status is the number of failures."""
    p = argparse.ArgumentParser(prog="python -m tinyserve_lab.inproc_peers prepare")
    p.add_argument("names", nargs="+", choices=INPROC_PEERS)
    p.add_argument("--hf-dir", default=None, help="default: the fp32 export of the bundled GGUF")
    p.add_argument("--peers-dir", default=str(DEFAULT_PEERS_DIR))
    p.add_argument("--threads", type=int, default=2)
    add_inproc_args(p.add_argument_group("inproc"))
    args = p.parse_args(argv)
    if args.hf_dir:
        hf_dir = Path(args.hf_dir)
    else:
        from tinyserve.models.gguf import export_gguf
        from tinyserve.models.loader import bundled_gguf_path

        hf_dir = export_gguf(bundled_gguf_path())
    failures = 0
    for name in args.names:
        spec = build_inproc_spec(args, name, hf_dir)
        if spec.missing:
            print(f"{name}: {spec.missing}", file=sys.stderr)
            failures += 1
            continue
        log_path = Path(args.peers_dir) / "logs" / f"{name}-export.log"
        try:
            s = export_model(spec, log_path, args.inproc_timeout)
            print(f"{name}: {f'exported in {s:.0f} s' if s else 'already exported'}: {spec.model_dir}")
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            print(f"{name}: {e}", file=sys.stderr)
            failures += 1
    return failures


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "prepare":
        sys.exit(prepare(sys.argv[2:]))
    print(__doc__)
    sys.exit(2)
