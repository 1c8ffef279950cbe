"""The lifecycle watcher of the libvirt driver: events, start-up reconcile, reconnection.

``watch`` runs until cancelled, in this order:

1. subscribe: the driver's connection gets a lifecycle callback and a close callback;
2. reconcile: every domain boxvold still exports to that no longer exists is released (it
   was undefined while nothing listened, or while the connection was down);
3. react: each lifecycle event is handled (an undefined domain is released) in a worker
   thread, one at a time, and reported through ``on_event``;
4. when libvirt closes the connection (libvirtd restarted or died, keepalive timed out), the
   connection is dropped and reopened with capped exponential backoff, each attempt logged,
   until libvirtd answers; then 1 and 2 again, so events missed meanwhile are caught up;
5. every ``reconcile_every`` seconds, 2 again: a release that failed (boxvold restarting
   when the domain went) is retried, so a volume is not left behind for good.

Subscribing comes before reconciling: a domain undefined during the reconcile is seen either
by it or as an event (at worst both; a second release finds nothing left).

Callbacks run on libvirt's event thread and only hand what they saw into a trio memory
channel; they never change state. Reactions and libvirt calls run in worker threads, so the
trio loop never blocks. Imports libvirt only through ``vmdriver.backends.libvirt``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import trio

from vmdriver.driver import LifecycleEvent
from volumed.errors import BoxvolError

if TYPE_CHECKING:
    from vmdriver.backends.libvirt import Subscription


class Watched(Protocol):
    """What the watcher drives: a libvirt connection's subscriptions (``uri``,
    ``subscribe``, ``unsubscribe``, ``close``) and the reactions to what it sees
    (``reconcile``, ``handle_lifecycle_event``); ``vmdriver.backends.libvirt.LibvirtDriver``."""

    uri: str

    def subscribe(
        self,
        on_lifecycle: Callable[[Any, Any, int, int, Any], None],
        on_close: Callable[[Any, int, Any], None],
        opaque: object,
    ) -> Subscription: ...

    def unsubscribe(self, subscription: Subscription) -> None: ...

    def close(self) -> None: ...

    def reconcile(self) -> list[LifecycleEvent]: ...

    def handle_lifecycle_event(self, name: str, uuid: str, event: int) -> LifecycleEvent: ...


log = logging.getLogger(__name__)

#: Reconnection backoff: the first attempt this long after the connection closed (libvirtd
#: needs a moment to come back), then doubling up to the cap, retried until it answers.
FIRST_RETRY_DELAY = 0.5
MAX_RETRY_DELAY = 30.0

#: Seconds between two periodic reconciles (a lookup per domain boxvold exports to).
RECONCILE_EVERY = 60.0

#: ``VIR_CONNECT_CLOSE_REASON_*`` values (stable in libvirt's ABI), for the log.
_CLOSE_REASONS = {0: "error", 1: "end of file", 2: "keepalive timeout", 3: "closed by client"}


@dataclasses.dataclass(frozen=True, slots=True)
class _Lost:
    """libvirt closed the connection of subscription number ``generation``."""

    generation: int
    reason: int


@dataclasses.dataclass(frozen=True, slots=True)
class _Tick:
    """Time for the periodic reconcile."""


@dataclasses.dataclass(frozen=True, slots=True)
class _Seen:
    """One lifecycle event as the callback saw it."""

    name: str
    uuid: str
    event: int


async def watch(
    driver: Watched,
    *,
    on_event: Callable[[LifecycleEvent], object] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    first_retry_delay: float = FIRST_RETRY_DELAY,
    max_retry_delay: float = MAX_RETRY_DELAY,
    reconcile_every: float = RECONCILE_EVERY,
) -> None:
    """Follow ``driver``'s libvirt connection until cancelled (see the module docstring).

    ``task_status.started()`` is called once the first subscription is in place and the
    start-up reconcile is done; a failure of either is raised (libvirtd or boxvold not
    reachable at start is an error for whoever starts the watcher). Later failures are logged
    and retried: a lost connection by reconnecting, a failed event reaction by going on.
    """
    send, receive = trio.open_memory_channel[_Seen | _Lost | _Tick](math.inf)
    token = trio.lowlevel.current_trio_token()

    def hand_over(item: _Seen | _Lost | _Tick) -> None:
        try:
            token.run_sync_soon(send.send_nowait, item)
        except trio.RunFinishedError:
            pass  # the watcher has returned; nobody is left to tell

    def on_lifecycle(_conn: Any, dom: Any, event: int, _detail: int, _opaque: Any) -> None:
        hand_over(_Seen(dom.name(), dom.UUIDString(), event))

    def on_close(_conn: Any, reason: int, generation: Any) -> None:
        hand_over(_Lost(int(generation), reason))

    generation = 0
    subscription: Subscription | None = await trio.to_thread.run_sync(
        driver.subscribe, on_lifecycle, on_close, generation
    )
    try:
        await _reconcile(driver, on_event, strict=True)
        task_status.started()
        tick_waiting = False

        async def ticker() -> None:
            nonlocal tick_waiting
            while True:
                await trio.sleep(reconcile_every)
                if not tick_waiting:  # one is enough however long a reconnection takes
                    tick_waiting = True
                    send.send_nowait(_Tick())

        async with trio.open_nursery() as nursery, receive:
            nursery.start_soon(ticker)
            async for item in receive:
                if isinstance(item, _Tick):
                    tick_waiting = False
                    await _reconcile(driver, on_event, strict=False)
                    continue
                if isinstance(item, _Seen):
                    await _react(driver, item, on_event)
                    continue
                if item.generation != generation:
                    continue  # a late word about a connection already replaced
                log.warning(
                    "the libvirt connection to %s closed (%s); reconnecting",
                    driver.uri,
                    _CLOSE_REASONS.get(item.reason, f"reason {item.reason}"),
                )
                old, subscription = subscription, None
                if old is not None:
                    await trio.to_thread.run_sync(_drop, driver, old)
                generation += 1
                subscription = await _resubscribe(
                    driver,
                    on_lifecycle,
                    on_close,
                    generation,
                    first_delay=first_retry_delay,
                    max_delay=max_retry_delay,
                )
                await _reconcile(driver, on_event, strict=False)
    finally:
        if subscription is not None:
            with trio.move_on_after(5, shield=True):
                await trio.to_thread.run_sync(driver.unsubscribe, subscription)


def _drop(driver: Watched, subscription: Subscription) -> None:
    """Forget a dead connection: callbacks off, connection closed (the driver opens a new
    one, with its device-removal callbacks, on next use)."""
    driver.unsubscribe(subscription)
    driver.close()


async def _resubscribe(
    driver: Watched,
    on_lifecycle: Callable[[Any, Any, int, int, Any], None],
    on_close: Callable[[Any, int, Any], None],
    generation: int,
    *,
    first_delay: float,
    max_delay: float,
) -> Subscription:
    """Reconnect and subscribe again, retrying with capped exponential backoff until it
    works; every attempt and every failure is logged."""
    delay = first_delay
    attempt = 0
    while True:
        await trio.sleep(delay)
        attempt += 1
        log.warning("reconnecting to libvirt at %s (attempt %d)", driver.uri, attempt)
        try:
            subscription = await trio.to_thread.run_sync(
                driver.subscribe, on_lifecycle, on_close, generation
            )
        except BoxvolError as exc:
            await trio.to_thread.run_sync(driver.close)
            delay = min(delay * 2, max_delay)
            log.warning(
                "reconnection attempt %d failed: %s; next attempt in %.1f s",
                attempt,
                exc.message,
                delay,
            )
            continue
        log.warning("reconnected to libvirt at %s (attempt %d)", driver.uri, attempt)
        return subscription


async def _reconcile(
    driver: Watched, on_event: Callable[[LifecycleEvent], object] | None, *, strict: bool
) -> None:
    """Run the driver's reconcile in a worker thread and report each release as an event.
    ``strict``: a failure (boxvold unreachable) is raised rather than logged."""
    try:
        events = await trio.to_thread.run_sync(driver.reconcile)
    except BoxvolError as exc:
        if strict:
            raise
        log.error("reconcile on %s failed (retried later): %s", driver.uri, exc.message)
        return
    for event in events:
        _report(event, on_event)


async def _react(
    driver: Watched, seen: _Seen, on_event: Callable[[LifecycleEvent], object] | None
) -> None:
    try:
        event = await trio.to_thread.run_sync(
            driver.handle_lifecycle_event, seen.name, seen.uuid, seen.event
        )
    except BoxvolError as exc:
        log.error("lifecycle event of %s: %s", seen.name, exc.message)
        return
    _report(event, on_event)


def _report(event: LifecycleEvent, on_event: Callable[[LifecycleEvent], object] | None) -> None:
    if on_event is not None:
        on_event(event)
