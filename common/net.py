"""Small network helpers with no heavy imports (launchers use them before any model code loads)."""

from __future__ import annotations

import random
import socket

# not the `random` module's state: tests seed that, and every process would then pick alike
_RANDOM = random.SystemRandom()
_HANDED_OUT: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default; macOS uses 49152-65535, above it too


def free_port() -> int:
    """A TCP port free on the loopback interface now, for a server started a moment later.

    Ports the kernel hands out itself (`bind(0)`, and the source port of every outgoing connection:
    gloo's, httpx's, UCX's) come from its ephemeral range, so a port taken from there can be taken
    again by any connection before our server binds it. We pick below that range instead, check the
    port binds, and never hand the same one out twice from this process."""
    low, _ = _ephemeral_range()
    floor = 10000
    for _ in range(500):
        port = _RANDOM.randrange(floor, low) if low - floor >= 1000 else 0
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            port = s.getsockname()[1]
        _HANDED_OUT.add(port)
        return port
    raise OSError("no free TCP port below the ephemeral range")
