"""The resource API client against a real HTTP server on 127.0.0.1 with injected faults."""

from __future__ import annotations

import secrets
import time

import pytest

from imageunlock.errors import ApiRejectedError, ApiUnavailableError, AuthenticationError, ConfigurationError
from imageunlock.resource_api import KEY_FRAGMENT_PATH, LOGIN_PATH, ApiSettings, Credentials, ResourceApiClient

from ..support.net import free_port
from ..support.resource_api import FakeResourceApi

EMAIL = "edge@example.test"
PASSWORD = "canary-password-" + secrets.token_hex(6)
FRAGMENT = b"canary-fragment-" + secrets.token_bytes(16)
FAST = ApiSettings(connect_timeout=1, read_timeout=1, retries=3, backoff_factor=0.01)


@pytest.fixture
def api():
    server = FakeResourceApi(EMAIL, PASSWORD, FRAGMENT).start()
    yield server
    server.stop()


def client(api: FakeResourceApi, password: str = PASSWORD, settings: ApiSettings = FAST) -> ResourceApiClient:
    return ResourceApiClient(api.url, Credentials(EMAIL, password), settings)


def assert_no_secret(text: str) -> None:
    assert PASSWORD not in text and FRAGMENT.decode(errors="replace") not in text


def test_login_then_fragment(api):
    with client(api) as c:
        assert c.key_fragment() == FRAGMENT
    assert api.calls == {LOGIN_PATH: 1, KEY_FRAGMENT_PATH: 1}


def test_three_5xx_then_success_is_retried_by_urllib3(api):
    api.fail(KEY_FRAGMENT_PATH, 500, times=3)
    with client(api) as c:
        assert c.key_fragment() == FRAGMENT
    assert api.calls[KEY_FRAGMENT_PATH] == 4


def test_persistent_5xx_is_transient_error(api):
    api.fail(LOGIN_PATH, 503, times=10)
    with client(api) as c, pytest.raises(ApiUnavailableError) as info:
        c.login()
    assert info.value.transient
    assert api.calls[LOGIN_PATH] == 4  # one try plus three retries, bounded


def test_bad_credentials_are_a_permanent_auth_error(api):
    with client(api, password="wrong-" + PASSWORD) as c, pytest.raises(AuthenticationError) as info:
        c.key_fragment()
    assert not info.value.transient
    assert "credentials" in info.value.message
    assert api.calls[KEY_FRAGMENT_PATH] == 0
    assert_no_secret(str(info.value))


def test_expired_token_gets_exactly_one_relogin(api):
    with client(api) as c:
        c.login()
        api.expire_tokens()
        assert c.key_fragment() == FRAGMENT
    assert api.calls == {LOGIN_PATH: 2, KEY_FRAGMENT_PATH: 2}


def test_401_after_relogin_is_an_auth_error_with_at_most_two_key_requests(api):
    api.fail(KEY_FRAGMENT_PATH, 401, times=5)
    with client(api) as c, pytest.raises(AuthenticationError):
        c.key_fragment()
    assert api.calls[KEY_FRAGMENT_PATH] == 2
    assert api.calls[LOGIN_PATH] == 2


@pytest.mark.parametrize("status, error", [(403, ApiRejectedError), (404, ApiRejectedError)])
def test_client_errors_are_permanent(api, status, error):
    api.fail(KEY_FRAGMENT_PATH, status)
    with client(api) as c, pytest.raises(error) as info:
        c.key_fragment()
    assert not info.value.transient and str(status) in info.value.message


def test_slow_answers_are_bounded_by_the_read_timeout(api):
    api.delay = 2.0
    started = time.monotonic()
    with client(api, settings=ApiSettings(connect_timeout=1, read_timeout=0.3, retries=1, backoff_factor=0)) as c:
        with pytest.raises(ApiUnavailableError):
            c.login()
    assert time.monotonic() - started < 2 * 2.0 + 1  # two bounded attempts, not a hang


def test_connection_refused_is_transient():
    c = ResourceApiClient(f"http://127.0.0.1:{free_port()}", Credentials(EMAIL, PASSWORD), FAST)
    with pytest.raises(ApiUnavailableError) as info:
        c.login()
    assert "unreachable" in info.value.message or "kept failing" in info.value.message


def test_password_never_in_repr_or_errors():
    creds = Credentials(EMAIL, PASSWORD)
    assert PASSWORD not in repr(creds)
    with pytest.raises(ConfigurationError):
        ResourceApiClient("ftp://x", creds)
    with pytest.raises(ConfigurationError):
        Credentials(EMAIL, "")
