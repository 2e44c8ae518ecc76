"""The resource API client against a real HTTP server on 127.0.0.1 with injected faults."""

from __future__ import annotations

import json
import secrets
import threading
import time
from dataclasses import replace

import pytest

from imageunlock.engine.keys.resource_api import KEY_FRAGMENT_PATH, LOGIN_PATH, ApiClientConfig, ResourceApiClient
from imageunlock.engine.models import Credentials
from imageunlock.errors import (
    ApiRejectedError,
    ApiUnavailableError,
    AuthenticationError,
    ConfigurationError,
    UnlockError,
)

from ..support.net import free_port
from ..support.resource_api import FakeResourceApi
from ..support.scripted_http import Out, Request, ScriptedServer, head, respond

EMAIL = "edge@example.test"
PASSWORD = "canary-password-" + secrets.token_hex(6)
FRAGMENT = b"canary-fragment-" + secrets.token_bytes(16)
FAST = ApiClientConfig(connect_timeout=1, read_timeout=1, retries=3, backoff_factor=0.01)


@pytest.fixture
def api():
    server = FakeResourceApi(EMAIL, PASSWORD, FRAGMENT).start()
    yield server
    server.stop()


def client(api: FakeResourceApi, password: str = PASSWORD, settings: ApiClientConfig = FAST) -> ResourceApiClient:
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
    settings = ApiClientConfig(connect_timeout=1, read_timeout=0.3, retries=1, backoff_factor=0)
    with client(api, settings=settings) as c, pytest.raises(ApiUnavailableError):
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


# -- a hostile or broken API, on the wire (tests/support/scripted_http.py) -----------------------
TOKEN = "canary-token-" + secrets.token_hex(8)
MIB = 1024 * 1024


def ok_login(request: Request, out: Out) -> None:
    respond(out, 200, json.dumps({"token": TOKEN}).encode())


def api_with_key(key_answer, login_answer=ok_login):
    """A scripted API: a normal login, and ``key_answer`` for the key-fragment call."""
    return ScriptedServer(lambda r, out: (login_answer if r.path.endswith(LOGIN_PATH) else key_answer)(r, out))


def finishes_within(seconds: float, call):
    """Run ``call`` in a thread; fail, without waiting for it any longer, if it has not returned
    in time (the old client would hang for an hour on some of these)."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"the call was still running after {seconds}s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def error_of(call, seconds: float = 35) -> UnlockError | None:
    """The error ``call`` ends with, so that a test can check the wire before the message."""
    try:
        finishes_within(seconds, call)
    except UnlockError as exc:
        return exc
    return None


def scripted_client(server: ScriptedServer, **settings: float) -> ResourceApiClient:
    return ResourceApiClient(server.url, Credentials(EMAIL, PASSWORD), replace(FAST, **settings))


def assert_clean(message: str) -> None:
    assert_no_secret(message)
    assert TOKEN not in message


@pytest.mark.parametrize("status", [301, 302, 307, 308])
@pytest.mark.parametrize("call", [LOGIN_PATH, KEY_FRAGMENT_PATH])
def test_a_redirect_is_never_followed_and_is_permanent(status, call):
    with ScriptedServer(ok_login) as elsewhere:

        def answer(request: Request, out: Out) -> None:
            if request.path == call:
                respond(out, status, headers={"Location": elsewhere.url + request.path})
            else:
                ok_login(request, out)

        with ScriptedServer(answer) as api, scripted_client(api) as c:
            error = error_of(c.key_fragment)
        assert elsewhere.requests == []  # neither the password nor the token went there
    assert [r.path for r in api.requests].count(call) == 1  # not retried either
    assert isinstance(error, ApiRejectedError) and not error.transient
    message = error.message
    assert f"redirect (HTTP {status})" in message
    assert elsewhere.url not in message  # the Location is not echoed
    assert_clean(message)


def big_body(out: Out, size: int, framing: str) -> None:
    """A 200 whose body is ``size`` bytes, sent as fast as the client takes it."""
    headers = {"Content-Length": str(size)} if framing == "content-length" else {"Connection": "close"}
    if framing == "chunked":
        headers["Transfer-Encoding"] = "chunked"
    out.write(head(200, headers))
    chunk = b"x" * (64 * 1024)
    for _ in range(size // len(chunk)):
        out.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if framing == "chunked" else chunk)
    if framing == "chunked":
        out.write(b"0\r\n\r\n")


@pytest.mark.parametrize("framing", ["content-length", "until-close", "chunked"])
def test_an_oversized_fragment_is_refused_without_reading_it(framing):
    size = 256 * MIB
    with api_with_key(lambda r, out: big_body(out, size, framing)) as api:
        with scripted_client(api, deadline=30) as c:
            error = error_of(c.key_fragment)
        assert api.wait_idle(10)
    # What the server got rid of fits in socket buffers: the body was not read to its end.
    assert api.sent < 32 * MIB, f"the server sent {api.sent} bytes of a {size}-byte body"
    assert isinstance(error, ApiRejectedError) and not error.transient and "size limit" in error.message


def test_an_oversized_login_answer_is_refused_without_reading_it():
    size = 256 * MIB  # JSON whitespace, then a token: valid, if one read it all

    def login(request: Request, out: Out) -> None:
        tail = json.dumps({"token": TOKEN}).encode()
        out.write(head(200, {"Content-Length": str(size + len(tail))}))
        for _ in range(size // MIB):
            out.write(b" " * MIB)
        out.write(tail)

    with ScriptedServer(login) as api:
        with scripted_client(api, deadline=30) as c:
            error = error_of(c.login)
        assert api.wait_idle(10)
    assert api.sent < 32 * MIB, f"the server sent {api.sent} bytes of a {size}-byte answer"
    assert isinstance(error, ApiRejectedError) and "size limit" in error.message
    assert_clean(error.message)


def drip(out: Out, data: bytes) -> None:
    for byte in data:
        out.write(bytes([byte]))
        out.pause(0.5)  # well within the 1 s read timeout: per-read timeouts never fire


def test_headers_dripped_forever_end_at_the_deadline():
    def login(request: Request, out: Out) -> None:
        out.write(b"HTTP/1.1 200 OK\r\nX-Drip: ")
        drip(out, b"a" * 100_000)

    with (
        ScriptedServer(login) as api,
        scripted_client(api, deadline=2) as c,
        pytest.raises(ApiUnavailableError) as info,
    ):
        finishes_within(2 + 5, c.login)
    assert info.value.transient and "no complete answer within 2s" in info.value.message


@pytest.mark.parametrize("framing", ["content-length", "until-close"])
def test_a_body_dripped_forever_ends_at_the_deadline(framing):
    def key(request: Request, out: Out) -> None:
        out.write(head(200, {"Content-Length": "1000"} if framing == "content-length" else {"Connection": "close"}))
        drip(out, b"f" * 1000)

    with (
        api_with_key(key) as api,
        scripted_client(api, deadline=2) as c,
        pytest.raises(ApiUnavailableError) as info,  # never a fragment cut short by the watchdog
    ):
        finishes_within(2 + 5, c.key_fragment)
    assert info.value.transient and "no complete answer within 2s" in info.value.message


def test_retry_after_is_capped():
    answers = iter([503])

    def login(request: Request, out: Out) -> None:
        status = next(answers, 200)
        if status == 503:
            respond(out, 503, headers={"Retry-After": "3600"})
        else:
            ok_login(request, out)

    with (
        api_with_key(lambda r, out: respond(out, 200, FRAGMENT), login_answer=login) as api,
        scripted_client(api, max_retry_after=0.2, deadline=30) as c,
    ):
        assert finishes_within(10, c.key_fragment) == FRAGMENT
    assert [r.path for r in api.requests] == [LOGIN_PATH, LOGIN_PATH, KEY_FRAGMENT_PATH]


def test_an_unparsable_retry_after_means_the_usual_backoff():
    answers = iter([503])

    def login(request: Request, out: Out) -> None:
        if next(answers, 200) == 503:
            respond(out, 503, headers={"Retry-After": "soon"})
        else:
            ok_login(request, out)

    with ScriptedServer(login) as api, scripted_client(api) as c:
        finishes_within(10, c.login)
    assert len(api.requests) == 2


@pytest.mark.parametrize("settings", [{"deadline": 0}, {"deadline": float("inf")}, {"max_retry_after": -1}])
def test_settings_without_a_finite_deadline_or_cap_are_refused(settings):
    with pytest.raises(ConfigurationError):
        ApiClientConfig(**settings)


def test_the_deadline_covers_retries():
    with (
        ScriptedServer(lambda r, out: respond(out, 503, headers={"Retry-After": "1"})) as api,
        scripted_client(api, retries=100, deadline=2) as c,
        pytest.raises(ApiUnavailableError) as info,
    ):
        finishes_within(2 + 5, c.login)
    assert "no complete answer within 2s" in info.value.message
    assert 1 <= len(api.requests) <= 4


# -- the base URL: parsed once by the one strict parser (apiurl.py), checked as requests reads it --
@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:1\\@127.0.0.2:2",  # urlsplit: host 127.0.0.2; requests: 127.0.0.1
        "http://127.0.0.1:1\\",
        "http://user:hunter2@127.0.0.1:1",
        "http://@127.0.0.1:1",
        "http://127.0.0.1:1/?x=1",
        "http://127.0.0.1:1?",
        "http://127.0.0.1:1/#x",
        "http://127.0.0.1:1#",
        " http://127.0.0.1:1",
        "http://127.0.0.1:1 ",
        "http://127.0.0.1:1/\t",
        "http://127.0.0.1:1\n",
        "http://exa mple.test",
        "http://127.0.0.1:1/%2e%2e/",
        "http://ex%61mple.test",
        "http://ex\u00e4mple.test",
        "http://127.0.0.1:1/\u00e4",
        "http://example\u3002test",
        "ftp://127.0.0.1",
        "file:///etc/passwd",
        "127.0.0.1:1",
        "",
        "http://",
        "http:///login",
        "http://127.0.0.1:99999",
        "HTTPS://127.0.0.1:1",  # the one grammar (apiurl.py) the spec and the CRD hold too
    ],
)
def test_ambiguous_or_unusable_base_urls_are_refused(url):
    with pytest.raises(ConfigurationError) as info:
        ResourceApiClient(url, Credentials(EMAIL, PASSWORD), FAST)
    assert not info.value.transient and "hunter2" not in info.value.message


@pytest.mark.parametrize(
    "url, normalized",
    [
        ("http://127.0.0.1:8080/", "http://127.0.0.1:8080"),
        ("https://API.Example.test/v1/", "https://api.example.test/v1"),
        ("http://[::1]:8080", "http://[::1]:8080"),
    ],
)
def test_plain_base_urls_are_accepted(url, normalized):
    assert ResourceApiClient(url, Credentials(EMAIL, PASSWORD), FAST).base_url == normalized


def test_requests_go_to_the_parsed_origin_plus_the_fixed_paths():
    with (
        api_with_key(lambda r, out: respond(out, 200, FRAGMENT)) as api,
        ResourceApiClient(api.url + "/v1/", Credentials(EMAIL, PASSWORD), FAST) as c,
    ):
        assert c.key_fragment() == FRAGMENT
    assert [r.path for r in api.requests] == ["/v1" + LOGIN_PATH, "/v1" + KEY_FRAGMENT_PATH]


def test_a_request_for_another_origin_is_not_sent(api):
    with ScriptedServer(ok_login) as elsewhere, client(api) as c:
        c.base_url = elsewhere.url  # as if a later change built URLs from something else
        with pytest.raises(ConfigurationError):
            c.login()
        assert elsewhere.requests == []


def test_the_deadline_also_holds_through_an_http_proxy(monkeypatch):
    def proxy(request: Request, out: Out) -> None:
        out.write(b"HTTP/1.1 200 OK\r\nX-Drip: ")
        drip(out, b"a" * 100_000)

    with ScriptedServer(proxy) as server:
        for name in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", server.url)
        c = ResourceApiClient("http://resource-api.invalid", Credentials(EMAIL, PASSWORD), replace(FAST, deadline=2))
        with c, pytest.raises(ApiUnavailableError) as info:
            finishes_within(2 + 5, c.login)
    assert [r.path for r in server.requests] == ["http://resource-api.invalid/login"]
    assert "no complete answer within 2s" in info.value.message
