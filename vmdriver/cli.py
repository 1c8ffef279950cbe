"""``boxvol vm``: prepare domains, attach and detach volumes, list attachments, watch.

    boxvol vm prepare DOMAIN [--spare-root-ports N]
    boxvol vm attach DOMAIN -v SPEC [-v SPEC ...] [--live] [--config] [--via direct|fuse]
    boxvol vm detach DOMAIN (TARGET ... | -v SPEC ... | --all) [--live] [--config] [--timeout S]
    boxvol vm ls DOMAIN [-q] [--format table|json]
    boxvol vm watch [--connect URI ...]  (releases ended VMs' volumes; docs/vm-watch.md)
    (every command takes --connect URI; the default is qemu:///system)

The URI's scheme picks the backend (docs/backends.md): ``qmp:///PATH`` is a QEMU process's
QMP socket and ``ch:///PATH`` a Cloud Hypervisor API socket, through
``vmdriver.attachments``; any other URI is libvirt's, through
``vmdriver.backends.libvirt``. Every ``-v`` spec is parsed before anything
else happens, and libvirt is imported only after that: a spec naming a host path
(``/host:/guest``) exits 2 without libvirt or boxvold ever being touched.

Exit codes as for the rest of ``boxvol``: 0 success, 1 a failed operation, 2 a usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, NoReturn, TextIO

from volumed import errors
from volumed.text import print_table, printable

if TYPE_CHECKING:
    from vmdriver.attachments import Attachments
    from vmdriver.backends.libvirt import LibvirtDriver
    from vmdriver.driver import Attachment, Scope
    from volumed.client import Client

EXIT_OK = errors.EXIT_OK
EXIT_FAILED = errors.EXIT_FAILED
EXIT_USAGE = errors.EXIT_USAGE
DEFAULT_URI = "qemu:///system"  # as vmdriver.backends.libvirt.DEFAULT_URI, without importing it
CONNECT_HELP = (
    f"the VMM to talk to (default {DEFAULT_URI}): a libvirt URI (qemu:///system), a QEMU "
    "process's QMP socket (qmp:///run/myvm/qmp.sock), a Cloud Hypervisor API socket "
    "(ch:///run/myvm/api.sock)"
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        sys.stderr.write(f"{self.prog}: error: {printable(message)}\n")
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    """The ``boxvol vm`` command line."""
    parser = _Parser(
        prog="boxvol vm",
        description="Attach boxvol volumes to VMs: libvirt domains (--connect qemu:///system), "
        "QEMU processes over QMP (--connect qmp:///run/myvm/qmp.sock) or Cloud Hypervisor "
        "(--connect ch:///run/myvm/api.sock).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def command(
        name: str, help_: str, *, domain: bool = True, many: bool = False
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        if domain:
            p.add_argument(
                "domain",
                metavar="DOMAIN",
                help="libvirt domain name; for qmp:// and ch://, the name boxvol records for it",
            )
        p.add_argument(
            "--connect",
            "-c",
            metavar="URI",
            action="append" if many else "store",
            default=None if many else DEFAULT_URI,
            help=CONNECT_HELP + ("; repeat to watch several" if many else ""),
        )
        return p

    def scope_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--live", action="store_true", help="affect the running guest")
        p.add_argument("--config", action="store_true", help="affect the persistent definition")

    p = command("prepare", "give a domain shared memory and hot-plug ports for virtio-fs")
    p.add_argument(
        "--spare-root-ports",
        type=int,
        default=None,
        metavar="N",
        help="free pcie-root-ports to keep on q35 machines (default 4)",
    )

    p = command("attach", "attach volumes (-v NAME:/guest[:ro], -v /guest for anonymous)")
    p.add_argument("-v", "--volume", dest="specs", action="append", default=[], metavar="SPEC")
    scope_options(p)
    p.add_argument(
        "--via",
        choices=["direct", "fuse"],
        default="direct",
        help="virtiofsd serves the volume directly (fastest) or boxvold's FUSE view",
    )

    p = command("detach", "detach volumes by tag or guest path; the export stops last")
    p.add_argument("targets", nargs="*", metavar="TARGET", help="tag or guest path")
    p.add_argument(
        "-v",
        "--volume",
        dest="specs",
        action="append",
        default=[],
        metavar="SPEC",
        help="detach what is mounted at this spec's guest path",
    )
    p.add_argument("--all", action="store_true", help="detach every boxvol volume")
    scope_options(p)
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="how long the guest gets to release a device (default 60)",
    )

    p = command("ls", "list a domain's boxvol attachments")
    p.add_argument("-q", "--quiet", action="store_true", help="only tags")
    p.add_argument("--format", choices=["table", "json"], default="table")

    command(
        "watch",
        "follow VM lifecycles; release the volumes of VMs that end (also of those that ended "
        "while no watcher ran, at start and after reconnecting)",
        domain=False,
        many=True,
    )
    return parser


def _scope(args: argparse.Namespace) -> Scope | None:
    from vmdriver.driver import Scope

    if not (args.live or args.config):
        return None
    return Scope(live=args.live, config=args.config)


def _client() -> Client:
    from volumed import locations
    from volumed.client import Client

    return Client(locations.socket_path(os.environ, os.geteuid()))


def _libvirt_driver(uri: str) -> LibvirtDriver:
    from vmdriver.backends.libvirt import LibvirtDriver

    return LibvirtDriver(_client(), uri)


def _driver(uri: str) -> LibvirtDriver | Attachments:
    """The attach workflow for ``uri``'s backend."""
    from vmdriver.backends import registry

    if registry.scheme(uri) == "libvirt":
        return _libvirt_driver(uri)
    from vmdriver.attachments import Attachments

    return Attachments(_client(), registry.open_backend(uri))


def _state(a: Attachment) -> str:
    return "+".join(n for n, on in (("live", a.live), ("config", a.config)) if on) or "recorded"


def _print_attachments(attachments: Sequence[Attachment], out: TextIO) -> None:
    rows = [
        [
            a.tag,
            str(a.volume) if a.volume else "?",
            a.guest_path or "?",
            "ro" if a.read_only else "rw",
            str(a.via),
            _state(a),
            a.export_id or "",
        ]
        for a in attachments
    ]
    headers = ["TAG", "VOLUME", "GUEST PATH", "MODE", "VIA", "IN", "EXPORT ID"]
    print_table(rows, headers, out)


def _run(args: argparse.Namespace, out: TextIO) -> int:
    if args.command == "attach":
        from volumed.specs import parse_specs

        if not args.specs:
            raise errors.InvalidArgument("give at least one volume: -v NAME:/guest or -v /guest")
        # Every spec is checked before libvirt is even imported: a host path never gets near it.
        specs = parse_specs(args.specs)
        scope = _scope(args)
        with _driver(args.connect) as driver:
            _print_attachments(driver.attach(args.domain, specs, scope=scope, via=args.via), out)
        return EXIT_OK
    if args.command == "detach":
        from volumed.specs import parse_specs

        targets = list(args.targets) + [s.guest_path for s in parse_specs(args.specs)]
        if bool(targets) == args.all:
            raise errors.InvalidArgument(
                "name what to detach (a tag, a guest path or -v SPEC), or give --all"
            )
        scope = _scope(args)
        with _driver(args.connect) as driver:
            if args.timeout is None:
                done = driver.detach(args.domain, targets, scope=scope)
            else:
                done = driver.detach(args.domain, targets, scope=scope, timeout=args.timeout)
            out.writelines(printable(f"{a.tag}  {a.guest_path}") + "\n" for a in done)
        return EXIT_OK
    if args.command == "prepare":
        from vmdriver.backends import registry

        if registry.scheme(args.connect) != "libvirt":
            raise errors.InvalidArgument(
                "prepare changes a libvirt domain's definition; a QEMU started by another tool "
                "needs shared memory and spare pcie-root-ports on its own command line "
                "(docs/backends.md)"
            )
        with _libvirt_driver(args.connect) as driver:
            if args.spare_root_ports is None:
                result = driver.prepare(args.domain)
            else:
                result = driver.prepare(args.domain, spare_root_ports=args.spare_root_ports)
        if not result.changes:
            out.write(printable(f"{args.domain} is ready for virtio-fs; nothing changed") + "\n")
            return EXIT_OK
        out.writelines(printable(f"{args.domain}: {change}") + "\n" for change in result.changes)
        if result.restart_needed:
            out.write(
                printable(f"{args.domain} is running: the changes apply from its next boot") + "\n"
            )
        return EXIT_OK
    if args.command == "ls":
        with _driver(args.connect) as driver:
            attachments = driver.list_attachments(args.domain)
        if args.quiet:
            out.writelines(printable(a.tag) + "\n" for a in attachments)
        elif args.format == "json":
            json.dump([a.to_json() for a in attachments], out, indent=2)
            out.write("\n")
        else:
            _print_attachments(attachments, out)
        return EXIT_OK
    if args.command == "watch":
        return _watch(args.connect or [DEFAULT_URI], out)
    raise AssertionError(args.command)  # pragma: no cover - argparse allows no other


def _watch(uris: Sequence[str], out: TextIO) -> int:
    """Run one lifecycle watcher per URI, all until interrupted; what they release goes to
    ``out``, what they do about connections (reconnection attempts) to the log on stderr."""
    import logging
    import signal

    import trio

    from vmdriver.driver import LifecycleEvent

    # A long-running command: its log (reconnections, failed releases) is its only voice.
    # A no-op where the caller already configured logging (tests, an embedding program).
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def report(event: LifecycleEvent) -> None:
        if event.released is not None:
            r = event.released
            out.write(
                f"{event.domain} {event.kind}: released {len(r.exports)} export(s), "
                f"removed {len(r.volumes)} anonymous volume(s)\n"
            )
            for volume_id, why in r.kept:
                out.write(printable(f"{event.domain}: kept {volume_id}: {why}") + "\n")
            out.flush()

    async def watch_until_stopped(drivers: Sequence[LibvirtDriver | Attachments]) -> None:
        # SIGTERM (systemd's stop) and SIGINT (Ctrl-C) end it cleanly, with status 0. Both
        # are handled here, not left to Python's defaults: a SIGINT that lands inside a
        # nursery would come out grouped, and a command started in the background inherits
        # SIGINT ignored.
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                for driver in drivers:
                    await nursery.start(watching, driver)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    async def watching(
        driver: LibvirtDriver | Attachments,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        if isinstance(driver, Attachments):
            await driver.watch(report, task_status=task_status)
        else:
            await driver.watch_lifecycle(on_event=report, task_status=task_status)

    from vmdriver.attachments import Attachments

    with contextlib.ExitStack() as stack:
        drivers: list[LibvirtDriver | Attachments] = []
        for uri in dict.fromkeys(uris):
            driver = _driver(uri)
            stack.callback(driver.close)
            drivers.append(driver)
        try:
            trio.run(watch_until_stopped, drivers)
        except BaseExceptionGroup as group:
            # A failure at start (libvirtd or boxvold unreachable) comes out of the nursery
            # as a group of one: report it like any other error.
            sole: BaseException = group
            while isinstance(sole, BaseExceptionGroup) and len(sole.exceptions) == 1:
                sole = sole.exceptions[0]
            if isinstance(sole, errors.BoxvolError):
                raise sole from None
            raise
    return EXIT_OK


def main_vm(argv: Sequence[str] | None = None, *, out: TextIO | None = None) -> int:
    """Entry point of ``boxvol vm ...`` (``argv`` without the leading ``vm``)."""
    out = sys.stdout if out is None else out
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # usage errors and --help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return _run(args, out)
    except errors.BoxvolError as exc:
        return errors.report_to_terminal(exc)
    except BrokenPipeError:
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main_vm())
