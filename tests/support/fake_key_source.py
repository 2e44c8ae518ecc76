"""A test-only key source, registered with no product edit: the key-source recipe of
docs/architecture.md, run by tests/unit/test_registries.py.

A key source is a :class:`~imageunlock.engine.keys.KeySourceKind` (its member name under
``spec.keySource``, a pure parser of its settings, its adapter module) passed to
:func:`~imageunlock.engine.keys.register`, and an adapter module whose ``build`` returns a
:class:`~imageunlock.engine.models.KeySource`; here both are this module. A product key
source's kind goes in ``engine/keys/__init__.py`` and its member under ``spec.keySource`` in
the CRD and in kube/models.py's ``KeySource``.

This one hands out a key kept in a Secret of the ImageUnlock's namespace (its password field,
as 64 hexadecimal digits): enough to show the Secret, the phases and the key taking the same
path as the resource API's.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from imageunlock.engine.keys import KeySettings, KeySourceKind, KeySourceSpec, ReadCredentials, secret_ref
from imageunlock.engine.models import Credentials, KeySource, Phase, Say
from imageunlock.errors import AuthenticationError


@dataclass(frozen=True)
class SecretKeySpec(KeySourceSpec):
    label: str = ""


def _parse(raw: Mapping[str, object], where: str, settings: KeySettings, problems: list[str]) -> KeySourceSpec:
    label = raw.get("label")
    if not isinstance(label, str) or not label:
        problems.append(f"{where}.label is required")
    return SecretKeySpec("secretKey", secret_ref(raw, where, problems), label=str(label or ""))


KIND = KeySourceKind("secretKey", parse=_parse, adapter=__name__)


class SecretKeySource:
    def __init__(self, label: str, credentials: Callable[[], Credentials]) -> None:
        self.label, self._credentials = label, credentials
        self.sessions: list[SecretKeySession] = []

    def open(self) -> SecretKeySession:
        session = SecretKeySession(self.label, self._credentials())
        self.sessions.append(session)
        return session


class SecretKeySession:
    def __init__(self, label: str, credentials: Credentials) -> None:
        self.label, self._credentials = label, credentials
        self.closed = 0

    def authenticate(self, say: Say) -> None:
        say(Phase.AUTHENTICATING, f"checking the key labelled {self.label}")
        if self._credentials.email != self.label or not re.fullmatch(r"[0-9a-f]{64}", self._credentials.password):
            raise AuthenticationError(f"the Secret holds no key labelled {self.label}")

    def get_key(self, say: Say) -> bytes:
        say(Phase.FETCHING_KEY, "reading the key")
        return bytes.fromhex(self._credentials.password)

    def close(self) -> None:
        self.closed += 1


def build(spec: KeySourceSpec, settings: KeySettings, credentials: ReadCredentials) -> SecretKeySource:
    assert isinstance(spec, SecretKeySpec) and spec.secret_name
    secret = spec.secret_name
    return SecretKeySource(spec.label, lambda: credentials(secret))


if TYPE_CHECKING:  # held to the port it stands in for (mypy): a drift fails lint, as in fakes.py
    _source: KeySource = SecretKeySource("", lambda: Credentials("e", "p"))
