"""The main job, end to end, on a throw-away home: boxvold, a named volume, and two real guests.

1. boxvold starts on a throw-away home and runtime dir (0755 under /tmp, so QEMU, running as
   libvirt-qemu, can reach the vhost-user sockets boxvold makes there);
2. a named volume is created; the TCG test guest is built (guest/build.py);
3. a writer domain ``boxvol-demo-<random>`` is defined, prepared and given the volume at boot
   (``boxvol vm prepare``, ``boxvol vm attach DOMAIN -v NAME:/data --config``); it boots,
   writes a file into /data and powers off;
4. the host sees that file (``boxvol df``, and the file read from the volume's directory under
   the daemon's home);
5. a reader domain gets the same volume read-only, boots, prints the file on its console and
   finds it cannot write;
6. both are detached and undefined, the volume is removed, boxvold stops.

Whatever happens (a failed step, Ctrl-C, SIGTERM), the demo's domains are destroyed and
undefined, boxvold's exports deleted, boxvold stopped, no virtiofsd or QEMU of the demo left
running and its temporary directories removed. Exit status 0 only if the writer's file was
seen on the host and the reader read back the same content.

Run by ``make demo`` (or ``.venv/bin/python demo/run.py``, as root): it starts virtlogd and
libvirtd itself if they are not running. Prints every command it runs and what it answered.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import libvirt

from guest.build import GuestImage, build_guest, default_out_dir
from guest.domain import ensure_libvirt, guest_domain_xml
from guest.processes import processes_naming
from volumed.client import Client
from volumed.errors import BoxvolError
from volumed.locations import Layout

REPO = Path(__file__).resolve().parent.parent
BIN = REPO / ".venv" / "bin"
URI = "qemu:///system"
VIRSH = ("virsh", "-c", URI)
VOLUME = "demo-data"
DOMAIN_PREFIX = "boxvol-demo-"
MARKER = "BOXVOL-GUEST: "
#: Host-side limit for one guest's life; TCG boots take 5-15 s here, more under load.
GUEST_TIMEOUT = 180.0
#: ``boxvol vm`` where the installed ``boxvol`` does not have it yet: the same entry point.
VM_SHIM = "import sys; from vmdriver.cli import main_vm; sys.exit(main_vm(sys.argv[1:]))"
#: A kernel log line on the console (``[    1.234567] ...``): not the guest script's output.
_KERNEL_LINE = re.compile(r"^\[\s*\d+\.\d+\]")
#: init's report of a module that loaded (or was there): noise in a transcript.
_MODULE_OK = re.compile(rf"{MARKER}module \S+ (loaded|present)$")

WRITER = """\
set -e
echo "hello from {domain}, kernel $(uname -r), token {token}" > /data/hello.txt
sync
echo "WROTE: $(cat /data/hello.txt)"
ls -l /data
"""

READER = """\
echo "READ: $(cat /data/hello.txt)"
if echo x > /data/intruder.txt 2>/dev/null; then echo "RO: write allowed"; \
else echo "RO: write refused"; fi
"""


class DemoFailed(Exception):
    """A step did not do what the demo needs; the message says which and why."""


class Interrupted(BaseException):
    """SIGTERM or SIGHUP: unwind like Ctrl-C, so every clean-up step still runs."""


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


def say(text: str = "") -> None:
    print(text, flush=True)


def show_output(text: str, prefix: str = "") -> None:
    for line in text.splitlines():
        say(prefix + line)


# -- commands, shown as a transcript ----------------------------------------------------------


class Shell:
    """Runs the CLI commands of the demo, printing each as ``$ command`` and its answer."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.vm_argv = self._vm_argv()

    def _vm_argv(self) -> list[str]:
        """``boxvol vm`` if this boxvol has it, else the same ``main_vm`` run directly."""
        probe = subprocess.run(
            [str(BIN / "boxvol"), "vm", "--help"],
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
        )
        if probe.returncode == 0 and "prepare" in probe.stdout:
            return [str(BIN / "boxvol"), "vm"]
        say("# (this boxvol has no `vm` command: `boxvol vm` runs vmdriver.cli.main_vm directly)")
        return [str(BIN / "python"), "-c", VM_SHIM]

    def run(self, shown: str, argv: Sequence[str]) -> str:
        say(f"$ {shown}")
        result = subprocess.run(
            list(argv), env=self.env, cwd=REPO, capture_output=True, text=True, check=False
        )
        show_output(result.stdout)
        show_output(result.stderr)
        if result.returncode != 0:
            raise DemoFailed(f"`{shown}` exited with status {result.returncode}")
        return result.stdout

    def boxvol(self, *args: str) -> str:
        return self.run(f"boxvol {shlex.join(args)}", [str(BIN / "boxvol"), *args])

    def vm(self, *args: str) -> str:
        return self.run(f"boxvol vm {shlex.join(args)}", [*self.vm_argv, *args])

    def virsh(self, *args: str) -> str:
        return self.run(shlex.join([*VIRSH, *args]), [*VIRSH, *args])


# -- libvirt ---------------------------------------------------------------------------------


def ensure_libvirt_quietly() -> None:
    """libvirtd and virtlogd up, libvirt's own stderr chatter off."""
    # libvirt prints every error to stderr by default, even those handled here.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        ensure_libvirt(URI, say=say)
    except TimeoutError as exc:
        raise DemoFailed(str(exc)) from None


class Guest:
    """One demo domain: its name, definition file and console log."""

    def __init__(self, scratch: Path, role: str) -> None:
        self.role = role
        self.name = f"{DOMAIN_PREFIX}{secrets.token_hex(4)}"
        self.xml_file = scratch / f"{self.name}.xml"
        self.console_log = scratch / f"{self.name}.console.log"

    def console(self) -> str:
        try:
            return self.console_log.read_text(errors="replace").replace("\r", "")
        except FileNotFoundError:
            return ""

    def lines_with(self, prefix: str) -> list[str]:
        return [ln.split(prefix, 1)[1] for ln in self.console().splitlines() if prefix in ln]

    def said(self) -> list[str]:
        """What init and the script printed (kernel log lines and modules loaded left out)."""
        return [
            ln
            for ln in self.console().splitlines()
            if ln and not _KERNEL_LINE.match(ln) and not _MODULE_OK.search(ln)
        ]

    def wait_stopped(self, conn: Any, started: float) -> float:
        """Wait for the guest to power off; the seconds it ran."""
        dom = conn.lookupByName(self.name)
        while dom.isActive():
            if time.monotonic() - started > GUEST_TIMEOUT:
                tail = "\n".join(self.console().splitlines()[-30:])
                raise DemoFailed(
                    f"{self.name} still running after {GUEST_TIMEOUT:.0f} s; console:\n{tail}"
                )
            time.sleep(0.2)
        return time.monotonic() - started

    def check_done(self) -> None:
        markers = self.lines_with(MARKER)
        errors = [m for m in markers if m.startswith("error:")]
        if errors or not markers or markers[-1] != "done" or "script exit=0" not in markers:
            raise DemoFailed(f"the {self.role} guest did not run its script cleanly: {markers}")


# -- clean-up --------------------------------------------------------------------------------


def mounts_under(root: Path) -> list[str]:
    """Mount points at or below ``root``, deepest first."""
    points = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split()
            if len(fields) > 4:
                point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
                if point == str(root) or point.startswith(f"{root}/"):
                    points.append(point)
    return sorted(points, key=len, reverse=True)


class Demo:
    """The demo's resources, and the one place that tears every one of them down."""

    def __init__(self) -> None:
        self.scratch = Path(tempfile.mkdtemp(prefix=DOMAIN_PREFIX, dir="/tmp"))
        self.scratch.chmod(0o755)
        self.home = self.scratch / "home"
        # 0755, as /run/boxvol: QEMU (libvirt-qemu, group kvm) must reach the sockets in it.
        self.runtime = self.scratch / "run"
        self.runtime.mkdir(mode=0o755)
        self.runtime.chmod(0o755)
        self.socket = self.runtime / "boxvold.sock"
        self.daemon_log = self.scratch / "boxvold.log"
        self.daemon: subprocess.Popen[bytes] | None = None
        self.daemon_status: int | None = None
        self.guests: list[Guest] = []
        self.conn: Any = None
        env = {k: v for k, v in os.environ.items() if not k.startswith("BOXVOL_")}
        env["BOXVOL_SOCKET"] = str(self.socket)
        self.env = env

    # -- boxvold --

    def start_daemon(self) -> None:
        say(f"$ boxvold --home {self.home} --runtime-dir {self.runtime} &")
        with self.daemon_log.open("wb") as log:
            # A session of its own: Ctrl-C in the terminal reaches the demo, which deletes
            # the exports before it stops boxvold (a direct virtiofsd outlives boxvold).
            self.daemon = subprocess.Popen(
                [
                    str(BIN / "boxvold"),
                    "--home",
                    str(self.home),
                    "--runtime-dir",
                    str(self.runtime),
                ],
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while b"boxvold serving" not in self.daemon_log.read_bytes():
            if self.daemon.poll() is not None or time.monotonic() > deadline:
                raise DemoFailed(f"boxvold did not start:\n{self.daemon_log.read_text()}")
            time.sleep(0.05)
        Client(str(self.socket), timeout=10).health()

    def stop_daemon(self) -> int:
        """SIGTERM, and its exit status (SIGKILL after 30 s)."""
        daemon, self.daemon = self.daemon, None
        if daemon is None:
            return self.daemon_status or 0
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
        try:
            status = daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            status = daemon.wait()
        self.daemon_status = status
        return status

    # -- guests --

    def new_guest(self, role: str, image: GuestImage, script: str, **fields: str) -> Guest:
        """A guest running ``script`` (``{domain}`` and ``fields`` filled in), its domain
        XML written but not yet defined."""
        guest = Guest(self.scratch, role)
        self.guests.append(guest)  # before it exists: clean-up looks for it either way
        script = script.format(domain=guest.name, **fields)
        guest.xml_file.write_text(
            guest_domain_xml(guest.name, image, guest.console_log, script=script)
        )
        return guest

    def connection(self) -> Any:
        if self.conn is None:
            self.conn = libvirt.open(URI)
        return self.conn

    # -- clean-up --

    def cleanup(self) -> list[str]:
        """Tear down whatever is left, in the safe order; what had to be done (or failed)."""
        notes: list[str] = []
        # 1. Domains: QEMU lets go of boxvold's sockets before the exports go.
        if self.guests:
            try:
                conn = self.connection()
            except libvirt.libvirtError as exc:
                conn = None
                notes.append(f"cannot reach libvirt to remove the demo's domains: {exc}")
            for guest in self.guests if conn is not None else []:
                try:
                    dom = conn.lookupByName(guest.name)
                except libvirt.libvirtError:
                    continue
                try:
                    if dom.isActive():
                        dom.destroy()
                        notes.append(f"destroyed domain {guest.name}")
                    dom.undefine()
                    notes.append(f"undefined domain {guest.name}")
                except libvirt.libvirtError as exc:
                    notes.append(f"could not remove domain {guest.name}: {exc}")
        if self.conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                self.conn.close()
            self.conn = None
        # 2. Exports, while boxvold still runs (it stops the virtiofsd behind each).
        if self.daemon is not None and self.daemon.poll() is None:
            client = Client(str(self.socket), timeout=30)
            try:
                for export in client.list_exports():
                    client.remove_export(export["id"])
                    notes.append(f"deleted export {export['id']}")
            except BoxvolError as exc:
                notes.append(f"could not delete boxvold's exports: {exc}")
        # 3. boxvold.
        if self.daemon is not None:
            status = self.stop_daemon()
            notes.append(f"stopped boxvold (status {status})")
        # 4. Anything still serving our directories or running our domains.
        names = [f"guest={g.name}," for g in self.guests]
        for pid, command in processes_naming(str(self.scratch), *names).items():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            notes.append(f"killed {pid}: {command[:100]}")
        # 5. Mounts a crashed boxvold may have left, then the directories.
        for point in mounts_under(self.scratch):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)
            notes.append(f"unmounted {point}")
        shutil.rmtree(self.scratch, ignore_errors=True)
        if self.scratch.exists():
            notes.append(f"could not remove {self.scratch}")
        return notes

    def leftovers(self) -> list[str]:
        """What of the demo is still around (empty: nothing)."""
        left = [f"process {pid}: {cmd[:100]}" for pid, cmd in self.processes().items()]
        with contextlib.suppress(libvirt.libvirtError):
            conn = libvirt.open(URI)
            try:
                defined = {d.name() for d in conn.listAllDomains()}
            finally:
                conn.close()
            left += [f"domain {g.name}" for g in self.guests if g.name in defined]
        if self.scratch.exists():
            left.append(f"directory {self.scratch}")
        return left

    def processes(self) -> dict[int, str]:
        return processes_naming(str(self.scratch), *(f"guest={g.name}," for g in self.guests))


# -- the demo --------------------------------------------------------------------------------


def boot(demo: Demo, shell: Shell, guest: Guest) -> None:
    """Start ``guest``, wait for it to power off and show what it printed."""
    started = time.monotonic()
    shell.virsh("start", guest.name)
    say(f"# waiting for {guest.name} to power off (TCG: 5-20 s) ...")
    seconds = guest.wait_stopped(demo.connection(), started)
    say(f"# {guest.name} powered off after {seconds:.1f} s; its console:")
    show_output("\n".join(guest.said()), prefix="  | ")
    guest.check_done()


def run(demo: Demo) -> None:
    say(f"# scratch dir {demo.scratch} (boxvold's home and runtime dir, console logs)")
    ensure_libvirt_quietly()
    demo.start_daemon()
    shell = Shell(demo.env)
    shell.boxvol("version")
    shell.boxvol("create", VOLUME, "--label", "purpose=demo")
    shell.boxvol("ls")

    say("\n# the test guest: the host's Debian kernel and a busybox initramfs (guest/build.py)")
    image = build_guest(default_out_dir())
    say(f"#   kernel {image.kernel}\n#   initrd {image.initrd}")

    # -- the writer: the named volume at /data, read-write, attached before boot
    token = secrets.token_hex(8)
    writer = demo.new_guest("writer", image, WRITER, token=token)
    say(f"\n# a TCG domain whose guest writes /data/hello.txt: {writer.name}")
    shell.virsh("define", str(writer.xml_file))
    shell.vm("prepare", writer.name)
    shell.vm("attach", writer.name, "-v", f"{VOLUME}:/data", "--config")
    shell.vm("ls", writer.name)
    shell.boxvol("ls")
    boot(demo, shell, writer)
    wrote = writer.lines_with("WROTE: ")
    if len(wrote) != 1 or token not in wrote[0]:
        raise DemoFailed(f"the writer did not report its write: {wrote}")

    say("\n# on the host")
    shell.boxvol("df")
    host_file = Path(Layout(str(demo.home)).named) / VOLUME / "hello.txt"
    say(f"$ cat {host_file}")
    try:
        on_host = host_file.read_text()
    except FileNotFoundError:
        raise DemoFailed(f"the guest's file is not in the volume: {host_file}") from None
    show_output(on_host)
    if on_host.rstrip("\n") != wrote[0]:
        raise DemoFailed(f"the host has {on_host!r}, the guest wrote {wrote[0]!r}")
    say("# the guest's write is on the host")

    # -- the reader: the same volume at /data, read-only
    reader = demo.new_guest("reader", image, READER)
    say(f"\n# a second domain, the same volume read-only: {reader.name}")
    shell.virsh("define", str(reader.xml_file))
    shell.vm("prepare", reader.name)
    shell.vm("attach", reader.name, "-v", f"{VOLUME}:/data:ro", "--config")
    shell.vm("ls", reader.name)
    shell.boxvol("export", "ls", "-q")
    boot(demo, shell, reader)
    read = reader.lines_with("READ: ")
    if read != [on_host.rstrip("\n")]:
        raise DemoFailed(f"the reader read {read}, the host has {on_host!r}")
    say("# the second guest read what the first one wrote")
    refused = reader.lines_with("RO: ")
    intruder = host_file.with_name("intruder.txt")
    if refused != ["write refused"] or intruder.exists():
        raise DemoFailed(f"the read-only guest could write: {refused}, {intruder.exists()}")
    say("# and could not write to it")

    # -- tear down, the way a user would
    say("\n# detach, undefine, remove, stop")
    for guest in (writer, reader):
        shell.vm("detach", guest.name, "/data")
    shell.boxvol("export", "ls")
    for guest in (writer, reader):
        shell.virsh("undefine", guest.name)
    shell.boxvol("rm", VOLUME)
    shell.boxvol("ls")
    say("$ kill -TERM <boxvold>")
    status = demo.stop_daemon()
    log_lines = demo.daemon_log.read_text(errors="replace").splitlines()
    say(f"# boxvold exited with status {status}; the last lines of its log:")
    show_output("\n".join(log_lines[-6:]), prefix="  | ")
    if status != 0:
        raise DemoFailed(f"boxvold exited with status {status}")


def main() -> int:
    """Run the demo; exit 0 only if the guests' write and read both went through and nothing
    of the demo is left behind."""
    if os.geteuid() != 0:
        say("demo: run as root (libvirt's qemu:///system, virtiofsd)")
        return 1
    started = time.monotonic()
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _on_signal)
    demo = Demo()
    outcome: str | None = None
    try:
        run(demo)
    except DemoFailed as exc:
        outcome = f"demo FAILED: {exc}"
    except KeyboardInterrupt:
        outcome = "demo interrupted (Ctrl-C)"
    except Interrupted as exc:
        outcome = f"demo interrupted ({exc})"
    except (BoxvolError, libvirt.libvirtError, OSError, subprocess.SubprocessError) as exc:
        outcome = f"demo FAILED: {type(exc).__name__}: {exc}"
    finally:
        # No second Ctrl-C may cut the clean-up short.
        with _signals_ignored():
            if outcome is not None:
                say(f"\n{outcome}\n# cleaning up")
            notes = demo.cleanup()
            show_output("\n".join(notes), prefix="# cleanup: ")
            left = demo.leftovers()
    if left:
        say("# left behind: " + "; ".join(left))
        outcome = outcome or "demo FAILED: it left things behind"
    else:
        say("# left behind: nothing (domains, exports, virtiofsd, QEMU, boxvold, temp dirs)")
    elapsed = time.monotonic() - started
    if outcome is not None:
        say(f"{outcome} ({elapsed:.1f} s)")
        return 1
    say(f"demo passed in {elapsed:.1f} s")
    return 0


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    signums = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
