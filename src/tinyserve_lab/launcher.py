"""Run `tinyserve serve` as a real child process on a free port: for tests and benchmarks that
must exercise the real server (sockets, signals, uvicorn) rather than an in-process app."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Self

import httpx


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerProcess:
    """`with ServerProcess(["--max-num-seqs", "4"]) as srv: httpx.get(srv.url + "/health")`."""

    def __init__(self, args: list[str] | None = None, host: str = "127.0.0.1", port: int | None = None,
                 startup_timeout: float = 180.0, env: dict[str, str] | None = None,
                 entry: list[str] | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.args = list(args or [])
        self.startup_timeout = startup_timeout
        self.env = {**os.environ, **(env or {})}
        self.entry = entry or [sys.executable, "-m", "tinyserve.server"]  # what runs `tinyserve serve ARGS`
        self.proc: subprocess.Popen | None = None
        # Kept open for the child's whole life (its stdout and stderr), closed in stop().
        self._log = tempfile.NamedTemporaryFile(prefix="tinyserve-server-", suffix=".log", delete=False)  # noqa: SIM115
        self.log_path = Path(self._log.name)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> Self:
        cmd = [*self.entry, "--host", self.host, "--port", str(self.port), *self.args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} during startup:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"server not healthy after {self.startup_timeout:.0f}s:\n{self.log_tail()}")

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait: the exit code (the server should exit 0 on its own)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()

    def log_tail(self, n: int = 60) -> str:
        if not self._log.closed:  # after stop() (a startup timeout) the child's output is all on disk
            self._log.flush()
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
