"""``boxvol``: create, list, inspect, remove, prune and measure managed volumes.

Exit codes: 0 success, 1 a failed operation, 2 a usage error.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys

from volumed import errors, locations
from volumed.client import Client
from volumed.text import print_table, printable

# Not typing.TYPE_CHECKING: importing typing costs this CLI's start-up ~4 ms; mypy treats any
# constant named TYPE_CHECKING as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Any, TextIO

EXIT_OK = errors.EXIT_OK
EXIT_FAILED = errors.EXIT_FAILED
EXIT_USAGE = errors.EXIT_USAGE


class UsageError(Exception):
    """A command line that cannot be carried out as written."""


def _client() -> Client:
    return Client(locations.socket_path(os.environ, os.geteuid()))


def _short_time(stamp: str) -> str:
    return stamp[:19].replace("T", " ")


def _labels_text(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" if v else k for k, v in sorted(labels.items()))


# -- commands ---------------------------------------------------------------------------


def cmd_create(args: argparse.Namespace, out: TextIO) -> int:
    """Create a named volume (NAME given) or an anonymous one; print its name or id."""
    from volumed.names import check_name, parse_label
    from volumed.sizes import parse_inodes, parse_size

    try:
        if args.name is not None:
            check_name(args.name)
        labels = dict(parse_label(text) for text in args.label)
        size = parse_size(args.size) if args.size is not None else None
        inodes = parse_inodes(args.inodes) if args.inodes is not None else None
    except errors.InvalidArgument as exc:
        raise UsageError(exc.message) from None
    volume = _client().create_volume(
        args.name, labels=labels, size_bytes=size, inode_limit=inodes, consumer=args.consumer
    )
    out.write(printable(volume["name"] or volume["id"]) + "\n")
    return EXIT_OK


def cmd_resize(args: argparse.Namespace, out: TextIO) -> int:
    """Grow a sized volume's cap."""
    from volumed.sizes import format_size, parse_size

    try:
        size = parse_size(args.size)
    except errors.InvalidArgument as exc:
        raise UsageError(exc.message) from None
    volume = _client().resize_volume(args.ref, size)
    out.write(f"{printable(volume['name'] or volume['id'])} {format_size(size)}\n")
    return EXIT_OK


def cmd_gc(args: argparse.Namespace, out: TextIO) -> int:
    """Reclaim what boxvol created and lost track of (--dry-run: list it with sizes)."""
    from volumed.sizes import format_size

    answer = _client().collect_garbage(dry_run=args.dry_run)
    if args.format == "json":
        json.dump(answer, out, indent=2)
        out.write("\n")
        return EXIT_OK
    findings = answer["findings"]
    if not findings:
        out.write("nothing to reclaim\n")
        return EXIT_OK
    rows = [
        [f["kind"], printable(f["what"]), format_size(f["bytes"]), f["action"]] for f in findings
    ]
    print_table(rows, ["KIND", "WHAT", "SIZE", "ACTION"], out)
    verb = "would reclaim" if answer["dry_run"] else "reclaimed"
    out.write(
        f"\n{verb} {format_size(answer['reclaimed_bytes'])} in {len(findings)} item(s); "
        "orphan data is quarantined, never deleted\n"
    )
    return EXIT_OK


def cmd_reserve_release(args: argparse.Namespace, out: TextIO) -> int:
    """Unlink boxvold's reserve so rm and prune can run on a full disk."""
    from volumed.sizes import format_size

    answer = _client().release_reserve()
    released = answer["released_bytes"]
    if released:
        out.write(
            f"released {format_size(released)}; remove volumes now ('boxvol rm', 'boxvol "
            "prune'); the reserve comes back once the host has room for it twice\n"
        )
    else:
        out.write("no reserve was held (released already, or configured as 0)\n")
    return EXIT_OK


_FILTER_KEYS = ("kind", "label", "name", "dangling", "in_use")


def _filters(texts: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for text in texts:
        key, sep, value = text.partition("=")
        key = key.replace("-", "_")
        if not sep or key not in _FILTER_KEYS:
            raise UsageError(
                f"invalid filter {text!r}: give KEY=VALUE with KEY one of "
                "kind, label, name, dangling, in-use (e.g. --filter label=team=db)"
            )
        if key in ("dangling", "in_use") and value not in ("true", "false"):
            raise UsageError(f"invalid filter {text!r}: {key} takes true or false")
        pairs.append((key, value))
    return pairs


def cmd_ls(args: argparse.Namespace, out: TextIO) -> int:
    """List volumes as a table, ids/names only (-q), or JSON."""
    volumes = _client().list_volumes(_filters(args.filter))
    if args.quiet:
        out.writelines(printable(v["name"] or v["id"]) + "\n" for v in volumes)
    elif args.format == "json":
        json.dump(volumes, out, indent=2)
        out.write("\n")
    else:
        rows = [
            [
                v["id"],
                v["name"] or "",
                v["kind"],
                "yes" if v["in_use"] else "no",
                _short_time(v["created_at"]),
                _labels_text(v["labels"]),
            ]
            for v in volumes
        ]
        print_table(rows, ["VOLUME ID", "NAME", "KIND", "IN USE", "CREATED", "LABELS"], out)
    return EXIT_OK


def _each(refs: list[str], action: Callable[[str], Any]) -> tuple[list[Any], bool]:
    """Apply ``action`` to every ref, reporting failures and carrying on, as docker does."""
    results, failed = [], False
    for ref in refs:
        try:
            results.append(action(ref))
        except errors.DaemonUnavailable:
            raise
        except errors.BoxvolError as exc:
            errors.report_to_terminal(exc)
            failed = True
    return results, failed


def _inspect_each(refs: list[str], get: Callable[[str], Any], out: TextIO) -> int:
    """Print what ``get`` answers for each ref as one JSON array; exit 1 if any failed."""
    found, failed = _each(refs, get)
    json.dump(found, out, indent=2)
    out.write("\n")
    return EXIT_FAILED if failed else EXIT_OK


def _remove_each(refs: list[str], remove: Callable[[str], Any], out: TextIO) -> int:
    """Remove each ref, printing the ones removed; exit 1 if any failed."""

    def remove_and_say(ref: str) -> None:
        remove(ref)
        out.write(printable(ref) + "\n")

    _, failed = _each(refs, remove_and_say)
    return EXIT_FAILED if failed else EXIT_OK


def cmd_inspect(args: argparse.Namespace, out: TextIO) -> int:
    """Print the named volumes as a JSON array."""
    return _inspect_each(args.refs, _client().get_volume, out)


def cmd_rm(args: argparse.Namespace, out: TextIO) -> int:
    """Remove volumes (and their data); -f also removes volumes in use."""
    client = _client()
    return _remove_each(args.refs, lambda ref: client.remove_volume(ref, force=args.force), out)


def cmd_prune(args: argparse.Namespace, out: TextIO) -> int:
    """Remove unused anonymous volumes (every unused volume with --all)."""
    from volumed.sizes import format_size

    if not args.force:
        what = "all unused volumes" if args.all else "all unused anonymous volumes"
        sys.stderr.write(
            f"WARNING! This will remove {what} and their data.\n"
            "Are you sure you want to continue? [y/N] "
        )
        sys.stderr.flush()
        answer = sys.stdin.readline().strip().lower()
        if answer not in ("y", "yes"):
            sys.stderr.write("\nnothing removed (give -f to prune without asking)\n")
            return EXIT_OK
    result = _client().prune(all_volumes=args.all)
    if result["removed"]:
        out.write("Deleted Volumes:\n")
        out.writelines(printable(v["name"] or v["id"]) + "\n" for v in result["removed"])
        out.write("\n")
    out.write(f"Total reclaimed space: {format_size(result['reclaimed_bytes'])}\n")
    return EXIT_OK


def cmd_df(args: argparse.Namespace, out: TextIO) -> int:
    """Show space and inodes per volume (with caps), totals by kind, the reserve and what
    the host has left."""
    from volumed.sizes import format_size

    usage = _client().disk_usage()
    if args.format == "json":
        json.dump(usage, out, indent=2)
        out.write("\n")
        return EXIT_OK

    def cap(value: int | None, text: Callable[[int], str]) -> str:
        return "-" if value is None else text(value)

    rows = [
        [
            v["name"] or v["id"],
            v["kind"],
            "yes" if v["in_use"] else "no",
            format_size(v["bytes"]),
            cap(v["cap_bytes"], format_size),
            str(v["inodes"]),
            cap(v["cap_inodes"], str),
        ]
        for v in usage["volumes"]
    ]
    for label, totals in (
        *((f"TOTAL {kind}", usage["by_kind"][kind]) for kind in ("named", "anonymous")),
        ("TOTAL", usage["totals"]),
    ):
        rows.append(
            [
                label,
                f"{totals['volumes']} volumes",
                "",
                format_size(totals["bytes"]),
                "",
                str(totals["inodes"]),
                "",
            ]
        )
    print_table(rows, ["VOLUME", "KIND", "IN USE", "SIZE", "CAP", "INODES", "INODE CAP"], out)
    host, reserve = usage["host"], usage["reserve"]
    held = (
        f"{format_size(reserve['present_bytes'])} of {format_size(reserve['target_bytes'])}"
        if reserve["present_bytes"] < reserve["target_bytes"]
        else format_size(reserve["target_bytes"])
    )
    out.write(
        f"\nHost: {format_size(host['free_bytes'])} free of {format_size(host['total_bytes'])}, "
        f"{host['free_inodes']} inodes free of {host['total_inodes']}\n"
        f"Reserve: {held} held (boxvol reserve-release frees it on a full disk)\n"
        f"Measured at {_short_time(usage['measured_at'])} UTC (reused for up to 2 s)\n"
    )
    return EXIT_OK


def cmd_archive(args: argparse.Namespace, out: TextIO) -> int:
    """Write a volume's content as a tar archive to FILE (-o) or stdout."""
    client = _client()
    if args.output == "-":
        if sys.stdout.isatty():
            raise UsageError(
                "refusing to write an archive to a terminal; give -o FILE or redirect stdout"
            )
        out.flush()
        dst, partial = sys.stdout.fileno(), None
    else:
        # Written beside FILE, renamed over it once complete: a failure leaves FILE as it was.
        # 0600: an archive holds all of a volume's data, whoever may read the directory.
        partial = f"{args.output}.partial-{os.getpid()}"
        try:
            dst = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise UsageError(f"cannot write {args.output}: {exc.strerror}") from None
    try:
        report = _archive_into(client, args.ref, dst)
    except BaseException:
        # The copy may still be writing (it ends with the pipe): dst stays open till exit.
        if partial is not None:
            with _quietly():
                os.unlink(partial)
        raise
    if partial is not None:
        os.close(dst)
        os.replace(partial, args.output)
    sys.stderr.write(f"archived {printable(args.ref)}: {_report_text(report)}\n")
    _warn_about(report)
    return EXIT_OK


def _archive_into(client: Client, ref: str, dst: int) -> dict[str, Any]:
    """Have boxvold archive ``ref`` into a pipe while a thread copies it to ``dst``."""
    from cli.transfer import Copy

    show = sys.stderr if sys.stderr.isatty() else None
    total = _volume_bytes(client, ref) if show is not None else None
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    copy = Copy(read_end, dst, pipe_end=read_end, total=total, progress=show)
    copy.start()
    try:
        report = client.archive_volume(ref, write_end)
    finally:
        os.close(write_end)
    copy.join()
    if copy.error is not None:
        raise errors.BoxvolError(
            f"writing the archive failed: {copy.error.strerror}; nothing was written"
        )
    return report


def cmd_restore(args: argparse.Namespace, out: TextIO) -> int:
    """Replace a volume's content with a tar archive read from FILE or stdin ('-')."""
    from cli.transfer import Copy

    client = _client()
    if args.file == "-":
        if sys.stdin.isatty():
            raise UsageError("refusing to read an archive from a terminal; give FILE or a pipe")
        src = sys.stdin.fileno()
    else:
        try:
            src = os.open(args.file, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise UsageError(f"cannot read {args.file}: {exc.strerror}") from None
    st = os.fstat(src)
    total = st.st_size if (st.st_mode & 0o170000) == 0o100000 else None  # a regular file
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    show = sys.stderr if sys.stderr.isatty() else None
    copy = Copy(src, write_end, pipe_end=write_end, total=total, progress=show)
    copy.start()
    try:
        report = client.restore_volume(args.ref, read_end, force=args.force)
    finally:
        # Also on failure: the copy then stops at a broken pipe (src stays open till exit).
        os.close(read_end)
    copy.join()
    if src != sys.stdin.fileno():
        os.close(src)
    created = " (created)" if report["created"] else ""
    out.write(f"restored {printable(args.ref)}{created}: {_report_text(report)}\n")
    _warn_about(report)
    return EXIT_OK


def _volume_bytes(client: Client, ref: str) -> int | None:
    """The volume's usage, the progress bar's estimate of an archive's size."""
    volume = client.get_volume(ref)
    usage = volume.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("bytes"), int):
        return int(usage["bytes"])
    for row in client.disk_usage()["volumes"]:
        if row["id"] == volume["id"]:
            return int(row["bytes"])
    return None


def _report_text(report: dict[str, Any]) -> str:
    from volumed.sizes import format_size

    return f"{report['entries']} entries, {format_size(report['bytes'])} of file content"


def _warn_about(report: dict[str, Any]) -> None:
    """One line for what was left out and one for what was made harmless, if anything."""
    for key, what in (("skipped", "left out"), ("neutralised", "made harmless")):
        counts = report[key]
        if counts:
            kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(counts.items()))
            sys.stderr.write(
                f"boxvol: warning: {sum(counts.values())} entries {what}: {kinds} "
                "(see docs/archives.md)\n"
            )


class _quietly:
    """Suppress OSError (contextlib costs the CLI's start-up an import)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, value: object, traceback: object) -> bool:
        return isinstance(value, OSError)


def _add_archive_parsers(sub: Any) -> None:
    p = sub.add_parser("archive", help="write a volume's content as a tar archive")
    p.add_argument("ref", metavar="REF", help="volume name or id")
    p.add_argument(
        "-o", "--output", metavar="FILE", default="-", help="where to write it (- : stdout)"
    )
    p.set_defaults(func=cmd_archive)
    p = sub.add_parser("restore", help="replace a volume's content with a tar archive")
    p.add_argument("ref", metavar="REF", help="volume name or id (a missing name is created)")
    p.add_argument("file", metavar="FILE", help="the archive (- : stdin)")
    p.add_argument(
        "-f", "--force", action="store_true", help="replace the content of a non-empty volume"
    )
    p.set_defaults(func=cmd_restore)


def _owner(text: str) -> tuple[int, int]:
    uid, sep, gid = text.partition(":")
    if not (sep and uid.isdigit() and gid.isdigit()):
        raise UsageError(f"invalid owner {text!r}: give UID:GID, e.g. --owner 1000:1000")
    return int(uid), int(gid)


def cmd_export_create(args: argparse.Namespace, out: TextIO) -> int:
    """Export a volume as a FUSE view; print the export id and its mountpoint."""
    owner = _owner(args.owner) if args.owner is not None else None
    export = _client().create_export(
        args.volume,
        read_only=args.read_only,
        owner=owner,
        consumer=args.consumer,
        cache=args.cache,
    )
    out.write(f"{export['id']}  {export['mountpoint']}\n")
    return EXIT_OK


def _consumer_text(consumer: Any) -> str:
    if isinstance(consumer, dict):  # a virtio-fs export's guest
        return f"vm={consumer['vm']} tag={consumer['tag']}"
    return str(consumer or "")


def cmd_export_ls(args: argparse.Namespace, out: TextIO) -> int:
    """List live exports."""
    exports = _client().list_exports(args.volume)
    if args.quiet:
        out.writelines(printable(e["id"]) + "\n" for e in exports)
    elif args.format == "json":
        json.dump(exports, out, indent=2)
        out.write("\n")
    else:
        rows = [
            [
                e["id"],
                e["volume"]["name"] or e["volume"]["id"],
                e["kind"],
                "ro" if e["read_only"] else "rw",
                f"{e['owner']['uid']}:{e['owner']['gid']}" if e["owner"] else "",
                e["cache"],
                _consumer_text(e["consumer"]),
                e.get("socket") or e["mountpoint"] or "",
            ]
            for e in exports
        ]
        headers = [
            "EXPORT ID",
            "VOLUME",
            "KIND",
            "MODE",
            "OWNER",
            "CACHE",
            "CONSUMER",
            "MOUNTPOINT / SOCKET",
        ]
        print_table(rows, headers, out)
    return EXIT_OK


def cmd_export_inspect(args: argparse.Namespace, out: TextIO) -> int:
    """Print exports as a JSON array."""
    return _inspect_each(args.ids, _client().get_export, out)


def cmd_export_rm(args: argparse.Namespace, out: TextIO) -> int:
    """Tear exports down."""
    return _remove_each(args.ids, _client().remove_export, out)


def cmd_serve(args: argparse.Namespace, out: TextIO) -> int:
    """Run boxvold in the foreground."""
    from volumed import daemon

    return daemon.run(args)


def _duration(seconds: float) -> str:
    """``3d 4h``, ``2h 05m``, ``7m 12s``, ``42s``: an uptime at a glance."""
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def cmd_status(args: argparse.Namespace, out: TextIO) -> int:
    """Show boxvold's version, uptime, volume and export counts, restarts and the room left
    in its home, one line each."""
    from volumed.sizes import format_size

    status = _client().system_status()
    if args.format == "json":
        json.dump(status, out, indent=2)
        out.write("\n")
        return EXIT_OK
    volumes, restarts, host, reserve = (
        status["volumes"],
        status["restarts"],
        status["host"],
        status["reserve"],
    )
    exports: dict[str, int] = {}
    unserved = 0
    for entry in status["exports"]:
        exports[entry["kind"]] = exports.get(entry["kind"], 0) + entry["count"]
        if entry["state"] != "serving":
            unserved += entry["count"]
    rows = [
        ["version", f"{status['version']} (API {status['api_version']})"],
        [
            "uptime",
            f"{_duration(status['uptime_seconds'])} (since "
            f"{_short_time(status['started_at'])} UTC)",
        ],
        [
            "volumes",
            f"{sum(volumes.values())} (named {volumes.get('named', 0)}, "
            f"anonymous {volumes.get('anonymous', 0)})",
        ],
        [
            "exports",
            f"{sum(exports.values())} (fuse {exports.get('fuse', 0)}, virtiofs "
            f"{exports.get('virtiofs', 0)}; {unserved} not served)",
        ],
        [
            "restarts",
            f"export servers {restarts['fuse_server']}, virtiofsd {restarts['virtiofsd']}",
        ],
        [
            "home free",
            f"{format_size(host['free_bytes'])} of {format_size(host['total_bytes'])}, "
            f"{host['free_inodes']} of {host['total_inodes']} inodes",
        ],
        [
            "reserve",
            f"{format_size(reserve['present_bytes'])} held of "
            f"{format_size(reserve['target_bytes'])}",
        ],
    ]
    print_table(rows, ["ITEM", "VALUE"], out)
    return EXIT_OK


def cmd_version(args: argparse.Namespace, out: TextIO) -> int:
    """Print client and daemon versions."""
    from volumed import __version__

    out.write(f"boxvol {__version__}\n")
    daemon_version = _client().version()
    out.write(f"boxvold {daemon_version['version']} (API {daemon_version['api_version']})\n")
    return EXIT_OK


# -- parser -----------------------------------------------------------------------------


def _terminal_columns() -> int:
    try:
        return int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        pass
    try:
        return os.get_terminal_size(sys.stdout.fileno()).columns
    except (OSError, ValueError):
        return 80


class _Formatter(argparse.HelpFormatter):
    """argparse's formatter, given a width so it does not import shutil (~5 ms per run)."""

    def __init__(
        self,
        prog: str,
        indent_increment: int = 2,
        max_help_position: int = 24,
        width: int | None = None,
    ) -> None:
        width = _terminal_columns() - 2 if width is None else width
        super().__init__(prog, indent_increment, max_help_position, width)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> Any:
        self.print_usage(sys.stderr)
        sys.stderr.write(f"{self.prog}: error: {printable(message)}\n")
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    """The ``boxvol`` command line."""
    parser = _Parser(
        prog="boxvol",
        description="Manage boxvol volumes. Volumes are referenced by name or id, never by path.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("create", help="create a volume (anonymous without NAME)")
    p.add_argument("name", nargs="?", metavar="NAME")
    p.add_argument("--label", action="append", default=[], metavar="K=V")
    p.add_argument(
        "--size", metavar="SIZE", help="hard size cap, e.g. 10G (the volume gets its own image)"
    )
    p.add_argument("--inodes", metavar="N", help="inodes of the volume's image (with --size)")
    p.add_argument("--consumer", help="who an anonymous volume belongs to")
    p.set_defaults(func=cmd_create)

    p = sub.add_parser("ls", aliases=["list"], help="list volumes")
    p.add_argument("-q", "--quiet", action="store_true", help="only names (ids if anonymous)")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="K=V",
        help="kind=, label=KEY[=VALUE], name=, dangling=, in-use=",
    )
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("inspect", help="show volumes as JSON")
    p.add_argument("refs", nargs="+", metavar="REF")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("rm", aliases=["remove"], help="remove volumes and their data")
    p.add_argument("-f", "--force", action="store_true", help="remove even if in use")
    p.add_argument("refs", nargs="+", metavar="REF")
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("prune", help="remove unused anonymous volumes")
    p.add_argument("-a", "--all", action="store_true", help="every unused volume, named too")
    p.add_argument("-f", "--force", action="store_true", help="do not ask for confirmation")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("resize", help="grow a sized volume (not while exported)")
    p.add_argument("ref", metavar="REF")
    p.add_argument("--size", metavar="SIZE", required=True, help="the new cap, e.g. 20G")
    p.set_defaults(func=cmd_resize)

    p = sub.add_parser("gc", help="reclaim what boxvol created and lost track of")
    p.add_argument("--dry-run", action="store_true", help="only list it, with sizes")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_gc)

    p = sub.add_parser(
        "reserve-release", help="free boxvold's reserve so rm/prune can run on a full disk"
    )
    p.set_defaults(func=cmd_reserve_release)

    p = sub.add_parser("df", help="space used by volumes")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_df)

    _add_archive_parsers(sub)

    p = sub.add_parser("export", help="export volumes as FUSE views")
    export_sub = p.add_subparsers(dest="export_command", metavar="COMMAND", parser_class=_Parser)
    export_sub.required = True
    e = export_sub.add_parser("create", help="export a volume as a FUSE view")
    e.add_argument("volume", metavar="VOLUME", help="volume name or id")
    e.add_argument("--read-only", action="store_true", help="every write fails with EROFS")
    e.add_argument("--owner", metavar="UID:GID", help="present every file as UID:GID")
    e.add_argument("--consumer", help="free-form label of who uses the export")
    e.add_argument(
        "--cache",
        choices=["auto", "none", "always"],
        help="kernel caching: auto (default, 5 s), none, always (10 min)",
    )
    e.set_defaults(func=cmd_export_create)
    e = export_sub.add_parser("ls", aliases=["list"], help="list exports")
    e.add_argument("--volume", metavar="VOLUME", help="only exports of this volume")
    e.add_argument("-q", "--quiet", action="store_true", help="only ids")
    e.add_argument("--format", choices=["table", "json"], default="table")
    e.set_defaults(func=cmd_export_ls)
    e = export_sub.add_parser("inspect", help="show exports as JSON")
    e.add_argument("ids", nargs="+", metavar="EXPORT_ID")
    e.set_defaults(func=cmd_export_inspect)
    e = export_sub.add_parser("rm", aliases=["remove"], help="tear exports down")
    e.add_argument("ids", nargs="+", metavar="EXPORT_ID")
    e.set_defaults(func=cmd_export_rm)

    # `boxvol vm ...` is dispatched to vmdriver.cli before this parser runs; listed for --help.
    sub.add_parser(
        "vm", help="attach volumes to VMs: prepare, attach, detach, ls, watch", add_help=False
    )

    p = sub.add_parser("status", help="boxvold's uptime, counts, restarts and free space")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("version", help="client and daemon versions")
    p.set_defaults(func=cmd_version)

    p = sub.add_parser("serve", help="run boxvold in the foreground")
    from volumed.daemon_options import add_daemon_options

    add_daemon_options(p)
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``boxvol``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["vm"]:
        # The VM driver (libvirt) is imported only for `boxvol vm ...`.
        from vmdriver.cli import main_vm

        return main_vm(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args, sys.stdout)
    except UsageError as exc:
        sys.stderr.write(f"boxvol: error: {printable(str(exc))}\n")
        return EXIT_USAGE
    except errors.BoxvolError as exc:
        return errors.report_to_terminal(exc)
    except BrokenPipeError:
        return EXIT_FAILED
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        return errors.report_to_terminal(errors.DiskFull(str(exc)))
    return code


if __name__ == "__main__":
    sys.exit(main())
