"""Runs a test module's Triton kernels in a child process: under Triton's interpreter, or on a GPU.

The project's venv keeps triton out of sight: torch's CPU build would find it and import it on every
start (the Makefile installs it with --target into .venv/triton-interp instead, a folder no one
imports from). So a test module that needs it is also a script: the child runs it with that folder
on PYTHONPATH and TRITON_INTERPRET=1 (kernels on CPU tensors, no GPU or compiler needed); it
evaluates every case and prints one JSON line, {case id: a number, or the error's text}; the tests
in this process assert each case's number. Without the folder they skip.
TINYSERVE_TRITON_DEVICE=cuda runs the same cases compiled for the GPU instead (CUDA builds of torch
ship triton): what a machine with one should check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

TRITON_DIR = Path(os.environ.get("TINYSERVE_TRITON_DIR", Path(sys.prefix) / "triton-interp"))
DEVICE = os.environ.get("TINYSERVE_TRITON_DEVICE", "cpu")  # where the child's cases put their tensors


def kernel_results(script: str) -> dict[str, float | str]:
    """The results `script` prints when run as the child (skips when triton is absent)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if DEVICE == "cpu":
        if not (TRITON_DIR / "triton").is_dir():
            pytest.skip(f"triton is not installed in {TRITON_DIR} (`make install` puts it there; "
                        "TINYSERVE_TRITON_DIR names another folder)")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(TRITON_DIR)) if p)
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode:
        pytest.fail(f"the kernels' child process failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(cases: Iterable[tuple[str, Callable[[], float]]]) -> None:
    """The child's side: evaluate each (id, check) and print the results as one JSON line."""
    results: dict[str, float | str] = {}
    for name, check in cases:
        try:
            results[name] = check()
        except Exception:
            results[name] = traceback.format_exc()
    print(json.dumps(results))


def assert_within(results: dict[str, float | str], name: str, tol: float) -> None:
    got = results[name]
    if isinstance(got, str):
        pytest.fail(got)
    assert got <= tol, f"{name}: error {got:.3g} above {tol:.3g}"
