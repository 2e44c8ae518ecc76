"""Adapter: the resource API that serves the key fragment.

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
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from .errors import ApiRejectedError, ApiUnavailableError, AuthenticationError, ConfigurationError

log = logging.getLogger(__name__)

LOGIN_PATH = "/login"
KEY_FRAGMENT_PATH = "/binary-split/key-fragment"
MAX_FRAGMENT_BYTES = 64 * 1024
MAX_TOKEN_BYTES = 16 * 1024


@dataclass(frozen=True)
class Credentials:
    email: str
    password: str = field(repr=False)

    def __post_init__(self) -> None:
        if not self.email or not self.password:
            raise ConfigurationError("credentials need a non-empty email and password")


@dataclass(frozen=True)
class ApiSettings:
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    retries: int = 3
    backoff_factor: float = 0.5
    backoff_max: float = 10.0


def _retry_policy(settings: ApiSettings) -> Retry:
    return Retry(
        total=settings.retries,
        connect=settings.retries,
        read=settings.retries,
        status=settings.retries,
        other=0,
        backoff_factor=settings.backoff_factor,
        backoff_max=settings.backoff_max,
        status_forcelist=(500, 502, 503, 504),
        # Login is safe to repeat: it creates nothing. POST must be listed explicitly.
        allowed_methods=frozenset({"GET", "POST"}),
        raise_on_status=False,
        respect_retry_after_header=True,
    )


class ResourceApiClient:
    """One HTTP session per client; thread-safe enough for one unlock at a time."""

    def __init__(self, base_url: str, credentials: Credentials, settings: ApiSettings | None = None):
        if not base_url or not base_url.startswith(("http://", "https://")):
            raise ConfigurationError(
                f"resource API URL must start with http:// or https:// (got {base_url!r})"
            )
        self.base_url = base_url.rstrip("/")
        self._credentials = credentials
        self._settings = settings or ApiSettings()
        self._token: str | None = None
        self._session = requests.Session()
        adapter = HTTPAdapter(max_retries=_retry_policy(self._settings))
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self.requests_made = {"login": 0, "key_fragment": 0}

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> ResourceApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def _timeout(self) -> tuple[float, float]:
        return (self._settings.connect_timeout, self._settings.read_timeout)

    def _send(self, method: str, path: str, **kwargs: object) -> requests.Response:
        url = self.base_url + path
        try:
            return self._session.request(method, url, timeout=self._timeout, **kwargs)
        except requests.exceptions.RetryError:
            raise ApiUnavailableError(
                f"resource API at {self.base_url} kept failing after "
                f"{self._settings.retries} retries ({method} {path})"
            ) from None
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
            raise ApiUnavailableError(
                f"resource API at {self.base_url} unreachable ({method} {path}): "
                f"{type(exc).__name__}"
            ) from None
        except requests.exceptions.RequestException as exc:
            raise ApiUnavailableError(
                f"resource API request failed ({method} {path}): {type(exc).__name__}"
            ) from None

    def login(self) -> None:
        self.requests_made["login"] += 1
        response = self._send(
            "POST",
            LOGIN_PATH,
            json={"email": self._credentials.email, "password": self._credentials.password},
        )
        self._raise_for_status(response, LOGIN_PATH)
        try:
            token = response.json().get("token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_BYTES:
            raise ApiRejectedError(
                f"resource API login at {self.base_url} answered without a usable token"
            )
        self._token = token
        log.debug("logged in to resource API at %s", self.base_url)

    def key_fragment(self) -> bytes:
        """Fetch the key fragment, logging in (again, once) when needed."""
        if self._token is None:
            self.login()
        response = self._get_fragment()
        if response.status_code == 401:
            log.info("resource API token rejected; logging in again once")
            self.login()
            response = self._get_fragment()
        self._raise_for_status(response, KEY_FRAGMENT_PATH)
        fragment = response.content
        if not fragment or len(fragment) > MAX_FRAGMENT_BYTES:
            raise ApiRejectedError(
                f"resource API at {self.base_url} returned an unusable key fragment "
                f"({len(fragment)} bytes)"
            )
        return fragment

    def _get_fragment(self) -> requests.Response:
        self.requests_made["key_fragment"] += 1
        return self._send(
            "GET", KEY_FRAGMENT_PATH, headers={"Authorization": f"Bearer {self._token}"}
        )

    def _raise_for_status(self, response: requests.Response, path: str) -> None:
        code = response.status_code
        if 200 <= code < 300:
            return
        where = f"resource API {path} at {self.base_url}"
        if code in (401, 403) and path == LOGIN_PATH:
            raise AuthenticationError(
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
