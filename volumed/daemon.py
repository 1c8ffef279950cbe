"""boxvold: the service process. Opens the store, reconciles it, and serves the API.

Start-up order: take the home's lock, open and reconcile the store, bind the socket,
serve, then tell systemd READY=1. Teardown runs in reverse through one AsyncExitStack.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import functools
import grp
import logging
import os
import resource
import signal
import socket
import stat
import sys
from collections.abc import Callable, Iterator, Sequence

import trio

from volumed import __version__, errors, host_namespace, locations
from volumed.activation import inherited_listener
from volumed.api import Service, create_app, takes_passed_fd
from volumed.config import Config, config_path, parse, read_file, resolve
from volumed.daemon_options import add_daemon_options, default_vhost_group
from volumed.export_manager import ExportManager
from volumed.exports import DEFAULT_CACHE
from volumed.http_server import HttpServer, ServerLimits
from volumed.reload import apply_live, serve_reloads
from volumed.reserve import DEFAULT_RESERVE_BYTES
from volumed.store import VolumeStore
from volumed.unix_sockets import bind_private, check_socket_path
from volumed.virtiofsd import find_virtiofsd

log = logging.getLogger(__name__)

SOCKET_MODE = 0o660
RUNTIME_DIR_MODE = 0o755


@dataclasses.dataclass(frozen=True)
class DaemonConfig:
    """Where boxvold keeps things and who may talk to it."""

    home: str
    runtime_dir: str
    #: Group that owns the API socket (mode 0660); None keeps the daemon's own group.
    socket_group: str | None = None
    #: Group QEMU runs with: it owns the vhost-user sockets of virtio-fs exports.
    vhost_group: str | None = None
    #: Bounds of the API server (connections, deadlines, body size).
    limits: ServerLimits = dataclasses.field(default_factory=ServerLimits)
    #: Bytes kept preallocated in the home for recovering a full disk (volumed.reserve).
    reserve_bytes: int = DEFAULT_RESERVE_BYTES
    log_level: str = "INFO"
    #: The virtiofsd binary; None lets boxvold pick one.
    virtiofsd: str | None = None
    #: virtiofsd's --cache for new virtio-fs exports.
    virtiofsd_cache: str = "auto"
    #: Cache mode of new exports whose request names none.
    export_cache: str = DEFAULT_CACHE
    #: Re-reads the settings (config file, same options and environment) at SIGHUP; None:
    #: no reloads (a daemon served in-process by tests).
    reload: Callable[[], Config] | None = dataclasses.field(default=None, compare=False)

    @classmethod
    def from_settings(
        cls, settings: Config, reload: Callable[[], Config] | None = None
    ) -> DaemonConfig:
        """The daemon configuration of resolved ``settings`` (``config.resolve``)."""
        assert settings.home is not None and settings.runtime_dir is not None
        return cls(
            home=settings.home,
            runtime_dir=settings.runtime_dir,
            socket_group=settings.socket_group,
            vhost_group=settings.vhost_group,
            reserve_bytes=settings.reserve_bytes,
            log_level=settings.log_level,
            virtiofsd=settings.virtiofsd,
            virtiofsd_cache=settings.virtiofsd_cache,
            export_cache=settings.export_cache,
            reload=reload,
        )

    @property
    def settings(self) -> Config:
        """The settings this configuration was made of (what a reload compares against)."""
        return Config(
            home=self.home,
            runtime_dir=self.runtime_dir,
            socket_group=self.socket_group,
            vhost_group=self.vhost_group,
            log_level=self.log_level,
            reserve_bytes=self.reserve_bytes,
            virtiofsd=self.virtiofsd,
            virtiofsd_cache=self.virtiofsd_cache,
            export_cache=self.export_cache,
        )

    @property
    def socket_path(self) -> str:
        """The API socket."""
        return os.path.join(self.runtime_dir, locations.SOCKET_NAME)


@contextlib.contextmanager
def hold_home_lock(home: str) -> Iterator[None]:
    """Hold ``<home>/boxvold.lock`` so two daemons never share a home."""
    path = os.path.join(home, "boxvold.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise errors.AlreadyServing(
                f"another boxvold (pid {holder}) already serves the home {home}; stop it, or "
                "give this one another home with --home"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def bind_api_socket(path: str, group: str | None) -> socket.socket:
    """Bind the API socket at ``path`` (0660, group ``group``), replacing a stale one."""
    check_socket_path(path, "API socket")
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise errors.AlreadyServing(
                f"{path} exists and is not a socket; move it away or use another --runtime-dir"
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale: left by a daemon that died
        else:
            raise errors.AlreadyServing(
                f"another boxvold is answering on {path}; stop it or use another --runtime-dir"
            )
        finally:
            probe.close()
    sock = bind_private(path, SOCKET_MODE)
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            sock.close()
            os.unlink(path)
            raise errors.InvalidArgument(
                f"no group {group!r} on this host; create it or give another --socket-group"
            ) from None
        os.chown(path, -1, gid)
    sock.listen(512)
    sock.setblocking(False)
    return sock


def notify_systemd(message: str) -> None:
    """Send ``message`` (e.g. ``READY=1``) to systemd if it started us with NOTIFY_SOCKET."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(message.encode(), address)
        except OSError as exc:
            log.warning("sd_notify failed message=%s error=%s", message, exc)


async def serve_boxvold(
    config: DaemonConfig,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run boxvold until cancelled (or SIGTERM/SIGINT); reports the socket path once serving."""
    async with contextlib.AsyncExitStack() as stack:
        os.makedirs(config.home, mode=0o700, exist_ok=True)
        os.makedirs(config.runtime_dir, mode=RUNTIME_DIR_MODE, exist_ok=True)
        stack.enter_context(hold_home_lock(config.home))
        # Decided (and logged) once, before the first mount: see volumed.host_namespace.
        await trio.to_thread.run_sync(host_namespace.command_prefix)
        store = await trio.to_thread.run_sync(
            functools.partial(VolumeStore.open, config.home, reserve_bytes=config.reserve_bytes)
        )
        stack.callback(store.close)
        reconciled = await trio.to_thread.run_sync(store.reconcile)
        await trio.to_thread.run_sync(store.reserve.restore)

        vhost_gid = _group_id(config.vhost_group)
        service = Service(
            store,
            reconciled,
            lambda writer: ExportManager(
                store,
                config.runtime_dir,
                writer,
                vhost_gid=vhost_gid,
                virtiofsd=functools.partial(find_virtiofsd, config.virtiofsd),
            ),
        )
        apply_live(service, config.settings)

        listener = inherited_listener(config.socket_path)
        if listener is None:
            listener = bind_api_socket(config.socket_path, config.socket_group)
            stack.callback(_unlink_quietly, config.socket_path)
        elif config.socket_group is not None:
            log.warning(
                "socket_group=%s ignored: the socket came from systemd, whose SocketGroup= "
                "(boxvold.socket) decides who may use it",
                config.socket_group,
            )
        # Else systemd's boxvold.socket owns the path and keeps listening after we stop.
        stack.callback(listener.close)

        server = HttpServer(
            create_app(service),
            fit_limits(config.limits),
            unqueued=UNQUEUED_PATHS,
            takes_fd=takes_passed_fd,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(service.exports.serve)
            if config.reload is not None:
                await nursery.start(serve_reloads, service, config.settings, config.reload)
            await nursery.start(server.serve, listener)
            log.info(
                "boxvold serving version=%s socket=%s home=%s volumes=%d reconciled=%d",
                __version__,
                config.socket_path,
                store.layout.home,
                len(store.registry.all()),
                len(reconciled),
            )
            notify_systemd("READY=1")
            task_status.started(config.socket_path)
            await trio.sleep_forever()


#: Answered even while the API is saturated: what probes and operators ask first.
UNQUEUED_PATHS = frozenset({"/v1/health", "/v1/version"})

#: File descriptors kept for everything but API connections: the registry, volume roots,
#: FUSE inodes and open files, vhost-user sockets, pipes to virtiofsd.
RESERVED_FDS = 4096


def fit_limits(limits: ServerLimits) -> ServerLimits:
    """``limits`` with the connection bound fitted to the fds this process may open.

    Raises the soft RLIMIT_NOFILE to the hard one first (systemd's default soft limit is
    1024, its hard limit far higher; LimitNOFILE= in the unit sets both). A bound that still
    does not fit is lowered, with a warning, so connections never take the fds FUSE needs.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d: %s", soft, exc)
    room = max(soft - RESERVED_FDS, soft // 2)
    if limits.max_connections <= room:
        return limits
    log.warning(
        "api connections bounded to %d (not %d): the open-file limit is %d; raise "
        "LimitNOFILE= to serve more",
        room,
        limits.max_connections,
        soft,
    )
    return dataclasses.replace(limits, max_connections=room)


def _group_id(name: str | None) -> int | None:
    if name is None:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise errors.InvalidArgument(
            f"no group {name!r} on this host; give the group QEMU runs with (--vhost-group)"
        ) from None


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


async def _run_until_signalled(config: DaemonConfig) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_boxvold, config)
            async for signum in signals:
                log.info("boxvold stopping signal=%s", signal.Signals(signum).name)
                notify_systemd("STOPPING=1")
                nursery.cancel_scope.cancel()
                break


def build_parser() -> argparse.ArgumentParser:
    """Options of ``boxvold``."""
    parser = argparse.ArgumentParser(prog="boxvold", description="Serve managed volumes.")
    add_daemon_options(parser)
    return parser


def load_settings(args: argparse.Namespace) -> Config:
    """Blocking: the settings in force: each from the command line, else the environment,
    else the config file (``--config``, BOXVOL_CONFIG or /etc/boxvol/boxvold.toml), else the
    default. Raises InvalidArgument naming the file, key and reason of a bad setting."""
    env = os.environ
    path, explicit = config_path(args.config, env)
    file_values = parse(read_file(path, explicit=explicit), path)
    settings = resolve(file_values, env, vars(args), os.geteuid())
    if settings.vhost_group is None:
        settings = dataclasses.replace(settings, vhost_group=default_vhost_group())
    return settings


def config_from_args(args: argparse.Namespace) -> DaemonConfig:
    """The daemon configuration the parsed options and the config file ask for; it re-reads
    them (``reload``) on SIGHUP."""
    return DaemonConfig.from_settings(
        load_settings(args), reload=functools.partial(load_settings, args)
    )


def run(args: argparse.Namespace) -> int:
    """Run the daemon in the foreground; returns the process exit code (2: a bad setting,
    whose one-line message names the file, key and reason)."""
    try:
        config = config_from_args(args)
    except errors.InvalidArgument as refused:
        sys.stderr.write(f"{refused.message}\n")
        return errors.EXIT_USAGE
    logging.basicConfig(
        level=config.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    log.debug("config in force: %s", config.settings)
    failed = False
    try:
        trio.run(_run_until_signalled, config)
    except* errors.BoxvolError as group:
        for exc in _leaves(group):
            log.error("%s", exc)
        failed = True
    except* PermissionError as group:
        for exc in _leaves(group):
            log.error("boxvold cannot use its directories: %s; check --home/--runtime-dir", exc)
        failed = True
    return 1 if failed else 0


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``boxvold``."""
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
