"""The FUSE worker pool: results, errors, its bound, and cancellation that never loses a
result (an fd) once a call has started."""

from __future__ import annotations

import threading
import time

import pytest
import trio
import trio.testing

from volumed.fs.workers import WorkerPool


async def test_results_errors_and_bound() -> None:
    pool = WorkerPool(2)
    assert await pool.run(lambda a, b: a + b, 2, 3) == 5
    with pytest.raises(ZeroDivisionError):
        await pool.run(lambda: 1 / 0)
    peak = 0
    running = 0
    lock = threading.Lock()

    def slow(i: int) -> int:
        nonlocal peak, running
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.05)
        with lock:
            running -= 1
        return i

    results: list[int] = []

    async def one(i: int) -> None:
        results.append(await pool.run(slow, i))

    async with trio.open_nursery() as nursery:
        for i in range(6):
            nursery.start_soon(one, i)
    assert sorted(results) == list(range(6))
    assert peak == 2
    assert pool.running == 0


async def test_cancel_waiting_never_runs_started_is_delivered() -> None:
    pool = WorkerPool(1)
    gate = threading.Event()
    ran: list[str] = []
    got: list[str] = []
    scopes: dict[str, trio.CancelScope] = {}

    def blocked() -> str:
        gate.wait()
        return "fd-42"

    async def first() -> None:
        with trio.CancelScope() as scope:
            scopes["first"] = scope
            got.append(await pool.run(blocked))
            got.append("after")  # a cancel lands only at the next checkpoint
            await trio.lowlevel.checkpoint()
            got.append("not reached")

    async def second() -> None:
        with trio.CancelScope() as scope:
            scopes["second"] = scope
            await pool.run(lambda: ran.append("second"))
        got.append("second cancelled" if scope.cancelled_caught else "second ran")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(first)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(second)
        await trio.testing.wait_all_tasks_blocked()
        scopes["second"].cancel()
        scopes["first"].cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert got == ["second cancelled"]
        gate.set()
    assert got == ["second cancelled", "fd-42", "after"]
    assert ran == []
    assert pool.running == 0
