"""The OS's view of processes and sockets, for tests: listening TCP sockets of given PIDs
from /proc/net/tcp{,6} and each process's socket inodes (/proc/<pid>/fd)."""

from __future__ import annotations

import ipaddress
import os
import socket

LISTEN = "0A"


def _addr(hex_ip: str) -> str:
    raw = bytes.fromhex(hex_ip)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))  # four little-endian words
    return socket.inet_ntop(socket.AF_INET6, raw)


def listening_sockets() -> dict[int, tuple[str, int]]:
    """``{inode: (address, port)}`` of every listening TCP socket of this network namespace."""
    out = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] != LISTEN:
                continue
            ip, port = f[1].split(":")
            out[int(f[9])] = (_addr(ip), int(port, 16))
    return out


def socket_inodes(pid: int) -> set[int]:
    out = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            out.add(int(link[8:-1]))
    return out


def listeners_of(pids) -> dict[int, list[tuple[str, int]]]:
    """``{pid: [(address, port), ...]}`` of the listening TCP sockets each PID holds."""
    table = listening_sockets()
    return {pid: sorted(table[i] for i in socket_inodes(pid) if i in table) for pid in pids}


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def title(pid: int) -> str:
    """The process's name (/proc/PID/comm, e.g. 'gcs_server') and its command line, whitespace squeezed.

    The whole command line is kept: cut at a fixed width, a deep checkout path hid the binary's name."""
    try:
        comm = open(f"/proc/{pid}/comm").read().strip()
        cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        return f"{comm}: {' '.join(cmd.split())}"
    except OSError:
        return "?"
