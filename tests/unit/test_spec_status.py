"""Pure parts of the operator: spec parsing, kstatus status building, settings."""

from __future__ import annotations

import pytest

from imageunlock import status as st
from imageunlock.errors import ConfigurationError
from imageunlock.models import DEFAULT_IMAGES, Phase
from imageunlock.config import OperatorConfig
from imageunlock.spec import parse_spec

GOOD = {
    "archivePath": "/var/lib/imageunlock/images.enc",
    "version": "1.4.2",
    "resourceApi": {"url": "https://api.example.test", "credentialsSecretRef": {"name": "loader-creds"}},
}


def test_minimal_spec_gets_defaults():
    spec = parse_spec(GOOD, None)
    assert spec.images == DEFAULT_IMAGES and spec.runtime == "docker" and spec.archive_sha256 is None
    assert spec.to_request().refs[0] == "azaion/annotations:1.4.2"


def test_api_url_falls_back_to_operator_default():
    spec = parse_spec({**GOOD, "resourceApi": {"credentialsSecretRef": {"name": "c"}}}, "http://127.0.0.1:9")
    assert spec.api_url == "http://127.0.0.1:9"


def test_all_problems_are_reported_at_once_with_field_paths():
    bad = {
        "archivePath": "relative/x.enc",
        "version": "bad tag!",
        "images": ["Azaion/UPPER", "ok/name", "ok/name"],
        "resourceApi": {"url": "ftp://x", "credentialsSecretRef": {}},
        "runtime": "podman",
        "archiveSha256": "abc",
    }
    with pytest.raises(ConfigurationError) as info:
        parse_spec(bad, None)
    message = info.value.message
    for fragment in ("spec.archivePath", "spec.version", "spec.images[0]", "twice", "spec.resourceApi.url",
                     "credentialsSecretRef.name is required", "spec.runtime", "spec.archiveSha256"):
        assert fragment in message, fragment


@pytest.mark.parametrize("operator_runtime", ["docker", "containerd"])
def test_runtime_auto_and_absent_mean_the_operators_own(operator_runtime):
    for spec in (GOOD, {**GOOD, "runtime": "auto"}, {**GOOD, "runtime": operator_runtime}):
        assert parse_spec(spec, None, runtime=operator_runtime).runtime == operator_runtime


def test_a_runtime_the_operator_does_not_load_into_is_refused_not_silently_swapped():
    with pytest.raises(ConfigurationError, match="IMAGEUNLOCK_RUNTIME") as info:
        parse_spec({**GOOD, "runtime": "containerd"}, None, runtime="docker")
    assert "use auto" in info.value.message
    with pytest.raises(ConfigurationError, match="not the runtime this operator loads into"):
        parse_spec({**GOOD, "runtime": "docker"}, None, runtime="containerd")


def test_missing_api_url_everywhere_is_explained():
    with pytest.raises(ConfigurationError, match="RESOURCE_API_URL"):
        parse_spec({**GOOD, "resourceApi": {"credentialsSecretRef": {"name": "c"}}}, None)


def _cond(status, type_):
    return next(c for c in status["conditions"] if c["type"] == type_)


def test_kstatus_conditions_through_a_lifecycle():
    working = st.working(Phase.LOADING, "decrypting", 3, None, 50, 200, now="t1")
    assert working["phase"] == "Loading" and working["progress"]["text"] == "25%"
    assert _cond(working, "Reconciling")["status"] == "True"
    assert _cond(working, "Ready")["status"] == "False"
    assert _cond(working, "Stalled")["status"] == "False"
    assert "observedGeneration" not in working  # only a finished reconcile claims the generation

    done = st.ready({"a:1": "sha256:x"}, False, 3, working["conditions"], 200, now="t2", unlocked_at="t2")
    assert done["observedGeneration"] == 3 and done["phase"] == "Ready" and done["lastUnlockTime"] == "t2"
    assert (_cond(done, "Ready")["status"], _cond(done, "Ready")["lastTransitionTime"]) == ("True", "t2")
    assert _cond(done, "Reconciling")["status"] == "False"
    assert _cond(done, "Stalled")["lastTransitionTime"] == "t1"  # unchanged status keeps its time
    assert done["images"] == [{"name": "a:1", "id": "sha256:x", "present": True}]

    failed = st.stalled("AuthenticationFailed", "bad password", 4, done["conditions"], now="t3")
    assert failed["phase"] == "Failed" and failed["observedGeneration"] == 4
    assert _cond(failed, "Stalled") == {"type": "Stalled", "status": "True", "reason": "AuthenticationFailed",
                                         "message": "bad password", "observedGeneration": 4, "lastTransitionTime": "t3"}
    assert _cond(failed, "Ready")["reason"] == "AuthenticationFailed"
    # merge-patched over `done`, the images of generation 3 must not survive as "present"
    assert failed["images"] is None and failed["progress"] is None


def test_retrying_message_names_attempt_and_delay():
    retry = st.retrying("ResourceApiUnavailable", "HTTP 503", 2, 10, 1, None, now="t")
    assert retry["message"] == "attempt 2 failed: HTTP 503; retrying in 10s"
    assert _cond(retry, "Reconciling")["status"] == "True" and _cond(retry, "Stalled")["status"] == "False"


def test_backoff_doubles_and_caps():
    assert [st.backoff(a, 5, 60) for a in range(6)] == [5, 10, 20, 40, 60, 60]


def test_throttle_lets_phase_changes_and_intervals_through():
    now = [0.0]
    throttle = st.Throttle(2.0, clock=lambda: now[0])
    assert throttle.ready("Loading")
    now[0] = 1.0
    assert not throttle.ready("Loading")
    assert throttle.ready("Verifying")
    now[0] = 1.5
    assert throttle.ready("Verifying", final=True)
    now[0] = 4.0
    assert throttle.ready("Verifying")


def test_settings_from_env_and_errors():
    s = OperatorConfig.from_env({"IMAGEUNLOCK_ARCHIVE_ROOT": "/a:/b", "IMAGEUNLOCK_VERIFY_INTERVAL": "30",
                           "RESOURCE_API_URL": "http://x", "IMAGEUNLOCK_NAMESPACES": "ns1,ns2"})
    assert s.archive_roots == ("/a", "/b") and s.verify_interval == 30 and s.namespaces == ("ns1", "ns2")
    with pytest.raises(ConfigurationError) as info:
        OperatorConfig.from_env({"IMAGEUNLOCK_ARCHIVE_ROOT": "rel", "IMAGEUNLOCK_VERIFY_INTERVAL": "soon"})
    assert "IMAGEUNLOCK_ARCHIVE_ROOT" in info.value.message and "IMAGEUNLOCK_VERIFY_INTERVAL" in info.value.message


@pytest.mark.parametrize("url, ok", [
    ("https://api.azaion.com", True),
    ("https://api.azaion.com/", True),
    ("https://API.azaion.com/v2/keys", True),
    ("https://api.azaion.com.evil.test", False),
    ("https://api.azaion.com@evil.test", False),
    ("http://api.azaion.com", False),
    ("https://api.azaion.com:8443", False),
    ("https://evil.test/https://api.azaion.com", False),
])
def test_url_allowlist_matches_scheme_host_port_and_path_segments(url, ok):
    from imageunlock.spec import url_allowed

    assert url_allowed(url, ["https://api.azaion.com"]) is ok


def test_prefix_paths_match_on_segment_boundaries():
    from imageunlock.spec import url_allowed

    assert url_allowed("https://h.test/tenant-a/x", ["https://h.test/tenant-a"])
    assert not url_allowed("https://h.test/tenant-ab", ["https://h.test/tenant-a"])


def test_spec_url_outside_the_allowlist_is_refused():
    spec = {**GOOD, "resourceApi": {"url": "https://collector.evil.test", "credentialsSecretRef": {"name": "c"}}}
    with pytest.raises(ConfigurationError, match="not an allowed resource API"):
        parse_spec(spec, "https://api.example.test", ["https://api.example.test"])
    assert parse_spec(spec, None).api_url == "https://collector.evil.test"  # the CLI: the user's own call


def test_operator_settings_require_a_trusted_api():
    with pytest.raises(ConfigurationError, match="RESOURCE_API_URL or IMAGEUNLOCK_API_URL_ALLOWLIST"):
        OperatorConfig.from_env({})
    assert OperatorConfig.from_env({"RESOURCE_API_URL": "https://a.test"}).api_url_allowlist == ("https://a.test",)
    both = OperatorConfig.from_env({"RESOURCE_API_URL": "https://a.test", "IMAGEUNLOCK_API_URL_ALLOWLIST": "https://b.test, https://c.test"})
    assert both.api_url_allowlist == ("https://b.test", "https://c.test", "https://a.test")
