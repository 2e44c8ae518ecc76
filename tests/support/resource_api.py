"""A real HTTP resource API on 127.0.0.1 for tests and the demo (a fixture, not the product).

Implements the contract in ``imageunlock.engine.keys.resource_api``: ``POST /login`` (JSON email and
password → token) and ``GET /binary-split/key-fragment`` (Bearer token → raw fragment), with
real token checks and fault injection: n answers of a given status, expired tokens, slow
answers. Counts every call so tests can assert, e.g., that the fast path made no key request.

Run as a script for ``make demo``::

    python tests/support/resource_api.py --port-file F --fragment-file K  (credentials from env)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import sys
import threading
import time
from collections import Counter, defaultdict, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOGIN = "/login"
KEY = "/binary-split/key-fragment"

# The account the tests' resource API accepts (a fresh password each test session).
TEST_EMAIL = "edge@example.test"
TEST_PASSWORD = "pw-" + secrets.token_hex(8)


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        return  # a client that timed out and hung up (the slow-answer tests) is expected


class FakeResourceApi:
    def __init__(self, email: str, password: str, fragment: bytes, host: str = "127.0.0.1") -> None:
        self.email, self.password, self.fragment = email, password, fragment
        self.tokens: set[str] = set()
        self.issued: list[str] = []  # every token ever handed out (for secret-hygiene checks)
        self.calls: Counter[str] = Counter()
        self.faulted: Counter[str] = Counter()  # requests answered with an injected fault
        self.delay = 0.0
        self._gates: dict[str, threading.Event] = {}
        self._faults: dict[str, deque[int]] = defaultdict(deque)
        self._failing: dict[str, int] = {}  # path -> status, until stop_failing
        self._lock = threading.Lock()
        self._server = _QuietServer((host, 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    # -- fault injection ---------------------------------------------------------------
    def fail(self, path: str, status: int, times: int = 1) -> None:
        """The next ``times`` requests to ``path`` answer ``status``."""
        with self._lock:
            self._faults[path].extend([status] * times)

    def fail_until_stopped(self, path: str, status: int) -> None:
        """Every request to ``path`` answers ``status`` until :meth:`stop_failing`: a state
        that lasts until the test has seen what it waits for, not a window it may miss."""
        with self._lock:
            self._failing[path] = status

    def stop_failing(self, path: str) -> None:
        with self._lock:
            self._failing.pop(path, None)

    def hold(self, path: str) -> threading.Event:
        """Requests to ``path`` wait (after being counted) until the returned event is set:
        a test gates the moment it needs instead of polling for it. ``reset`` releases."""
        gate = threading.Event()
        with self._lock:
            self._gates[path] = gate
        return gate

    def expire_tokens(self) -> None:
        with self._lock:
            self.tokens.clear()

    # -- lifecycle ---------------------------------------------------------------------
    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        assert isinstance(host, str)  # an IPv4 server's address (typed to allow the bytes of others)
        return f"http://{host}:{port}"

    def start(self) -> FakeResourceApi:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakeResourceApi:
        """Started for a ``with`` block, stopped at its end."""
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset(self) -> None:
        with self._lock:
            self.calls.clear()
            self.faulted.clear()
            self._faults.clear()
            self._failing.clear()
            self.tokens.clear()
            self.delay = 0.0
            gates, self._gates = list(self._gates.values()), {}
        for gate in gates:
            gate.set()

    def _next_fault(self, path: str) -> int | None:
        with self._lock:
            queue = self._faults.get(path)
            fault = queue.popleft() if queue else self._failing.get(path)
            if fault is not None:
                self.faulted[path] += 1
            return fault

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet; tests read counters
                return

            def _answer(self, status: int, body: bytes, content_type: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _common(self, path: str) -> bool:
                with api._lock:
                    api.calls[path] += 1
                if api.delay:
                    time.sleep(api.delay)
                gate = api._gates.get(path)
                if gate is not None:
                    gate.wait(120)  # bounded: a forgotten gate never hangs the suite
                fault = api._next_fault(path)
                if fault is not None:
                    self._answer(fault, json.dumps({"error": f"injected {fault}"}).encode())
                    return False
                return True

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                if self.path != LOGIN:
                    return self._answer(404, b'{"error":"not found"}')
                if not self._common(LOGIN):
                    return
                try:
                    creds = json.loads(body)
                except ValueError:
                    return self._answer(400, b'{"error":"bad json"}')
                ok = secrets.compare_digest(str(creds.get("email", "")), api.email) and secrets.compare_digest(
                    str(creds.get("password", "")), api.password
                )
                if not ok:
                    return self._answer(401, b'{"error":"invalid credentials"}')
                token = secrets.token_urlsafe(24)
                with api._lock:
                    api.tokens.add(token)
                    api.issued.append(token)
                self._answer(200, json.dumps({"token": token}).encode())

            def do_GET(self) -> None:
                if self.path == "/health":
                    return self._answer(200, b'{"status":"healthy"}')
                if self.path != KEY:
                    return self._answer(404, b'{"error":"not found"}')
                if not self._common(KEY):
                    return
                auth = self.headers.get("Authorization", "")
                token = auth[len("Bearer ") :] if auth.startswith("Bearer ") else ""
                with api._lock:
                    valid = token in api.tokens
                if not valid:
                    return self._answer(401, b'{"error":"invalid token"}')
                self._answer(200, api.fragment, "application/octet-stream")

        return Handler


def main() -> int:
    parser = argparse.ArgumentParser(description="demo resource API on 127.0.0.1")
    parser.add_argument("--fragment-file", required=True)
    parser.add_argument("--port-file", required=True, help="where to write the URL once listening")
    args = parser.parse_args()
    with open(args.fragment_file, "rb") as f:
        fragment = f.read()
    api = FakeResourceApi(os.environ["DEMO_API_EMAIL"], os.environ["DEMO_API_PASSWORD"], fragment).start()
    with open(args.port_file + ".tmp", "w") as f:
        f.write(api.url)
    os.replace(args.port_file + ".tmp", args.port_file)
    print(f"demo resource API listening on {api.url}", file=sys.stderr, flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        threading.Event().wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
