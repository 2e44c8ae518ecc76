"""Adapter: the resource API that serves the key fragment, and the key source built on it.

:class:`ResourceApiKeySource` is the :class:`~imageunlock.engine.models.KeySource` of
``spec.keySource.resourceApi`` (or the top-level ``spec.resourceApi``): it reads the account
from a Secret, logs in, fetches the key fragment and derives the key, SHA-256(fragment).

The contract (the seeds document only the key-fragment call; the login call is our
assumption, kept here and in the README so it can change in one place):

* ``POST {api}/login`` with JSON ``{"email": ..., "password": ...}`` → ``200`` JSON
  ``{"token": "..."}``; ``401``/``403`` for bad credentials.
* ``GET {api}/binary-split/key-fragment`` with ``Authorization: Bearer <token>`` →
  ``200`` raw bytes (the fragment); ``401`` when the token expired.

Connection errors, timeouts and 5xx answers are retried with exponential backoff by
urllib3's ``Retry`` (not hand-rolled); whatever is left after that is a transient error.
A ``401`` on the key request triggers one fresh login; a second ``401`` is an
authentication error. Nothing secret (password, token, fragment) is logged or put into
an exception message.

The server is not trusted to be well-behaved:

* The base URL is parsed once, by the one strict parser the spec and the settings use too
  (:func:`~imageunlock.engine.keys.apiurl.parse_api_url`): anything ambiguous (userinfo,
  query, fragment, backslash, whitespace, percent-encoding, non-ASCII) is refused, every
  request URL is built from its canonical form plus a fixed path, and each prepared request
  is checked against that origin as the parser requests itself uses (``urllib3``'s
  ``parse_url``) reads it.
* Redirects are never followed (neither by requests nor by urllib3): following one would
  re-send the password or the token wherever ``Location`` points. A 3xx is a permanent error.
* Answers are streamed and read up to a byte limit, never whole.
* Each call (login, key fetch) has ONE deadline covering connect, headers, body and retries.
  Socket timeouts alone cannot give that (they bound each read, so a 1 byte/s drip never
  ends), so a watchdog timer shuts down the call's sockets when the deadline passes: a
  blocked read returns at once, retry sleeps end, no new connection is opened.
  ``Retry-After`` is obeyed only up to ``max_retry_after``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import requests
from requests.adapters import HTTPAdapter
from urllib3 import ProxyManager
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, InvalidHeader
from urllib3.util import parse_url
from urllib3.util.retry import Retry

from imageunlock.engine.crypto import derive_key
from imageunlock.engine.keys import ApiClientConfig, KeySettings, KeySourceSpec, ReadCredentials, ResourceApiSpec
from imageunlock.engine.keys.apiurl import parse_api_url, url_allowed
from imageunlock.engine.models import Credentials, Phase, Say
from imageunlock.errors import (
    ApiRejectedError,
    ApiUnavailableError,
    AuthenticationError,
    ConfigurationError,
    InternalError,
    LoginRefusedError,
    UnlockError,
)
from imageunlock.metrics import API_REQUESTS

log = logging.getLogger(__name__)

LOGIN_PATH = "/login"
KEY_FRAGMENT_PATH = "/binary-split/key-fragment"
MAX_FRAGMENT_BYTES = 64 * 1024
MAX_LOGIN_ANSWER_BYTES = 64 * 1024
MAX_TOKEN_BYTES = 16 * 1024
_READ_CHUNK = 16 * 1024


class _Watch:
    """The deadline of the call in flight, and the sockets it may have to cut.

    Sockets, not connections: http.client detaches the socket from its connection when an
    answer says ``Connection: close`` (the response then reads through its own reference)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sockets: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        self._expired = threading.Event()
        self._timer: threading.Timer | None = None
        self._generation = 0
        self._ends_at = math.inf

    def start(self, seconds: float) -> None:
        with self._lock:
            self._generation += 1
            self._expired.clear()
            self._ends_at = time.monotonic() + seconds
            self._timer = threading.Timer(seconds, self._expire, args=(self._generation,))
            self._timer.daemon = True
            self._timer.start()

    def stop(self) -> None:
        with self._lock:
            self._generation += 1  # a timer already firing must not touch the next call
            self._ends_at = math.inf
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    @property
    def expired(self) -> bool:
        return self._expired.is_set()

    def remaining(self) -> float:
        return max(0.0, self._ends_at - time.monotonic())

    def wait(self, seconds: float) -> None:
        """A retry sleep that ends early when the deadline passes."""
        self._expired.wait(seconds)

    def adopt(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.add(sock)
        if self.expired:
            _shut(sock)

    def _expire(self, generation: int) -> None:
        with self._lock:
            if generation != self._generation:
                return
            self._expired.set()
            sockets = list(self._sockets)
        for sock in sockets:
            _shut(sock)


def _shut(sock: socket.socket) -> None:
    # a read blocked in another thread returns now; already closed, or TLS-in-TLS (no shutdown): fine
    with contextlib.suppress(OSError, AttributeError):
        sock.shutdown(socket.SHUT_RDWR)


class _WatchedConnection:
    """Mixin for urllib3's connections: no connect past the deadline (and none that could
    outlast it), and the socket is known to the watch so the deadline can shut it down."""

    timeout: Any  # urllib3's connection attributes, which this mixin adjusts and reads
    sock: Any

    def __init__(self, *args: object, watch: _Watch, **kwargs: object) -> None:
        self._watch = watch
        super().__init__(*args, **kwargs)

    def connect(self) -> None:
        remaining = self._watch.remaining()
        if remaining <= 0:
            raise ConnectTimeoutError(self, "the call's deadline has passed")
        if not isinstance(self.timeout, (int, float)) or self.timeout > remaining:
            self.timeout = remaining
        super().connect()  # type: ignore[misc]
        self._watch.adopt(self.sock)


class _HTTPConnection(_WatchedConnection, HTTPConnection):
    pass


class _HTTPSConnection(_WatchedConnection, HTTPSConnection):
    pass


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


class _Adapter(HTTPAdapter):
    """An HTTPAdapter whose connections (direct or through an HTTP proxy) are watched."""

    def __init__(self, watch: _Watch, **kwargs: object) -> None:
        self._pool_classes: dict[str, Any] = {  # partials of the pool classes
            "http": functools.partial(_HTTPPool, watch=watch),
            "https": functools.partial(_HTTPSPool, watch=watch),
        }
        super().__init__(**kwargs)  # type: ignore[arg-type]

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = self._pool_classes

    def proxy_manager_for(self, proxy: str, **kwargs: object) -> object:
        manager = super().proxy_manager_for(proxy, **kwargs)
        if isinstance(manager, ProxyManager):  # not SOCKS: its pools are what talk to the proxy
            manager.pool_classes_by_scheme = self._pool_classes
        return manager


class _Retry(Retry):
    """urllib3's Retry, bounded by the watch: Retry-After capped, sleeps that end at the
    deadline, and no further attempt once it has passed."""

    watch: _Watch
    max_retry_after: float

    def new(self, **kw: object) -> _Retry:
        retry = super().new(**kw)
        retry.watch, retry.max_retry_after = self.watch, self.max_retry_after
        return retry

    def get_retry_after(self, response: object) -> float | None:
        try:
            seconds = super().get_retry_after(response)  # type: ignore[arg-type]
        except InvalidHeader:  # e.g. "Retry-After: soon": back off as usual
            return None
        return None if seconds is None else min(seconds, self.max_retry_after)

    def sleep(self, response: object = None) -> None:
        delay = self.get_retry_after(response) if self.respect_retry_after_header and response else None
        self.watch.wait(delay or self.get_backoff_time())

    def is_exhausted(self) -> bool:
        return self.watch.expired or super().is_exhausted()


def _retry_policy(settings: ApiClientConfig, watch: _Watch) -> Retry:
    retry = _Retry(
        total=settings.retries,
        connect=settings.retries,
        read=settings.retries,
        status=settings.retries,
        other=0,
        redirect=False,  # never follow; hand the 3xx back as it is
        backoff_factor=settings.backoff_factor,
        backoff_max=settings.backoff_max,
        status_forcelist=(500, 502, 503, 504),
        # Login is safe to repeat: it creates nothing. POST must be listed explicitly.
        allowed_methods=frozenset({"GET", "POST"}),
        raise_on_status=False,
        respect_retry_after_header=True,
    )
    retry.watch, retry.max_retry_after = watch, settings.max_retry_after
    return retry


class _Session(requests.Session):
    def get_redirect_target(self, resp: requests.Response) -> None:
        # requests reads a redirect's whole body even with allow_redirects=False; we follow none.
        return None


def _token_from(body: bytes) -> str | None:
    try:
        token = json.loads(body).get("token")
    except (ValueError, AttributeError, RecursionError):
        return None
    usable = isinstance(token, str) and 0 < len(token) <= MAX_TOKEN_BYTES and all("!" <= c <= "~" for c in token)
    return token if usable else None


@contextlib.contextmanager
def _counted(call: str) -> Iterator[None]:
    """Count one resource API call by outcome (imageunlock_resource_api_requests_total)."""
    try:
        yield
    except ApiUnavailableError:
        API_REQUESTS.labels(call, "unavailable").inc()
        raise
    except UnlockError:
        API_REQUESTS.labels(call, "rejected").inc()
        raise
    API_REQUESTS.labels(call, "ok").inc()


class ResourceApiClient:
    """One HTTP session per client; one call at a time."""

    def __init__(self, base_url: str, credentials: Credentials, settings: ApiClientConfig | None = None):
        # The one strict parser (apiurl): requests are built from its canonical form only, and
        # each is checked against that form as urllib3, the parser requests uses, reads it.
        self.base_url = parse_api_url(base_url).url
        url = parse_url(self.base_url)
        self._target = (url.scheme, None, url.host, url.port)
        self._credentials = credentials
        self._settings = settings or ApiClientConfig()
        self._token: str | None = None
        self._watch = _Watch()
        self._session = _Session()
        adapter = _Adapter(self._watch, max_retries=_retry_policy(self._settings, self._watch))
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)

    def close(self) -> None:
        self._watch.stop()
        self._session.close()

    def __enter__(self) -> ResourceApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def login(self) -> None:
        with _counted("login"):
            status, body = self._exchange(
                "POST",
                LOGIN_PATH,
                MAX_LOGIN_ANSWER_BYTES,
                json={"email": self._credentials.email, "password": self._credentials.password},
            )
            self._raise_for_status(status, LOGIN_PATH)
            token = _token_from(body)
            if token is None:
                raise ApiRejectedError(f"resource API login at {self.base_url} answered without a usable token")
        self._token = token
        log.debug("logged in to resource API at %s", self.base_url)

    def key_fragment(self) -> bytes:
        """Fetch the key fragment, logging in (again, once) when needed."""
        if self._token is None:
            self.login()
        with _counted("key_fragment"):
            status, fragment = self._get_fragment()
            if status == 401:
                log.info("resource API token rejected; logging in again once")
                self.login()
                status, fragment = self._get_fragment()
            self._raise_for_status(status, KEY_FRAGMENT_PATH)
            if not fragment:
                raise ApiRejectedError(f"resource API at {self.base_url} returned an empty key fragment")
        return fragment

    def _get_fragment(self) -> tuple[int, bytes]:
        return self._exchange(
            "GET", KEY_FRAGMENT_PATH, MAX_FRAGMENT_BYTES, headers={"Authorization": f"Bearer {self._token}"}
        )

    # -- one call: send, read, all within the deadline --------------------------------------
    def _exchange(self, method: str, path: str, limit: int, **kwargs: object) -> tuple[int, bytes]:
        """Status and body (read only for a 2xx) of one call, urllib3's retries included."""
        self._watch.start(self._settings.deadline)
        try:
            try:
                with self._send(method, path, **kwargs) as response:
                    status = response.status_code
                    body = self._read(response, path, limit) if 200 <= status < 300 else b""
            except requests.exceptions.RequestException as exc:
                if not self._watch.expired:
                    raise self._unavailable(exc, method, path) from None
            # Checked after a "successful" read too: a body without a length, cut by the
            # watchdog, ends like a complete one.
            if self._watch.expired:
                raise ApiUnavailableError(
                    f"resource API at {self.base_url} gave no complete answer within "
                    f"{self._settings.deadline:g}s ({method} {path})"
                )
            return status, body
        finally:
            self._watch.stop()

    def _send(self, method: str, path: str, **kwargs: object) -> requests.Response:
        session = self._session
        request = session.prepare_request(requests.Request(method, self.base_url + path, **kwargs))
        target = parse_url(request.url or "")
        if (target.scheme, target.auth, target.host, target.port) != self._target:
            raise ConfigurationError(
                f"refusing to send a request that would not go to the resource API at {self.base_url}"
            )
        options = session.merge_environment_settings(request.url, {}, True, None, None)
        return session.send(request, allow_redirects=False, timeout=self._timeout, **options)

    @property
    def _timeout(self) -> tuple[float, float]:
        return (self._settings.connect_timeout, self._settings.read_timeout)

    def _read(self, response: requests.Response, path: str, limit: int) -> bytes:
        body = bytearray()
        for chunk in response.iter_content(chunk_size=_READ_CHUNK):
            body += chunk
            if len(body) > limit:  # stop here; closing the response drops the rest unread
                raise ApiRejectedError(
                    f"resource API {path} at {self.base_url} answered more than the "
                    f"{limit}-byte size limit; refusing it"
                )
        return bytes(body)

    def _unavailable(self, exc: Exception, method: str, path: str) -> ApiUnavailableError:
        if isinstance(exc, requests.exceptions.RetryError):
            return ApiUnavailableError(
                f"resource API at {self.base_url} kept failing after {self._settings.retries} retries ({method} {path})"
            )
        if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
            return ApiUnavailableError(
                f"resource API at {self.base_url} unreachable ({method} {path}): {type(exc).__name__}"
            )
        return ApiUnavailableError(f"resource API request failed ({method} {path}): {type(exc).__name__}")

    def _raise_for_status(self, code: int, path: str) -> None:
        if 200 <= code < 300:
            return
        where = f"resource API {path} at {self.base_url}"
        if 300 <= code < 400:
            raise ApiRejectedError(
                f"{where} answered a redirect (HTTP {code}); credentials are never sent to another "
                f"URL: set spec.resourceApi.url to the API's final address"
            )
        if code in (401, 403) and path == LOGIN_PATH:
            raise LoginRefusedError(
                f"{where} rejected the credentials (HTTP {code}); check the email and "
                f"password in the credentials Secret"
            )
        if code == 401:
            raise AuthenticationError(
                f"{where} rejected a fresh token (HTTP 401) after re-login; check that the "
                f"account may fetch key fragments"
            )
        if code == 403:
            raise ApiRejectedError(f"{where} refused access (HTTP 403); the account lacks permission")
        if code >= 500 or code == 429:
            raise ApiUnavailableError(f"{where} failed (HTTP {code})")
        raise ApiRejectedError(f"{where} answered HTTP {code}; check the resource API URL")


class KeyClient(Protocol):
    """A session with the resource API (:class:`ResourceApiClient`; tests put a fake in)."""

    def login(self) -> None: ...
    def key_fragment(self) -> bytes: ...
    def close(self) -> None: ...


class ResourceApiKeySource:
    """The key from the resource API at ``url``, with the account ``credentials`` returns.

    The credentials go to ``url`` only, and only when it lies under one of ``allowed``
    (IMAGEUNLOCK_API_URL_ALLOWLIST; empty: any, for the CLI alone): checked here again, not
    only when the spec was parsed. Its repr shows the URL, never the account."""

    def __init__(
        self,
        url: str,
        credentials: Callable[[], Credentials],
        settings: ApiClientConfig | None = None,
        *,
        allowed: Sequence[str] = (),
        client: Callable[[str, Credentials, ApiClientConfig], KeyClient] | None = None,
    ) -> None:
        self.url = url
        self._credentials = credentials
        self._settings = settings or ApiClientConfig()
        self._allowed = tuple(allowed)
        self._client = client  # None: ResourceApiClient (a test puts a fake in)

    def __repr__(self) -> str:
        return f"ResourceApiKeySource({self.url!r})"

    def open(self) -> _ResourceApiSession:
        if self._allowed and not url_allowed(self.url, self._allowed):
            raise ConfigurationError(
                f"resource API {self.url!r} is not an allowed resource API ({', '.join(self._allowed)}; "
                "operator setting IMAGEUNLOCK_API_URL_ALLOWLIST): the credentials are only ever sent to allowed APIs"
            )
        return _ResourceApiSession(self.url, self._credentials(), self._settings, self._client or ResourceApiClient)


class _ResourceApiSession:
    def __init__(
        self,
        url: str,
        credentials: Credentials,
        settings: ApiClientConfig,
        client: Callable[[str, Credentials, ApiClientConfig], KeyClient],
    ) -> None:
        self.url, self._credentials, self._settings, self._new_client = url, credentials, settings, client
        self._client: KeyClient | None = None

    def __repr__(self) -> str:
        return f"<resource API session at {self.url}>"

    def authenticate(self, say: Say) -> None:
        say(Phase.AUTHENTICATING, "logging in to the resource API")
        self._client = self._new_client(self.url, self._credentials, self._settings)
        self._client.login()

    def get_key(self, say: Say) -> bytes:
        if self._client is None:
            raise InternalError("the resource API key was requested before logging in")
        say(Phase.FETCHING_KEY, "fetching the key fragment")
        return derive_key(self._client.key_fragment())

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def build(spec: KeySourceSpec, settings: KeySettings, credentials: ReadCredentials) -> ResourceApiKeySource:
    """The key-source registry's factory (keys/__init__.py)."""
    if not isinstance(spec, ResourceApiSpec) or spec.secret_name is None:
        raise InternalError(f"not a resource API key source: {spec.member}")
    secret = spec.secret_name
    return ResourceApiKeySource(spec.url, lambda: credentials(secret), settings.api, allowed=settings.allowed_api_urls)
