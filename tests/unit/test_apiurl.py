"""Resource API URLs: one strict form, so no two parsers can disagree on the host that
receives the credentials (issue 8, item 1: ``http://HOST-A\\@HOST-B`` passed the allow-list
as HOST-B while requests connected to HOST-A)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from urllib3.util import parse_url

from imageunlock.app.config import AgentConfig
from imageunlock.engine.keys.apiurl import URL_PATTERN, parse_api_url, url_allowed
from imageunlock.errors import ConfigurationError
from imageunlock.kube.spec import parse_spec

SEMANTIC = {"https://api.azaion.com:99999"}
ALLOWED = ["https://api.azaion.com"]
CRD = Path(__file__).resolve().parents[2] / "crds" / "loader.azaion.com_imageunlocks.yaml"

# Each of these names, to at least one common parser, a host other than api.azaion.com, or is
# a form two parsers may read differently. None may pass, whatever the allow-list says.
LOOKALIKES = [
    "https://evil.test\\@api.azaion.com",  # urlsplit: api.azaion.com; urllib3: evil.test
    "https://evil.test\\\\@api.azaion.com",
    "https://api.azaion.com\\@evil.test",
    "https://user@api.azaion.com",
    "https://evil.test@api.azaion.com",
    "https://api.azaion.com@evil.test",
    "https://api.azaion.com:@evil.test",
    "https://api.azaion.com#@evil.test",
    "https://api.azaion.com?@evil.test",
    "https://api.azaion.com/#frag",
    "https://api.azaion.com/?q=1",
    "https://api.azaion.com/%2e%2e/x",
    "https://api%2eazaion.com",
    "https://api.azaion.com%40evil.test",
    "https://api.azaion.com%2f@evil.test",
    "https://\u0430pi.azaion.com",  # Cyrillic a (IDNA)
    "https://api.azaion.com\u3002evil.test",  # ideographic full stop: IDNA maps it to '.'
    "https://api.azaion.com.",  # trailing dot
    "https://api.azaion.com../",
    "https://api.azaion.com./x",
    "https://[::1]@api.azaion.com",
    "https://api.azaion.com@[::1]",
    "https://[::1%25eth0]",
    "https://[fe80::1]x",
    "https://api.azaion.com:443:80",
    "https://api.azaion.com:0",
    "https://api.azaion.com:99999",
    "https://api.azaion.com:+443",
    "https://api.azaion.com /x",
    "https://api.azaion.com\t",
    "https://api.azaion.com\n.evil.test",
    " https://api.azaion.com",
    "https:/api.azaion.com",
    "https:\\\\api.azaion.com",
    "https:///api.azaion.com",
    "HTTPS://api.azaion.com",
    "ftp://api.azaion.com",
    "//api.azaion.com",
    "https://api.azaion.com/./x",
    "https://api.azaion.com/a/../b",
    "https://api.azaion.com//x",
    "https://-api.azaion.com",
    "https://api.azaion.com;evil.test",
    "https://api.azaion.com,evil.test",
]


@pytest.mark.parametrize("url", LOOKALIKES)
def test_lookalike_urls_are_refused_by_operator_and_api_server(url):
    with pytest.raises(ConfigurationError, match=r"resource API URL|not of the form|IPv6|port|segment"):
        parse_api_url(url)
    assert not url_allowed(url, ALLOWED)
    if url not in SEMANTIC:  # a pattern cannot check a port range or an IPv6 address
        assert not re.fullmatch(URL_PATTERN, url)


def test_the_reported_bypass_is_refused_with_an_actionable_message():
    spec = {
        "archivePath": "/var/lib/imageunlock/a.enc",
        "version": "1.0",
        "resourceApi": {"url": "http://127.0.0.1:9\\@api.azaion.com", "credentialsSecretRef": {"name": "c"}},
    }
    with pytest.raises(ConfigurationError) as info:
        parse_spec(spec, None, ["http://api.azaion.com"])
    assert "spec.resourceApi.url" in info.value.message and "no user info" in info.value.message


@pytest.mark.parametrize(
    "url, canonical",
    [
        ("https://api.azaion.com", "https://api.azaion.com"),
        ("https://API.Azaion.COM/", "https://api.azaion.com"),
        ("https://api.azaion.com:443", "https://api.azaion.com"),
        ("http://api.azaion.com:80/v1/", "http://api.azaion.com/v1"),
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("https://[0:0::1]:8443/x", "https://[::1]:8443/x"),
        ("https://xn--pi-7ia.azaion.com", "https://xn--pi-7ia.azaion.com"),  # punycode is plain ASCII
    ],
)
def test_valid_urls_have_one_canonical_form_that_urllib3_reads_alike(url, canonical):
    parsed = parse_api_url(url)
    assert parsed.url == canonical
    assert re.fullmatch(URL_PATTERN, url)
    seen = parse_url(parsed.url)  # the parser requests uses
    assert (seen.scheme, seen.host, seen.port or parsed.port, seen.path or "") == (
        parsed.scheme,
        parsed.host,
        parsed.port,
        parsed.path,
    )
    assert seen.auth is None and seen.query is None and seen.fragment is None


@pytest.mark.parametrize(
    "url, ok",
    [
        ("https://api.azaion.com", True),
        ("https://api.azaion.com:443/", True),
        ("https://API.AZAION.COM/v2", True),
        ("http://api.azaion.com", False),  # scheme
        ("https://api.azaion.com:8443", False),  # port
        ("https://api.azaion.com.evil.test", False),  # suffix
        ("https://evil-api.azaion.com", False),
    ],
)
def test_allow_list_compares_parsed_parts(url, ok):
    assert url_allowed(url, ALLOWED) is ok


def test_allow_list_paths_match_on_segment_boundaries():
    assert url_allowed("https://h.test/tenant-a/x", ["https://h.test/tenant-a/"])
    assert not url_allowed("https://h.test/tenant-ab", ["https://h.test/tenant-a"])
    assert not url_allowed("https://h.test/tenant-a/../tenant-b", ["https://h.test/tenant-a"])


def test_settings_refuse_an_allow_list_entry_in_an_ambiguous_form():
    with pytest.raises(ConfigurationError, match="IMAGEUNLOCK_API_URL_ALLOWLIST entry"):
        AgentConfig.from_env({"IMAGEUNLOCK_API_URL_ALLOWLIST": "https://a.test\\@b.test"})
    with pytest.raises(ConfigurationError, match="RESOURCE_API_URL"):
        AgentConfig.from_env({"RESOURCE_API_URL": "https://a.test?x=1"})
    assert AgentConfig.from_env({"RESOURCE_API_URL": "https://A.test:443/"}).default_api_url == "https://a.test"


def test_parse_spec_hands_on_only_the_canonical_url():
    spec = {
        "archivePath": "/a.enc",
        "version": "1.0",
        "resourceApi": {"url": "https://API.azaion.com:443/", "credentialsSecretRef": {"name": "c"}},
    }
    assert parse_spec(spec, None, ALLOWED).key_source.url == "https://api.azaion.com"


def test_crd_pattern_is_the_operators_pattern():
    crd = yaml.safe_load(CRD.read_text())
    props = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert props["resourceApi"]["properties"]["url"]["pattern"] == URL_PATTERN
    assert props["keySource"]["properties"]["resourceApi"] == props["resourceApi"] | {
        "description": props["keySource"]["properties"]["resourceApi"]["description"]
    }  # the member and the top-level field it grew from: one schema


@pytest.mark.parametrize(
    "url", ["https://device:hunter2@api.azaion.com", "https://a\\b:hunter2@api.azaion.com/x", "hunter2@api.azaion.com"]
)
def test_a_password_written_into_the_url_is_never_echoed(url):
    """Messages go to status, events and logs: the user-info part of a refused URL is masked."""
    with pytest.raises(ConfigurationError) as info:
        parse_api_url(url, "spec.resourceApi.url")
    assert "hunter2" not in info.value.message and "***" in info.value.message
    spec = {
        "archivePath": "/a.enc",
        "version": "1.0",
        "resourceApi": {"url": url, "credentialsSecretRef": {"name": "c"}},
    }
    with pytest.raises(ConfigurationError) as info:
        parse_spec(spec, None, ALLOWED)
    assert "hunter2" not in info.value.message
    with pytest.raises(ConfigurationError) as info:
        AgentConfig.from_env({"RESOURCE_API_URL": url, "IMAGEUNLOCK_API_URL_ALLOWLIST": url})
    assert "hunter2" not in info.value.message
