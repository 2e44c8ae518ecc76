"""Resource API base URLs: one strict grammar, one canonical form, one allow-list check (pure).

The credentials Secret is sent to whatever URL an ImageUnlock names, so the URL decides who
receives a password. Two URL parsers that read the same string differently are an
allow-list bypass: ``http://HOST-A\\@HOST-B`` is HOST-B to ``urllib.parse.urlsplit`` and
HOST-A to requests/urllib3. So a URL is accepted only in a form every parser reads alike —

    http[s]://HOST[:PORT][/PATH]

HOST a DNS name (ASCII letters, digits, hyphens; no trailing dot) or a bracketed IPv6
address; PATH segments of ``A-Z a-z 0-9 . _ ~ -`` (no ``.``/``..`` segments) — and anything
else (user info, ``@``, backslashes, query, fragment, percent-encoding, whitespace,
non-ASCII/IDNA text, an empty or out-of-range port) is refused with a message that says
what is wrong. The allow-list compares the parsed parts exactly (scheme, lower-cased host,
port with the scheme's default filled in) and the path on segment boundaries. The CRD's
pattern for ``spec.resourceApi.url`` is :data:`URL_PATTERN`, so the API server refuses the
same forms before the operator sees them.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from imageunlock.errors import ConfigurationError

# One grammar, in pieces: the CRD's pattern and the parser below are built from the same ones.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_NAME = rf"{_LABEL}(?:\.{_LABEL})*"
_IP6 = r"[0-9A-Fa-f:.]+"
_PORT = r"[1-9][0-9]{0,4}"
_PATH = r"(?:/[.]*[A-Za-z0-9_~-][A-Za-z0-9._~-]*)*"  # no segment of dots only
# Also the CRD's pattern (tests keep the two equal). RE2- and Python-compatible.
URL_PATTERN = rf"^https?://(?:\[{_IP6}\]|{_NAME})(?::{_PORT})?{_PATH}/?$"
_URL = re.compile(
    rf"(?P<scheme>https?)://(?:\[(?P<ip6>{_IP6})\]|(?P<host>{_NAME}))(?::(?P<port>{_PORT}))?(?P<path>{_PATH})/?"
)
DEFAULT_PORTS = {"http": 80, "https": 443}
FORM = (
    "scheme://host[:port][/path] "
    "(http or https; no user info, query, fragment, backslash, percent-encoding or non-ASCII)"
)


@dataclass(frozen=True)
class ApiUrl:
    scheme: str
    host: str  # lower case; an IPv6 address in brackets, compressed
    port: int
    path: str  # "" or "/seg/seg", no trailing slash

    @property
    def url(self) -> str:
        """The canonical base URL: the only form requests are built from."""
        port = "" if self.port == DEFAULT_PORTS[self.scheme] else f":{self.port}"
        return f"{self.scheme}://{self.host}{port}{self.path}"

    def __str__(self) -> str:
        return self.url

    def under(self, base: ApiUrl) -> bool:
        """Same scheme, host and port as ``base``, and a path at or below its path."""
        return (self.scheme, self.host, self.port) == (base.scheme, base.host, base.port) and (
            self.path == base.path or self.path.startswith(base.path + "/")
        )


def parse_api_url(raw: object, what: str = "resource API URL") -> ApiUrl:
    """Parse ``raw`` in the strict form above, or raise ConfigurationError naming ``what``."""
    if not isinstance(raw, str) or not raw:
        raise ConfigurationError(f"{what} is required: {FORM}")
    shown = _shown(raw)
    match = _URL.fullmatch(raw) if raw.isascii() and len(raw) <= 2048 else None
    if match is None:
        raise ConfigurationError(f"{what} {shown!r} is not of the form {FORM}")
    scheme, port_text, path = match["scheme"], match["port"], match["path"]
    if match["ip6"] is not None:
        try:
            host = f"[{ipaddress.IPv6Address(match['ip6']).compressed}]"
        except ValueError:
            raise ConfigurationError(f"{what} {shown!r} has an invalid IPv6 address") from None
    else:
        host = match["host"].lower()
        if len(host) > 253 or any(len(label) > 63 for label in host.split(".")):
            raise ConfigurationError(f"{what} {shown!r} has a host name that is too long")
    port = int(port_text) if port_text else DEFAULT_PORTS[scheme]
    if not 1 <= port <= 65535:
        raise ConfigurationError(f"{what} {shown!r} has a port outside 1-65535")
    return ApiUrl(scheme, host, port, path)


def allowed(url: ApiUrl, allow_list: Iterable[ApiUrl]) -> bool:
    return any(url.under(base) for base in allow_list)


def url_allowed(url: str, allowed_urls: Sequence[str]) -> bool:
    """Whether ``url`` parses strictly and lies under one of the ``allowed_urls`` bases
    (same scheme, host and port; a path at or below on a segment boundary)."""
    try:
        target = parse_api_url(url)
    except ConfigurationError:
        return False
    bases = []
    for base in allowed_urls:
        try:
            bases.append(parse_api_url(base))
        except ConfigurationError:
            continue
    return allowed(target, bases)


def _shown(raw: str) -> str:
    """``raw`` fit for a message, status or log: bounded, printable, and with any user info
    (``user:password@``) masked — a password written into a URL must not be echoed."""
    at = raw.rfind("@")
    if at >= 0:
        start = raw.find("//") + 2 if "//" in raw[:at] else 0
        raw = raw[:start] + "***" + raw[at:]
    return raw if len(raw) <= 200 and raw.isprintable() else repr(raw[:200])
