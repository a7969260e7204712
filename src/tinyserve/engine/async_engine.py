"""`AsyncEngine`: the step loop in one background thread, driven from asyncio.

`LLMEngine` is not thread-safe, so exactly one thread (the engine thread) ever touches it. The
HTTP side talks to that thread through a thread-safe command queue (add / abort / stop); the thread
drains the queue between steps and blocks on it when there is nothing to run, so an idle server
burns no CPU. Whatever a step produced goes back to each request's asyncio.Queue through
`loop.call_soon_threadsafe`, as immutable `RequestUpdate`s that carry only what is new (the
`SeqDelta`s of engine/output.py): the HTTP side never reads a `Sequence` the engine is mutating.

Nothing in the step loop waits on the network: a slow or vanished client only fills its own queue,
and an abort frees the request's KV blocks on the next pass through the loop.

An error in a pass through the loop fails what was in flight and the loop goes on; an
`EngineFatalError`, an error while failing them, or three failed passes in a row end it: every
request still in flight fails, `is_running` turns false, and `on_fatal` tells the server to exit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from tinyserve.engine.llm_engine import EngineStats, LLMEngine
from tinyserve.engine.output import DeltaTracker, SeqDelta
from tinyserve.engine.scheduler import QueueFullError
from tinyserve.engine.sequence import Sequence
from tinyserve.errors import EngineFatalError
from tinyserve.sampling import SamplingParams

log = logging.getLogger(__name__)

__all__ = [
    "AddedRequest",
    "AsyncEngine",
    "EngineDeadError",
    "EngineFatalError",
    "EngineStats",
    "QueueFullError",
    "RequestUpdate",
    "SeqDelta",
]


class EngineDeadError(RuntimeError):
    """The engine thread is not running (stopped, or never started)."""


@dataclass(frozen=True)
class RequestUpdate:
    request_id: str
    deltas: list[SeqDelta]
    finished: bool  # every sequence of the request has finished; no more updates follow
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # of the prompt, found in the prefix cache (set on the final update)
    first_token_time: float | None = None  # time.monotonic(), set on the final update
    finish_time: float | None = None


@dataclass(frozen=True)
class AddedRequest:
    request_id: str
    prompt_token_ids: list[int]


@dataclass
class _Tracker:
    """Engine-thread bookkeeping of one request: where its updates go, and what it has reported."""

    loop: asyncio.AbstractEventLoop
    sink: asyncio.Queue
    arrival: float
    reported: DeltaTracker = field(default_factory=DeltaTracker)


@dataclass
class _Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    tracker: _Tracker
    future: concurrent.futures.Future
    priority: int = 0


@dataclass
class _Abort:
    request_id: str


class _Stop:
    pass


@dataclass
class _Fatal:
    """Reported from another thread (a lost tensor-parallel rank): the loop cannot go on."""

    reason: str


class AsyncEngine:
    """Owns an `LLMEngine` and its step-loop thread; every public method is safe to call from asyncio."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._on_finish: Callable[[str, list[Sequence], float], None] | None = None
        self._on_step: Callable[[int], None] | None = None
        self._on_stats: Callable[[EngineStats], None] | None = None
        self._commands: queue.SimpleQueue[_Add | _Abort | _Stop | _Fatal] = queue.SimpleQueue()
        self._trackers: dict[str, _Tracker] = {}
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.fatal_error: BaseException | None = None  # what ended the step loop, if it died
        self.on_fatal: Callable[[BaseException], None] | None = None  # called on the engine thread as it dies
        self.stats = EngineStats()
        if engine.ranks is not None:  # a rank lost while idle ends the loop now, not at the next request
            engine.ranks.on_lost = lambda reason: self._commands.put(_Fatal(reason))

    def set_callbacks(
        self,
        on_finish: Callable[[str, list[Sequence], float], None] | None = None,
        on_step: Callable[[int], None] | None = None,
        on_stats: Callable[[EngineStats], None] | None = None,
    ) -> None:
        """`on_finish(request_id, seqs, arrival)` fires on the engine thread when a request ends
        (metrics); `on_step(num_new_tokens)` after each step; `on_stats` whenever the queues change."""
        self._on_finish, self._on_step, self._on_stats = on_finish, on_step, on_stats

    # -- lifecycle ------------------------------------------------------------------------------
    @classmethod
    def build(cls, make_engine: Callable[[], LLMEngine]) -> AsyncEngine:
        """Build the engine on the engine thread itself, then run its step loop there; returns once
        the engine is built (raising what building raised).

        Why: every thread that runs parallel torch ops gets its own OpenMP team, and with two teams
        on the machine's cores libgomp stops spin-waiting between parallel regions. A model loaded
        on one thread and stepped on another measured a 9.9 ms batch-1 decode step at 14.7 ms (EPYC,
        2 threads); built and stepped on one thread, the step is the offline one again (10.2 ms).
        The HTTP thread runs no torch ops at all."""
        built: concurrent.futures.Future[AsyncEngine] = concurrent.futures.Future()

        def run() -> None:
            try:
                ae = cls(make_engine())
            except BaseException as e:
                built.set_exception(e)
                return
            ae._thread = threading.current_thread()
            built.set_result(ae)
            ae._loop()

        threading.Thread(target=run, name="tinyserve-engine", daemon=True).start()
        return built.result()

    def start(self) -> None:
        """Start the step loop's thread (a no-op for an engine from `build`, whose loop is running)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="tinyserve-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Abort whatever is still in flight and join the thread (the current step finishes first)."""
        self._stopping.set()
        if self._thread is None:
            return
        self._commands.put(_Stop())
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("engine thread did not stop within %.0fs", timeout)
        self._thread = None

    @property
    def is_running(self) -> bool:
        return (self._thread is not None and self._thread.is_alive() and not self._stopping.is_set()
                and self.fatal_error is None)

    # -- the HTTP side's API (runs on the event loop) --------------------------------------------
    async def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams, sink: asyncio.Queue,
        priority: int = 0,
    ) -> AddedRequest:
        """Queue a request; its `RequestUpdate`s will arrive on `sink`.

        Raises what `LLMEngine.add_request` raises (ValueError for bad input, QueueFullError when
        the waiting queue is full) so the caller can answer 400 / 503."""
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        if params.structured_outputs is not None:  # compiled here, off the step loop, within a time limit
            await self.engine.grammars.compile_async(params.structured_outputs)
        loop = asyncio.get_running_loop()
        fut: concurrent.futures.Future = concurrent.futures.Future()
        tracker = _Tracker(loop=loop, sink=sink, arrival=time.monotonic())
        self._commands.put(_Add(request_id, prompt, params, tracker, fut, priority))
        return await asyncio.wrap_future(fut)

    def abort(self, request_id: str) -> None:
        """Abort a request (client gone); a no-op if it already finished. Thread-safe, never blocks."""
        self._commands.put(_Abort(request_id))

    async def generate(
        self, request_id: str, prompt: str | list[int], params: SamplingParams
    ) -> AsyncIterator[RequestUpdate]:
        """One request's updates until it finishes; leaving the loop early aborts the request."""
        sink: asyncio.Queue[RequestUpdate] = asyncio.Queue()
        await self.add_request(request_id, prompt, params, sink)
        finished = False
        try:
            while not finished:
                update = await sink.get()
                finished = update.finished
                yield update
        finally:
            if not finished:
                self.abort(request_id)

    # -- the engine thread ------------------------------------------------------------------------
    _MAX_FAILED_PASSES = 3  # in a row: the engine is wedged, not one request unlucky

    def _loop(self) -> None:
        try:
            self._run_loop()
        except BaseException as e:
            self._die(e)

    def _run_loop(self) -> None:
        assert self.engine.config.num_threads is not None  # resolved in EngineConfig.__post_init__
        torch.set_num_threads(self.engine.config.num_threads)  # per-thread in some torch builds
        log.info("engine loop started")
        failed_passes = 0
        while True:
            idle = not self.engine.has_unfinished()
            try:
                commands = [self._commands.get()] if idle else []  # sleep until there is work
                while True:
                    try:
                        commands.append(self._commands.get_nowait())
                    except queue.Empty:
                        break
                if any(isinstance(c, _Stop) for c in commands):
                    self._shutdown(commands)
                    return
                for cmd in commands:
                    if isinstance(cmd, _Fatal):
                        raise EngineFatalError(cmd.reason)
                for cmd in commands:
                    assert not isinstance(cmd, (_Stop, _Fatal))  # handled above
                    self._handle(cmd)
                if self.engine.has_unfinished():
                    seqs = self.engine.step()
                    self._emit(seqs)
                self._publish_stats()
                failed_passes = 0
            except EngineFatalError:
                raise
            except Exception as e:  # fail what was in flight, carry on
                failed_passes += 1
                if failed_passes >= self._MAX_FAILED_PASSES:
                    raise
                log.exception("engine loop error; failing %d request(s)", len(self._trackers))
                self._fail_all(f"internal error in the engine loop: {type(e).__name__}: {e}")

    def _die(self, error: BaseException) -> None:
        """The loop is over for good: say so, fail every request and pending add, tell the server."""
        self.fatal_error = error
        log.critical("the engine loop died: %s: %s", type(error).__name__, error, exc_info=error)
        try:
            self._fail_all(f"the engine failed and is stopping: {type(error).__name__}: {error}")
        except BaseException:
            log.exception("could not fail the requests in flight")
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(cmd, _Add) and cmd.future.set_running_or_notify_cancel():
                cmd.future.set_exception(EngineDeadError("the engine has failed"))
        if self.on_fatal is not None:
            self.on_fatal(error)

    def _handle(self, cmd: _Add | _Abort) -> None:
        if isinstance(cmd, _Abort):
            if cmd.request_id in self._trackers:
                self.engine.abort_request(cmd.request_id)
                self._finish_request(cmd.request_id, notify=True)
            return
        if not cmd.future.set_running_or_notify_cancel():
            return  # the caller went away before we got to it
        try:
            seqs = self.engine.add_request(cmd.request_id, cmd.prompt, cmd.params, cmd.priority)
        except (ValueError, QueueFullError) as e:
            cmd.future.set_exception(e)
            return
        except Exception as e:  # unexpected: still an answer, not a hang
            log.exception("add_request failed")
            cmd.future.set_exception(e)
            return
        self._trackers[cmd.request_id] = cmd.tracker
        cmd.future.set_result(AddedRequest(cmd.request_id, list(seqs[0].prompt_token_ids)))

    def _emit(self, seqs: list[Sequence]) -> None:
        touched: dict[str, None] = dict.fromkeys(s.request_id for s in seqs)
        new_tokens = 0
        for rid in touched:
            if rid not in self._trackers:
                continue
            all_seqs = self.engine.get_request(rid)
            deltas = self._trackers[rid].reported.deltas(all_seqs)
            new_tokens += sum(len(d.token_ids) for d in deltas)
            if all(s.finished for s in all_seqs):
                self._finish_request(rid, notify=False, last=deltas)
            elif deltas:
                self._send(rid, RequestUpdate(rid, deltas, finished=False))
        if self._on_step is not None:
            self._on_step(new_tokens)

    def _finish_request(self, rid: str, notify: bool, last: list[SeqDelta] | None = None) -> None:
        """Forget a finished (or aborted) request: final update to its sink, metrics, pop it."""
        tr = self._trackers.pop(rid)
        seqs = self.engine.get_request(rid)
        deltas = list(last or [])
        if notify:  # aborted here: report the sequences' end
            deltas += tr.reported.deltas(seqs)
        first = [s.first_token_time for s in seqs if s.first_token_time is not None]
        ends = [s.finish_time for s in seqs if s.finish_time is not None]
        self._send_to(tr, RequestUpdate(
            rid, deltas, finished=True,
            num_prompt_tokens=seqs[0].num_prompt_tokens if seqs else 0,
            num_cached_tokens=(seqs[0].num_cached_tokens or 0) if seqs else 0,
            first_token_time=min(first) if first else None,
            finish_time=max(ends) if ends else time.monotonic(),
        ))
        if self._on_finish is not None and seqs:
            try:
                self._on_finish(rid, seqs, tr.arrival)
            except Exception:
                log.exception("on_finish callback failed")
        self.engine.forget_request(rid)

    def _fail_all(self, message: str) -> None:
        for rid in list(self._trackers):
            try:
                self.engine.fail_request(rid, message)
                self._finish_request(rid, notify=True)
            except Exception:  # the engine's state is broken: its loop is about to give up (_MAX_FAILED_PASSES)
                log.exception("could not fail request %s cleanly", rid)
                self._trackers.pop(rid, None)

    def _shutdown(self, commands: list[Any]) -> None:
        for cmd in commands:
            if isinstance(cmd, _Add) and cmd.future.set_running_or_notify_cancel():
                cmd.future.set_exception(EngineDeadError("the server is shutting down"))
        for rid in list(self._trackers):
            self.engine.abort_request(rid)
            self._finish_request(rid, notify=True)
        self._publish_stats()
        self.engine.close()
        log.info("engine loop stopped")

    def _publish_stats(self) -> None:
        self.stats = self.engine.stats()
        if self._on_stats is not None:
            self._on_stats(self.stats)

    def _send(self, rid: str, update: RequestUpdate) -> None:
        self._send_to(self._trackers[rid], update)

    @staticmethod
    def _send_to(tr: _Tracker, update: RequestUpdate) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody is listening any more
            tr.loop.call_soon_threadsafe(tr.sink.put_nowait, update)
