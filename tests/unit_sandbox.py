"""Run a command under the seccomp part of a systemd unit's sandbox, read from the unit file.

    /usr/bin/python3 tests/unit_sandbox.py deploy/cryid.service -- COMMAND [ARGS...]

systemd is not PID 1 on the test machines, so the unit cannot be started; this applies the same
kernel filters systemd 252 would install for the unit, then execs COMMAND (filters survive exec):

- ``SystemCallFilter=`` (allow-list, then ``~`` deny-lists; groups expanded by
  ``systemd-analyze syscall-filter``) with ``SystemCallErrorNumber=``,
- ``RestrictAddressFamilies=`` (allow-list: ``socket()`` of any other family fails with EAFNOSUPPORT),
- ``MemoryDenyWriteExecute=yes`` (as systemd's seccomp rules: no W+X ``mmap``, no ``mprotect`` /
  ``pkey_mprotect`` to executable, no ``shmat`` with SHM_EXEC),
- ``NoNewPrivileges=yes``.

Namespaces and mounts (``ProtectSystem=``, ``PrivateTmp=``, ``DeviceAllow=``, ...) are not emulated.
Needs the python3-seccomp Debian package (libseccomp's bindings), so run it with the system Python.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from pathlib import Path

import seccomp  # python3-seccomp

PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000
MAX_FAMILY = 64


def unit_entries(path: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def expand(names: list[str], cache: dict[str, set[str]]) -> set[str]:
    """Syscall names of a list of names and @groups (recursively, as systemd-analyze lists them)."""
    out: set[str] = set()
    for name in names:
        if not name.startswith("@"):
            out.add(name)
            continue
        if name not in cache:
            text = subprocess.run(
                ["systemd-analyze", "syscall-filter", name], capture_output=True, text=True, check=True
            ).stdout
            lines = [ln.strip() for ln in text.splitlines()[1:]]
            members = [ln for ln in lines if ln and not ln.startswith("#")]
            cache[name] = expand(members, cache)
        out |= cache[name]
    return out


def syscall_filter(entries: dict[str, list[str]]) -> seccomp.SyscallFilter | None:
    lines = entries.get("SystemCallFilter", [])
    if not lines:
        return None
    cache: dict[str, set[str]] = {}
    if lines[0].startswith("~"):
        raise SystemExit("unit_sandbox: only an allow-list first SystemCallFilter= is supported")
    allowed = expand(lines[0].split(), cache)
    for line in lines[1:]:
        names = line.lstrip("~").split()
        allowed = allowed - expand(names, cache) if line.startswith("~") else allowed | expand(names, cache)
    err = entries.get("SystemCallErrorNumber", ["EPERM"])[-1]
    f = seccomp.SyscallFilter(defaction=seccomp.ERRNO(getattr(errno, err)))
    for name in sorted(allowed):
        try:
            f.add_rule(seccomp.ALLOW, name)
        except (RuntimeError, ValueError):  # not a syscall on this architecture
            continue
    return f


def family_filter(entries: dict[str, list[str]]) -> seccomp.SyscallFilter | None:
    lines = entries.get("RestrictAddressFamilies", [])
    if not lines:
        return None
    allowed = {int(getattr(socket, name)) for name in lines[-1].split()}
    f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    for fam in range(MAX_FAMILY):
        if fam not in allowed:
            f.add_rule(seccomp.ERRNO(errno.EAFNOSUPPORT), "socket", seccomp.Arg(0, seccomp.EQ, fam))
    f.add_rule(seccomp.ERRNO(errno.EAFNOSUPPORT), "socket", seccomp.Arg(0, seccomp.GE, MAX_FAMILY))
    return f


def mdwe_filter(entries: dict[str, list[str]]) -> seccomp.SyscallFilter | None:
    if entries.get("MemoryDenyWriteExecute", ["no"])[-1] != "yes":
        return None
    f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    eperm = seccomp.ERRNO(errno.EPERM)
    wx = PROT_WRITE | PROT_EXEC
    f.add_rule(eperm, "mmap", seccomp.Arg(2, seccomp.MASKED_EQ, wx, wx))
    f.add_rule(eperm, "mprotect", seccomp.Arg(2, seccomp.MASKED_EQ, PROT_EXEC, PROT_EXEC))
    f.add_rule(eperm, "pkey_mprotect", seccomp.Arg(2, seccomp.MASKED_EQ, PROT_EXEC, PROT_EXEC))
    f.add_rule(eperm, "shmat", seccomp.Arg(2, seccomp.MASKED_EQ, SHM_EXEC, SHM_EXEC))
    return f


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: unit_sandbox.py UNIT -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    entries = unit_entries(Path(argv[0]))
    filters = [f for f in (mdwe_filter(entries), family_filter(entries), syscall_filter(entries)) if f]
    for f in filters:  # each is its own kernel filter, as systemd installs them; NNP is set by load()
        f.load()
    os.execvp(argv[2], argv[2:])
    return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
