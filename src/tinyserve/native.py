"""Our native CPU kernels: each C++ source is compiled once per machine and loaded from a cache.

A kernel is built for this CPU (-march=native: the source picks its vector path at compile time)
into the tinyserve cache, in a directory keyed by the source text, the flags, the CPU and the torch
version, so a later start only loads the shared object (milliseconds, without asking ninja, which
would rebuild when the same source sits at another path) and a change to any of them builds afresh.
The build needs a C++ compiler and torch's headers; callers decide what to do without one (every
kernel here has a slower fallback).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tinyserve.system import cache_dir, cpu_flags, cpu_model

log = logging.getLogger(__name__)
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-ffast-math")


# Headers our kernels share (tinyserve/csrc): part of every kernel's key, so a change to one rebuilds them.
SHARED = Path(__file__).parent / "csrc"


def build_dir(source: Path, cflags: tuple[str, ...] = CFLAGS) -> Path:
    """Where `source`'s shared object for this machine lives (the key names everything it depends on)."""
    headers = [h.read_text() for h in sorted(SHARED.glob("*.h"))]
    key = "|".join([source.read_text(), *headers, " ".join(cflags), cpu_model(), " ".join(sorted(cpu_flags())),
                    torch.__version__])
    return cache_dir() / "ext" / f"{source.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


# One build of a source at a time (a background one, then the caller that waits on it); two sources
# build at once, each compiler on a core of its own.
_building: dict[Path, threading.Lock] = {}
_locks = threading.Lock()


def load_kernel(source: Path, cflags: tuple[str, ...] = CFLAGS) -> Path:
    """Build (once per machine) and load `source`, whose TORCH_LIBRARY blocks register its ops under
    torch.ops. Raises RuntimeError, in one line, when it cannot be built. Returns the build directory.
    Waits for a build of it already under way (`build_in_background`)."""
    with _locks:
        lock = _building.setdefault(source, threading.Lock())
    with lock:
        return _load(source, cflags)


class NativeOps:
    """The ops one kernel source registers: built and loaded on first use, their fake (shape-only)
    implementations registered once per process (torch.export traces through them; a fake may be
    registered only once). `available()` is False, with one warning naming what runs `instead`,
    where the kernel cannot be built."""

    def __init__(self, source: Path, fakes: dict[str, Callable[..., Any]], instead: str) -> None:
        self.source, self.fakes, self.instead = source, fakes, instead
        self._available: bool | None = None
        self._loaded = False

    def load(self) -> None:
        if not self._loaded:
            load_kernel(self.source)
            for name, fake in self.fakes.items():
                torch.library.register_fake(name)(fake)
            self._loaded = True

    @property
    def loaded(self) -> bool:
        """Built and loaded already (asking never starts a build)."""
        return self._loaded

    def available(self) -> bool:
        if self._available is None:
            try:
                self.load()
                self._available = True
            except RuntimeError as e:
                log.warning("%s: %s", e, self.instead)
                self._available = False
        return self._available

    def forget(self) -> None:
        """Ask again on the next `available()` (tests)."""
        self._available = None


def build_in_background(source: Path) -> None:
    """Start building `source` on a thread, so the compiler (a child process: another core) overlaps
    loading the model; `load_kernel` later takes the result. A failure is left for that call to report.
    What the build imports is imported here first: two threads importing at once can trip Python's
    import-deadlock detection, which hands one of them a half-initialized module (seen: transformers)."""
    if not _built(source, CFLAGS).is_file():
        _build_tools()

    def build() -> None:
        with contextlib.suppress(RuntimeError):
            load_kernel(source)

    threading.Thread(target=build, name=f"build-{source.stem}", daemon=True).start()


def _built(source: Path, cflags: tuple[str, ...]) -> Path:
    return build_dir(source, cflags) / f"tinyserve_{source.stem}.so"


def _build_tools() -> Any:
    """torch's extension builder, with the ninja wheel's binary on PATH (the venv's bin/ is not always)."""
    from torch.utils import cpp_extension

    try:
        import ninja

        os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
    except ImportError:
        pass
    return cpp_extension


@functools.cache  # per process; a failure is not cached (raised), so a later call tries again
def _load(source: Path, cflags: tuple[str, ...]) -> Path:
    out = build_dir(source, cflags)
    built = _built(source, cflags)
    if built.is_file():  # the directory's key names everything it depends on: load it as it is
        try:
            torch.ops.load_library(str(built))
            return out
        except OSError as e:  # damaged: build it again
            log.warning("could not load %s (%s): building it again", built, e)
    cpp_extension = _build_tools()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        cpp_extension.load(name=f"tinyserve_{source.stem}", sources=[str(source)], extra_cflags=list(cflags),
                           extra_ldflags=["-fopenmp"], build_directory=str(out), is_python_module=False)
    except Exception as e:  # no compiler, no headers, a build error: say so, in one line
        raise RuntimeError(f"cannot build {source.name} ({type(e).__name__}: {e})") from e
    log.info("%s ready in %.1fs (%s)", source.name, time.perf_counter() - start, out)
    return out
