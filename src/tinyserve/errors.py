"""Errors that cross the engine's parts: raised deep down (a worker, a device), handled by the step loop."""

from __future__ import annotations


class EngineFatalError(RuntimeError):
    """The engine cannot go on (a lost device, a lost tensor-parallel worker, a corrupted pool): raised
    from a step, it stops the step loop instead of failing requests one by one forever, so that a
    supervisor restarts the process."""
