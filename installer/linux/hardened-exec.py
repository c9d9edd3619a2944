#!/usr/bin/env python3
"""Run a command under the seccomp filters etims-agent.service asks systemd for, without systemd.

    installer/linux/hardened-exec.py COMMAND [ARGS...]

`make smoke` runs the built binary through this a second time, so a binary that needs writable
and executable memory, or a socket family the unit does not allow, fails in CI rather than on a
shop's machine. It applies, as systemd 252 does (src/shared/seccomp-util.c):

- NoNewPrivileges=yes               prctl(PR_SET_NO_NEW_PRIVS)
- MemoryDenyWriteExecute=yes        mmap with PROT_WRITE|PROT_EXEC, mprotect/pkey_mprotect adding
                                    PROT_EXEC and shmat with SHM_EXEC fail with EPERM
- RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
                                    socket() of any other family fails with EAFNOSUPPORT
- SystemCallFilter=@system-service, SystemCallFilter=~@privileged @resources,
  SystemCallErrorNumber=EPERM
                                    any other system call fails with EPERM; the groups are read from
                                    `systemd-analyze syscall-filter`, so they are this systemd's own
- UMask=0077

HARDENED_EXEC_DENY=kill makes a refused system call kill the process instead (SIGSYS), to find out
whether the agent tries one at all (with EPERM a library may fall back quietly).

The file-system sandbox (ProtectSystem, PrivateTmp, ...) needs a service manager and is checked by
`systemd-analyze verify` / `security` instead. Needs Linux, libseccomp (libseccomp2) and
systemd-analyze. Standard library only: it runs on the system python3, not in the venv.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import socket
import subprocess
import sys

PROT_WRITE, PROT_EXEC = 0x2, 0x4
SHM_EXEC = 0o100000
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_KILL_PROCESS = 0x80000000
SCMP_CMP_MASKED_EQ = 7
PR_SET_NO_NEW_PRIVS = 38
AF_MAX = 46  # families 0..45 on Linux 6.x; anything not allowed below is refused
ALLOWED_FAMILIES = {socket.AF_UNIX, socket.AF_INET, socket.AF_INET6}


def errno_action(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)  # SCMP_ACT_ERRNO(code)


def syscall_groups() -> dict[str, list[str]]:
    """systemd's system-call groups: {"@system-service": ["@aio", ..., "ioctl", ...], ...}."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        sys.exit("hardened-exec: systemd-analyze is needed for the system-call groups")
    text = subprocess.run([tool, "syscall-filter"], check=True, capture_output=True, text=True).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif not line.strip():
            current = None
        elif current is not None and not line.strip().startswith("#"):
            current.append(line.strip())
    return groups


def expand(name: str, groups: dict[str, list[str]]) -> set[str]:
    if not name.startswith("@"):
        return {name}
    return set().union(*(expand(member, groups) for member in groups[name]))


def allowed_syscalls() -> set[str]:
    groups = syscall_groups()
    return expand("@system-service", groups) - expand("@privileged", groups) - expand("@resources", groups)


class ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        sys.exit(__doc__)
    lib = ctypes.CDLL(ctypes.util.find_library("seccomp") or "libseccomp.so.2", use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(ArgCmp)]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
    deny = SCMP_ACT_KILL_PROCESS if os.environ.get("HARDENED_EXEC_DENY") == "kill" else errno_action(errno.EPERM)

    # Filter 1, SystemCallFilter: only the allowed system calls (seccomp filters stack; the
    # strictest answer of all of them wins, as with the several filters systemd installs).
    calls = lib.seccomp_init(deny)
    for name in sorted(allowed_syscalls()):
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr >= 0:  # a name of another architecture
            rc = lib.seccomp_rule_add(calls, SCMP_ACT_ALLOW, nr, 0)
            if rc:
                sys.exit(f"hardened-exec: seccomp rule for {name} failed ({os.strerror(-rc)})")

    # Filter 2: MemoryDenyWriteExecute and RestrictAddressFamilies.
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx or not calls:
        sys.exit("hardened-exec: seccomp_init failed")

    def refuse(syscall: str, code: int, arg: int, mask: int, value: int) -> None:
        nr = lib.seccomp_syscall_resolve_name(syscall.encode())
        if nr < 0:  # not a syscall on this architecture (pkey_mprotect on old kernels' headers)
            return
        cmp = (ArgCmp * 1)(ArgCmp(arg, SCMP_CMP_MASKED_EQ, mask, value))
        rc = lib.seccomp_rule_add_array(ctx, errno_action(code), nr, 1, cmp)
        if rc:
            sys.exit(f"hardened-exec: seccomp rule for {syscall} failed ({os.strerror(-rc)})")

    # MemoryDenyWriteExecute=yes
    refuse("mmap", errno.EPERM, 2, PROT_EXEC | PROT_WRITE, PROT_EXEC | PROT_WRITE)
    refuse("mprotect", errno.EPERM, 2, PROT_EXEC, PROT_EXEC)
    refuse("pkey_mprotect", errno.EPERM, 2, PROT_EXEC, PROT_EXEC)
    refuse("shmat", errno.EPERM, 2, SHM_EXEC, SHM_EXEC)
    # RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
    for family in range(AF_MAX):
        if family not in ALLOWED_FAMILIES:
            refuse("socket", errno.EAFNOSUPPORT, 0, 0xFFFFFFFF, family)

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0):
        sys.exit(f"hardened-exec: PR_SET_NO_NEW_PRIVS failed ({os.strerror(ctypes.get_errno())})")
    for filt in (ctx, calls):
        rc = lib.seccomp_load(filt)
        if rc:
            sys.exit(f"hardened-exec: seccomp_load failed ({os.strerror(-rc)})")
    os.umask(0o077)
    os.execvp(argv[1], argv[1:])


if __name__ == "__main__":
    main(sys.argv)
