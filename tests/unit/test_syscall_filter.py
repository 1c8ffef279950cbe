"""The sandbox's syscall filter: its BPF program interpreted here, then loaded for real into a
child process that must lose exactly the denied syscalls."""

from __future__ import annotations

import errno
import subprocess
import sys

from volumed.syscall_filter import (
    AUDIT_ARCH_X86_64,
    DENIED_X86_64,
    RET_ALLOW,
    RET_ERRNO,
    RET_KILL_PROCESS,
    Instruction,
    filter_program,
)


def run_bpf(program: list[Instruction], nr: int, arch: int) -> int:
    """What classic BPF ``program`` returns for a syscall (the subset seccomp programs use)."""
    data = {0: nr, 4: arch}
    acc, pc = 0, 0
    while True:
        code, jt, jf, k = program[pc]
        if code == 0x20:
            acc = data[k]
        elif code == 0x06:
            return k
        elif code == 0x15:
            pc += jt if acc == k else jf
        elif code == 0x35:
            pc += jt if acc >= k else jf
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")
        pc += 1


def test_the_program_denies_exactly_the_list() -> None:
    denied = sorted(DENIED_X86_64.values())
    program = filter_program(AUDIT_ARCH_X86_64, denied)
    eperm = RET_ERRNO | errno.EPERM
    for nr in range(0, 460):
        expected = eperm if nr in denied else RET_ALLOW
        assert run_bpf(program, nr, AUDIT_ARCH_X86_64) == expected, nr
    assert run_bpf(program, 0x40000000 + 2, AUDIT_ARCH_X86_64) == eperm  # x32 ABI
    assert run_bpf(program, 0, 0x40000003) == RET_KILL_PROCESS  # i386 ABI


def test_the_list_has_no_syscall_twice() -> None:
    assert len(set(DENIED_X86_64.values())) == len(DENIED_X86_64)


CHILD = """
import ctypes, errno, os, sys
from volumed.syscall_filter import install
ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)  # no_new_privs, as the sandbox sets it
assert install()
libc = ctypes.CDLL(None, use_errno=True)
results = []
for name, call in (
    ("unshare", lambda: libc.unshare(0x20000)),
    # Targets that do not exist: unfiltered, these fail with ENOENT, never mount anything.
    ("mount", lambda: libc.mount(b"none", b"/nonexistent-boxvol", b"tmpfs", 0, None)),
    ("umount2", lambda: libc.umount2(b"/nonexistent-boxvol", 2)),
):
    rc = call()
    results.append(f"{name}={rc},{ctypes.get_errno()}")
with open("/proc/self/status") as status:
    seccomp = [line.split()[1] for line in status if line.startswith("Seccomp:")][0]
fd = os.open("/proc/self/status", os.O_RDONLY)  # ordinary syscalls still work
os.close(fd)
print(" ".join(results), f"seccomp={seccomp}")
"""


def test_a_child_loses_the_denied_syscalls_and_keeps_the_rest() -> None:
    result = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    eperm = errno.EPERM
    assert result.stdout.split() == [
        f"unshare=-1,{eperm}",
        f"mount=-1,{eperm}",
        f"umount2=-1,{eperm}",
        "seccomp=2",
    ]
