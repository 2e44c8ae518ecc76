"""A real HTTP server on 127.0.0.1 whose answers a test writes byte by byte (a fixture).

``FakeResourceApi`` is a well-behaved API with faults at the status level; this one misbehaves
on the wire, as a hostile or broken resource API could: redirects, oversized or endless bodies,
headers or bodies dripped a byte at a time, huge ``Retry-After`` values. Every request is
recorded and handed to ``answer(request, out)``; ``out.write`` counts the bytes the kernel
accepted, so a test can tell how much of a huge body the client let the server send.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class Stopped(Exception):
    """The server is stopping: a dripping answer ends."""


class Out:
    def __init__(self, server: ScriptedServer, handler: BaseHTTPRequestHandler) -> None:
        self._server, self._handler = server, handler

    def write(self, data: bytes) -> None:
        self._handler.wfile.write(data)  # unbuffered: returns once the kernel took it all
        with self._server._lock:
            self._server.sent += len(data)

    def pause(self, seconds: float) -> None:
        if self._server._stopping.wait(seconds):
            raise Stopped


Answer = Callable[[Request, Out], None]


def head(status: int, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"HTTP/1.1 {status} Scripted"] + [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def respond(out: Out, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
    out.write(head(status, {"Content-Length": str(len(body)), "Connection": "close", **(headers or {})}) + body)


class ScriptedServer:
    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.requests: list[Request] = []
        self.sent = 0  # bytes of all answers that the kernel accepted
        self._lock = threading.Condition()
        self._active = 0
        self._stopping = threading.Event()
        self._server = _Server(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        assert isinstance(host, str)  # an IPv4 server's address (typed to allow the bytes of others)
        return f"http://{host}:{port}"

    def start(self) -> ScriptedServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> ScriptedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no answer is being written (e.g. a huge body the client hung up on)."""
        with self._lock:
            return self._lock.wait_for(lambda: self._active == 0, timeout)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        scripted = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                return

            def handle(self) -> None:
                with scripted._lock:
                    scripted._active += 1
                try:
                    super().handle()
                except (OSError, Stopped):
                    pass  # the client hung up (what the size and deadline tests expect) or we stop
                finally:
                    with scripted._lock:
                        scripted._active -= 1
                        scripted._lock.notify_all()

            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                request = Request(self.command, self.path, dict(self.headers.items()), self.rfile.read(length))
                with scripted._lock:
                    scripted.requests.append(request)
                self.close_connection = True  # one request per connection keeps scripts simple
                scripted.answer(request, Out(scripted, self))

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _any

        return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        return
