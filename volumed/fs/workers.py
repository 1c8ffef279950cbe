"""A bounded set of worker threads that run the FUSE edge's blocking calls.

Every FUSE request does its syscalls in one worker-thread call, so the cost of that handoff
is paid on every request. ``trio.to_thread.run_sync`` is general: a CapacityLimiter
acquired and released as an async context manager, a contextvars copy, a name set on the
OS thread with prctl before and after each call, a message queue for ``trio.from_thread``.
On a 2-core VM that came to about 100 us a call (and 50 with this pool). Here the handoff is
trio's own thread cache (``trio.lowlevel.start_thread_soon``) and one ``run_sync_soon``
back; the bound is a counter kept on the trio thread, so it needs no lock.

Semantics kept from ``to_thread.run_sync`` (with its default ``abandon_on_cancel=False``):
at most ``threads`` calls run at once, later ones wait in order; a call that has started is
never abandoned, so what it returns (an fd, say) always reaches its caller, which owns it.
A call still waiting for a thread can be cancelled and then never runs. Must not import
pyfuse3.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import outcome
import trio

T = TypeVar("T")


class _Call(Generic[T]):
    """One blocking call and the task waiting for it."""

    __slots__ = ("fn", "pool", "task", "token")

    def __init__(
        self,
        fn: Callable[[], T],
        task: trio.lowlevel.Task,
        token: trio.lowlevel.TrioToken,
        pool: WorkerPool,
    ) -> None:
        self.fn = fn
        self.task = task
        self.token = token
        self.pool = pool

    def deliver(self, result: outcome.Outcome[T]) -> None:
        """In the worker thread: hand the outcome to the trio thread (never blocks)."""
        try:
            self.token.run_sync_soon(self.pool._finished, self.task, result)
        except trio.RunFinishedError:
            # Only if the run ended without waiting for its tasks (the process is going
            # away): nobody is left to hand it to.
            pass


class WorkerPool:
    """Runs blocking calls in at most ``threads`` threads at once, for the trio loop.

    Attributes:
        threads: how many calls may run at once; the rest wait, first come first served.
    """

    threads: int
    _running: int
    _waiting: collections.deque[_Call[Any]]

    def __init__(self, threads: int) -> None:
        if threads < 1:
            raise ValueError("a worker pool needs at least one thread")
        self.threads = threads
        self._running = 0
        self._waiting = collections.deque()

    @property
    def running(self) -> int:
        """Calls in worker threads right now (for tests and diagnostics)."""
        return self._running

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a worker thread; its result, or what it raised.

        A checkpoint before the call starts; once it has started, cancellation waits for it.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        call = _Call(
            (lambda: fn(*args)) if args else fn,
            trio.lowlevel.current_task(),
            trio.lowlevel.current_trio_token(),
            self,
        )
        if self._running < self.threads:
            self._start(call)
        else:
            self._waiting.append(call)

        def abort(raise_cancel: object) -> trio.lowlevel.Abort:
            # Only a call that has not started may be given up: a started one may already
            # hold a new fd, which only its caller can take care of.
            try:
                self._waiting.remove(call)
            except ValueError:
                return trio.lowlevel.Abort.FAILED
            return trio.lowlevel.Abort.SUCCEEDED

        result: T = await trio.lowlevel.wait_task_rescheduled(abort)
        return result

    def _start(self, call: _Call[Any]) -> None:
        self._running += 1
        trio.lowlevel.start_thread_soon(call.fn, call.deliver)

    def _finished(self, task: trio.lowlevel.Task, result: outcome.Outcome[Any]) -> None:
        """On the trio thread: wake the caller, and give the freed slot to the next call."""
        self._running -= 1
        trio.lowlevel.reschedule(task, result)
        if self._waiting:
            self._start(self._waiting.popleft())
