"""Loopback helpers for tests and the demo."""

from __future__ import annotations

import json
import socket
import urllib.request
from typing import Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def healthz(port: int, timeout: float = 2) -> dict[str, Any] | None:
    """The operator's liveness endpoint on ``port`` (kopf's probe results, JSON) when it
    answers 200, else None (not listening yet, busy past ``timeout``, or unhealthy)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=timeout) as response:
            return json.loads(response.read() or b"{}") if response.status == 200 else None
    except OSError:  # refused, reset, timed out, or an HTTP error status
        return None
