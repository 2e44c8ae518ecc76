"""Image references compared the way the Docker Engine compares them (pure).

``docker load`` stores every tag under its fully qualified name: ``nginx`` becomes
``docker.io/library/nginx:latest``, ``index.docker.io/azaion/x:1`` becomes
``docker.io/azaion/x:1``. Two spellings name the same image exactly when their
:func:`normalize_ref` forms are equal.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

DEFAULT_DOMAIN = "docker.io"
LEGACY_DOMAIN = "index.docker.io"
OFFICIAL_PREFIX = "library/"

# distribution/reference's grammar, a tag required and no digest: what a load records.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?"
_TAGGED = re.compile(rf"(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*:[\w][\w.-]{{0,127}}")
# Names the runtimes read as an image ID (``sha256:<hex>``, a bare hex ID), not as a ref.
_ID_LIKE = re.compile(r"(?:sha256|sha384|sha512|[0-9a-f]{12,64})(?::.*)?")


def normalize_ref(ref: str) -> str:
    """The fully qualified form of ``ref`` (``docker.io/library/nginx:latest`` for ``nginx``).

    Follows distribution/reference's ``ParseNormalizedNamed`` + ``TagNameOnly``: the first
    path component is a registry host only if it contains ``.`` or ``:``, is ``localhost``,
    or has upper-case letters; Docker Hub's legacy host is folded into ``docker.io``; a Hub
    name without a namespace goes under ``library/``; no tag and no digest means ``:latest``.
    It does not validate: a malformed ref maps to a string no well-formed ref maps to.
    """
    name, at, digest = ref.partition("@")
    tag = ""
    colon = name.rfind(":")
    if colon > name.rfind("/"):  # a ':' after the last '/' starts the tag, not a host port
        name, tag = name[:colon], name[colon:]
    elif not at:
        tag = ":latest"
    domain, slash, path = name.partition("/")
    if not slash or not ("." in domain or ":" in domain or domain == "localhost" or domain != domain.lower()):
        domain, path = DEFAULT_DOMAIN, name
    elif domain == LEGACY_DOMAIN:
        domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in path:
        path = OFFICIAL_PREFIX + path
    return f"{domain}/{path}{tag}{at}{digest}"


def is_tagged_ref(ref: object) -> bool:
    """Whether ``ref`` read back from a node's records (a state file, a runtime's label) is an
    image name with a tag, as a load records one: not an image ID (``sha256:<hex>``, which
    ``docker rmi`` would take for one), not a digest, not an option (``-f``), at most 255
    characters. A record failing it is dropped: it names nothing this node loaded."""
    return (
        isinstance(ref, str)
        and len(ref) <= 255
        and _TAGGED.fullmatch(ref) is not None
        and _ID_LIKE.fullmatch(ref) is None
    )


def unrequested(tags: Iterable[str], requested: Iterable[str]) -> list[str]:
    """The ``tags`` (each once, in order) that name none of the ``requested`` refs."""
    allowed = {normalize_ref(ref) for ref in requested}
    return list(dict.fromkeys(tag for tag in tags if normalize_ref(tag) not in allowed))


def describe(refs: Sequence[str], limit: int = 5, width: int = 128) -> str:
    """``a, b, c and 2 more``: refs read from an archive, made fit for a status message
    (printable ASCII, each at most ``width`` characters, at most ``limit`` of them)."""

    def shown(ref: str) -> str:
        text = "".join(c if c.isascii() and c.isprintable() else "?" for c in ref[:width])
        return text + ("..." if len(ref) > width else "")

    more = f" and {len(refs) - limit} more" if len(refs) > limit else ""
    return ", ".join(shown(ref) for ref in refs[:limit]) + more


def repository(ref: str) -> str:
    """The fully qualified repository of ``ref`` (no tag, no digest)."""
    full = normalize_ref(ref).partition("@")[0]
    colon = full.rfind(":")
    return full[:colon] if colon > full.rfind("/") else full


def owned(name: str, prefixes: Iterable[str]) -> bool:
    """Whether image ``name`` lies under one of ``prefixes``: a repository prefix ending in
    ``/`` (``azaion/``, ``registry.corp/team-a/``) or one exact repository
    (``azaion/flights``), each compared as Docker normalises names."""
    repo = repository(name)
    for prefix in prefixes:
        if prefix.endswith("/"):
            if repo.startswith(repository(prefix + "x")[:-1]):
                return True
        elif repo == repository(prefix):
            return True
    return False
