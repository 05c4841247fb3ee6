"""Small network helpers with no heavy imports (launchers use them before any model code loads)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port free on the loopback interface now (another process may still take it first)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
