"""Where and from what code a benchmark ran, stored with every result so numbers stay comparable."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def command_line() -> str:
    """The command that started this process, as a person would retype it: `python -m MOD ARGS` for a module
    run, else the script's name and its arguments (a console script's absolute venv path dropped)."""
    orig = list(getattr(sys, "orig_argv", []))
    if "-m" in orig[1:-1]:
        module = orig[orig.index("-m", 1) + 1]
        return shlex.join(["python", "-m", module, *sys.argv[1:]])
    return shlex.join([Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python", *sys.argv[1:]])


def machine_info() -> dict[str, Any]:
    """CPU model, cores, this (client) process's torch threads, GPU name when one is visible, and the command
    line, so a result file says how it was made (docs/results/MANIFEST.md reads it back)."""
    info: dict[str, Any] = {
        "command": command_line(),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["client_torch_threads"] = torch.get_num_threads()
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # torch missing or broken must not stop a benchmark
        info["gpu"] = None
    return info


def git_commit(cwd: Path | None = None) -> dict[str, Any]:
    """HEAD commit and whether the tree is dirty, of the repo holding this file; None when not a repo."""
    where = str(cwd or Path(__file__).resolve().parent)

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "--no-optional-locks", "-C", where, *args],
                                 capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def run_header(schema: str, **extra: Any) -> dict[str, Any]:
    """What every result file starts with: schema, UTC date, machine and code version."""
    import datetime as dt

    return {"schema": schema, "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "machine": machine_info(), "git": git_commit(), **extra}


def save_json(result: dict[str, Any], result_dir: Path, stem: str) -> Path:
    """Write `<stem>-<UTC timestamp>.json` under result_dir, never overwriting an earlier run."""
    import datetime as dt
    import json
    import re

    result_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    name = f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', stem)}-{stamp}"
    path, n = result_dir / f"{name}.json", 1
    while path.exists():  # two runs within one second
        path, n = result_dir / f"{name}-{n}.json", n + 1
    path.write_text(json.dumps(result, indent=1))
    return path
