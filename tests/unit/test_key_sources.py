"""The resource API key source (engine/keys/resource_api.py): its two steps and phases, the key
it derives, and its security properties: the credentials go nowhere but an allowed API, even
when the spec's check is bypassed, and nothing secret shows in a repr or an error."""

from __future__ import annotations

import hashlib

import pytest

from imageunlock.engine.keys import KeySettings, ResourceApiSpec, build_key_source
from imageunlock.engine.keys.resource_api import ResourceApiKeySource
from imageunlock.engine.models import Credentials, Phase
from imageunlock.errors import AuthenticationError, ConfigurationError

from ..support.fakes import FakeKeyClient

API = "https://api.test/tenant-a"
PASSWORD = "hunter2-canary-password"
CREDS = Credentials("edge@example.test", PASSWORD)
FRAGMENT = b"canary-fragment"


class Reads:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> Credentials:
        self.count += 1
        return CREDS


def test_the_session_authenticates_then_derives_the_key_and_reports_both_phases():
    key, said = FakeKeyClient(FRAGMENT), []
    session = key.source(lambda: CREDS, API).open()
    session.authenticate(lambda phase, message: said.append(phase))
    assert (key.logins, key.fragments) == (1, 0)  # no key request before the lock
    assert session.get_key(lambda phase, message: said.append(phase)) == hashlib.sha256(FRAGMENT).digest()
    session.close()
    session.close()
    assert said == [Phase.AUTHENTICATING, Phase.FETCHING_KEY] and key.closes == 1 and key.urls == [API]


@pytest.mark.parametrize(
    "url", ["https://evil.test", "https://api.test/tenant-ab", "http://api.test/tenant-a", "https://api.test.evil.test"]
)
def test_credentials_are_never_read_nor_sent_for_an_api_outside_the_allow_list(url):
    key, reads = FakeKeyClient(FRAGMENT), Reads()
    source = ResourceApiKeySource(url, reads, allowed=(API,), client=key.client)
    with pytest.raises(ConfigurationError, match="not an allowed resource API"):
        source.open()
    assert reads.count == 0 and key.urls == [] and key.opened == []


def test_the_registry_built_source_holds_the_allow_list_even_when_the_spec_check_is_bypassed():
    key, reads = FakeKeyClient(FRAGMENT), Reads()
    spec = ResourceApiSpec("resourceApi", "creds", url="https://collector.evil.test")  # never parsed
    source = build_key_source(spec, KeySettings(allowed_api_urls=(API,)), lambda secret: reads())
    with pytest.raises(ConfigurationError):
        source.open()
    assert reads.count == 0 and key.urls == []
    allowed = build_key_source(
        ResourceApiSpec("resourceApi", "creds", url=API + "/v1"),
        KeySettings(allowed_api_urls=(API,)),
        lambda secret: reads(),
    )
    allowed.open()
    assert reads.count == 1


def test_nothing_secret_shows_in_a_repr_or_an_error():
    key = FakeKeyClient(FRAGMENT, key_error=AuthenticationError("the resource API refused the token"))
    source = key.source(lambda: CREDS, API)
    session = source.open()
    session.authenticate(lambda phase, message: None)
    with pytest.raises(AuthenticationError) as info:
        session.get_key(lambda phase, message: None)
    derived = hashlib.sha256(FRAGMENT).hexdigest()
    for shown in (repr(source), repr(session), str(source), str(session), str(info.value), repr(info.value)):
        assert PASSWORD not in shown and derived not in shown and FRAGMENT.decode() not in shown, shown
    assert API in repr(source)
