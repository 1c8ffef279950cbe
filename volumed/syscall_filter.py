"""The syscall filter of a sandboxed process that works on one volume's data.

A deny list, not an allow list: the export servers and the archive worker run CPython, whose
syscalls vary with versions and libraries, and an allow list that misses one breaks serving.
What is denied is what such a process never needs and what an attacker who took it over would
reach for: changing mounts and namespaces (which could undo the sandbox), other processes'
memory, the kernel (modules, kexec, BPF, perf, keys, io_uring), the clock, and raw I/O ports.
Each answers EPERM; a syscall of another architecture ABI kills the process. x86-64 only:
elsewhere ``install`` logs that no filter was installed (the rest of the sandbox stands).

``filter_program`` builds the classic-BPF program (pure, tested by interpreting it);
``install`` loads it (needs no_new_privs, set by the sandbox first).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import platform
import struct

log = logging.getLogger(__name__)

#: x86-64 syscall numbers denied, by name (arch/x86/entry/syscalls/syscall_64.tbl).
DENIED_X86_64: dict[str, int] = {
    # mounts and namespaces: the sandbox's own tools, never needed once inside it
    "mount": 165,
    "umount2": 166,
    "pivot_root": 155,
    "chroot": 161,
    "unshare": 272,
    "setns": 308,
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "fspick": 433,
    "mount_setattr": 442,
    # reaching files and processes around the sandbox
    "open_by_handle_at": 304,
    "ptrace": 101,
    "process_vm_readv": 310,
    "process_vm_writev": 311,
    "kcmp": 312,
    "pidfd_getfd": 438,
    # the kernel
    "kexec_load": 246,
    "kexec_file_load": 320,
    "init_module": 175,
    "finit_module": 313,
    "delete_module": 176,
    "reboot": 169,
    "swapon": 167,
    "swapoff": 168,
    "acct": 163,
    "syslog": 103,
    "bpf": 321,
    "perf_event_open": 298,
    "userfaultfd": 323,
    "keyctl": 250,
    "add_key": 248,
    "request_key": 249,
    "quotactl": 179,
    "io_uring_setup": 425,
    "io_uring_enter": 426,
    "io_uring_register": 427,
    # the clock and raw I/O
    "settimeofday": 164,
    "clock_settime": 227,
    "adjtimex": 159,
    "clock_adjtime": 305,
    "iopl": 172,
    "ioperm": 173,
}
AUDIT_ARCH_X86_64 = 0xC000003E
#: Syscall numbers from here up are the x32 ABI's on x86-64.
X32_SYSCALL_BIT = 0x40000000

# Classic BPF and seccomp constants (linux/filter.h, linux/seccomp.h).
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_RET_K = 0x06
RET_KILL_PROCESS = 0x80000000
RET_ERRNO = 0x00050000
RET_ALLOW = 0x7FFF0000
_OFFSET_NR = 0
_OFFSET_ARCH = 4
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2

Instruction = tuple[int, int, int, int]


def filter_program(
    arch: int, denied: list[int], *, denied_errno: int = errno.EPERM
) -> list[Instruction]:
    """The BPF program: kill on another ABI, ``denied_errno`` for the x32 ABI and each
    syscall in ``denied``, allow everything else. Instructions are (code, jt, jf, k)."""
    if len(denied) > 250:
        raise ValueError("too many syscalls for one jump table")
    count = len(denied)
    program: list[Instruction] = [
        (_LD_W_ABS, 0, 0, _OFFSET_ARCH),
        (_JEQ_K, 1, 0, arch),
        (_RET_K, 0, 0, RET_KILL_PROCESS),
        (_LD_W_ABS, 0, 0, _OFFSET_NR),
        # Jumps count from the next instruction; the errno answer is the program's last.
        (_JGE_K, count + 1, 0, X32_SYSCALL_BIT),
    ]
    program += [(_JEQ_K, count - i, 0, nr) for i, nr in enumerate(denied)]
    program += [(_RET_K, 0, 0, RET_ALLOW), (_RET_K, 0, 0, RET_ERRNO | denied_errno)]
    return program


def install() -> bool:
    """Load the filter into this process (and every child it starts); False, logged, where
    no filter is defined (not x86-64). Needs no_new_privs. Must run before threads start."""
    if platform.machine() != "x86_64":
        log.warning(
            "no syscall filter for machine=%s; the rest of the sandbox stands", platform.machine()
        )
        return False
    program = filter_program(AUDIT_ARCH_X86_64, sorted(DENIED_X86_64.values()))
    raw = b"".join(struct.pack("=HBBI", *instruction) for instruction in program)
    buffer = ctypes.create_string_buffer(raw, len(raw))

    class _Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = _Program(len(program), ctypes.cast(buffer, ctypes.c_void_p))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"sandbox: syscall filter: {os.strerror(err)}")
    return True
