"""What boxvold's settings change in the running daemon, at start and on SIGHUP.

``apply_live`` is the one place a live setting (``config.KEYS`` with ``live``) reaches the
objects it governs: the root logger's level, the reserve's size, the default cache modes of
new exports. ``serve_reloads`` waits for SIGHUP, re-reads the config file (with the same
command line and environment, which still take precedence), logs every change, applies the
live ones and logs the others as taking effect at the next start. A file that no longer
parses changes nothing: the error is logged and the running settings stay.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable

import trio

from volumed import errors
from volumed.api import Service
from volumed.config import Config, applied, changes
from volumed.reserve import Reserve

log = logging.getLogger(__name__)


def apply_live(service: Service, settings: Config) -> None:
    """Make the live settings of ``settings`` those of ``service`` (no I/O: the reserve's new
    size is brought about by ``resize_reserve``; the log level is the process's, set by
    ``daemon.run`` and ``reload_once``)."""
    service.exports.default_cache = settings.export_cache
    service.exports.virtiofsd_cache = settings.virtiofsd_cache
    service.store.reserve.target_bytes = settings.reserve_bytes


def resize_reserve(reserve: Reserve) -> None:
    """Blocking: bring the reserve file to its (new) target size: a larger one is released
    first (no partial shrink), then restored if the host can spare it."""
    if reserve.state().present_bytes > reserve.target_bytes or reserve.target_bytes == 0:
        reserve.release()
    if reserve.target_bytes:
        reserve.restore()


async def reload_once(service: Service, current: Config, load: Callable[[], Config]) -> Config:
    """Re-read the settings with ``load`` and apply what can change live; returns the
    settings now in force (``current`` if the file is broken)."""
    try:
        wanted = await trio.to_thread.run_sync(load)
    except errors.BoxvolError as exc:
        log.error("config reload failed, keeping the running config: %s", exc.message)
        return current
    found = changes(current, wanted)
    for change in found:
        if change.live:
            log.info("config changed key=%s old=%r new=%r", change.key, change.old, change.new)
        else:
            log.warning(
                "config changed key=%s old=%r new=%r: takes effect at the next start",
                change.key,
                change.old,
                change.new,
            )
    now = applied(current, found)
    logging.getLogger().setLevel(now.log_level)
    apply_live(service, now)
    if now.reserve_bytes != current.reserve_bytes:
        await service.write(resize_reserve, service.store.reserve)
    log.info("config reloaded changes=%d", len(found))
    log.debug("config in force: %s", now)
    return now


async def serve_reloads(
    service: Service,
    current: Config,
    load: Callable[[], Config],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Reload the settings at every SIGHUP until cancelled (one reload at a time; signals
    that come during one are coalesced by trio)."""
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        task_status.started()
        async for _ in signals:
            log.info("config reload asked signal=SIGHUP")
            current = await reload_once(service, current, load)
