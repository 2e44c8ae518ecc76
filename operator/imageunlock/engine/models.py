"""Shared data of every layer (pure): phases, the unlock request and result, credentials,
and the two ports the unlock service is written against (a runtime, a key source)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from imageunlock.errors import ConfigurationError


class Phase(StrEnum):
    PENDING = "Pending"
    AUTHENTICATING = "Authenticating"
    FETCHING_KEY = "FetchingKey"
    LOADING = "Loading"
    VERIFYING = "Verifying"
    READY = "Ready"
    FAILED = "Failed"


Report = Callable[[Phase, str, int, int], None]
Say = Callable[[Phase, str], None]  # a key source's report: the phase it is in, and what it does

# An ImageUnlock as an owner: "<namespace>/<name>" (a DNS label, a DNS subdomain). Neither
# part can hold "/", "=" or ",", so the text is safe as a containerd label value.
_OWNER = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?/[a-z0-9]([-.a-z0-9]{0,251}[a-z0-9])?$")


def owner_of(namespace: str, name: str) -> str:
    """The owner text of the ImageUnlock ``namespace/name`` (what ``load(owner=...)`` records)."""
    return check_owner(f"{namespace}/{name}")


def check_owner(owner: str) -> str:
    if not is_owner(owner):
        raise ConfigurationError(f"owner {owner!r} is not <namespace>/<name> of an ImageUnlock")
    return owner


def is_owner(owner: object) -> bool:
    """Whether ``owner`` is ``<namespace>/<name>`` of an ImageUnlock: what is recorded on load,
    and all a record read back from the node (a state file, a runtime's label) may hold."""
    return isinstance(owner, str) and _OWNER.fullmatch(owner) is not None


@dataclass(frozen=True)
class OwnershipRecord:
    """A ref this node's agent loaded, and for which ImageUnlock (``<namespace>/<name>``):
    what the runtime recorded at import time, so a restarted agent still knows it. ``ref``
    is as the runtime names it (containerd: ``docker.io/azaion/x:1``; Docker: as loaded).
    One owner per ref: the ImageUnlock whose unlock last imported it."""

    ref: str
    owner: str


class Runtime(Protocol):
    """A container runtime's image store (runtimes/): the service never knows which."""

    name: str

    def image_ids(self, refs: Sequence[str]) -> dict[str, str | None]:
        """``{ref: image ID (config digest) or None when absent}``."""
        ...

    def load(self, chunks: Iterable[bytes], refs: Sequence[str], owner: str | None = None) -> list[str]:
        """Import an image archive streamed as ``chunks``; all or nothing when ``chunks``
        raises. ``refs`` are the only names the archive may create (the stream checks hold
        it to them): a failed import undoes those, never another image. Returns what the
        runtime says it loaded. With ``owner`` (``<namespace>/<name>``), the loaded refs are
        recorded as that ImageUnlock's (:meth:`owned_refs`). A full disk raises
        :class:`~imageunlock.errors.InsufficientStorageError`, with nothing left behind."""
        ...

    def owned_refs(self) -> list[OwnershipRecord]:
        """The refs this node loaded with an owner and that still name what was loaded: the
        only refs :meth:`unpin` and :meth:`remove` should ever be given."""
        ...

    def unpin(self, refs: Sequence[str]) -> list[str]:
        """Let kubelet's image garbage collection take ``refs`` (the runtime's names of those
        that were pinned and no longer are); a runtime without pinning does nothing."""
        ...

    def pin(self, refs: Sequence[str]) -> list[str]:
        """Pin ``refs`` again (a rollback to a version found still present after an unpin):
        the runtime's names of those that were not pinned and now are; a runtime without
        pinning does nothing."""
        ...

    def remove(self, refs: Sequence[str]) -> tuple[list[str], list[str]]:
        """Remove ``refs`` unless a container (running or stopped) uses the image:
        ``(removed or already absent, kept because in use)``. Removes the names, never an
        image another ref still names."""
        ...

    def ping(self) -> None: ...

    def close(self) -> None: ...


class KeySession(Protocol):
    """One unlock's use of a key source, in two steps around the archive lock: ``authenticate``
    before it (proving access costs no lock, and a refused account learns nothing of the
    archive), ``get_key`` under it; the service closes the session right after the key. Each
    step reports its own phase through ``say`` (Authenticating, FetchingKey). Nothing secret
    (key, token, password) may appear in a repr, a message, an exception or a log."""

    def authenticate(self, say: Say) -> None: ...

    def get_key(self, say: Say) -> bytes:
        """The 32-byte AES-256 key of the archive."""
        ...

    def close(self) -> None:
        """Called right after the key request, and again on the way out: idempotent."""
        ...


class KeySource(Protocol):
    """Where an unlock's key comes from (engine/keys/: the registry and its adapters)."""

    def open(self) -> KeySession:
        """Read what the session needs locally (the credentials Secret): no network yet. The
        service opens it after the path check and before the archive, so a missing Secret
        stalls at once."""
        ...


@dataclass(frozen=True)
class UnlockRequest:
    archive_path: str
    version: str
    images: tuple[str, ...]  # names without a tag; the defaults are product data (imageunlock.defaults)
    archive_sha256: str | None = None
    # Image IDs verified by an earlier unlock: the only ones the fast path accepts.
    known_ids: Mapping[str, str] = field(default_factory=dict)
    # The ImageUnlock ("<namespace>/<name>") a load is recorded for (Runtime.owned_refs): the
    # only images a later reclaim may give back. None (the CLI): nothing recorded.
    owner: str | None = None

    @property
    def refs(self) -> list[str]:
        return [f"{name}:{self.version}" for name in self.images]


@dataclass(frozen=True)
class UnlockResult:
    images: dict[str, str]  # ref -> image ID
    fast_path: bool
    archive_bytes: int = 0


@dataclass(frozen=True)
class Credentials:
    email: str
    password: str = field(repr=False)

    def __post_init__(self) -> None:
        if not self.email or not self.password:
            raise ConfigurationError("credentials need a non-empty email and password")
