"""Parsing an ImageUnlock spec (pure): defaults, every problem at once with its field path,
the runtime choice and the allow-listed resource API URL."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from imageunlock.defaults import DEFAULT_IMAGES
from imageunlock.engine.keys.apiurl import url_allowed
from imageunlock.errors import ConfigurationError
from imageunlock.kube.spec import check_runtime, parse_spec

GOOD = {
    "archivePath": "/var/lib/imageunlock/images.enc",
    "version": "1.4.2",
    "resourceApi": {"url": "https://api.example.test", "credentialsSecretRef": {"name": "loader-creds"}},
}


def test_minimal_spec_gets_defaults():
    spec = parse_spec(GOOD, None)
    assert spec.images == DEFAULT_IMAGES and spec.runtime == "auto" and spec.archive_sha256 is None
    assert spec.to_request().refs[0] == "azaion/annotations:1.4.2"


def test_the_crds_default_images_are_the_product_defaults():
    """The CRD defaults spec.images at the API server; the parser, for an older CRD, and the
    CLI use imageunlock.defaults: the one list in Python, and YAML held equal to it."""
    crd = yaml.safe_load(
        (Path(__file__).resolve().parents[2] / "crds" / "loader.azaion.com_imageunlocks.yaml").read_text()
    )
    images = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["images"]
    assert tuple(images["default"]) == DEFAULT_IMAGES


def test_api_url_falls_back_to_operator_default():
    spec = parse_spec({**GOOD, "resourceApi": {"credentialsSecretRef": {"name": "c"}}}, "http://127.0.0.1:9")
    assert spec.key_source.url == "http://127.0.0.1:9"


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
    for fragment in (
        "spec.archivePath",
        "spec.version",
        "spec.images[0]",
        "twice",
        "spec.resourceApi.url",
        "credentialsSecretRef.name is required",
        "spec.runtime",
        "spec.archiveSha256",
    ):
        assert fragment in message, fragment


@pytest.mark.parametrize("operator_runtime", ["docker", "containerd"])
def test_runtime_auto_and_absent_mean_the_operators_own(operator_runtime):
    for spec in (GOOD, {**GOOD, "runtime": "auto"}, {**GOOD, "runtime": operator_runtime}):
        assert check_runtime(parse_spec(spec, None), operator_runtime).runtime == operator_runtime


def test_a_runtime_the_operator_does_not_load_into_is_refused_not_silently_swapped():
    with pytest.raises(ConfigurationError, match="IMAGEUNLOCK_RUNTIME") as info:
        check_runtime(parse_spec({**GOOD, "runtime": "containerd"}, None), "docker")
    assert "use auto" in info.value.message
    with pytest.raises(ConfigurationError, match=r"is not this node's runtime"):
        check_runtime(parse_spec({**GOOD, "runtime": "docker"}, None), "containerd")


def test_missing_api_url_everywhere_is_explained():
    with pytest.raises(ConfigurationError, match="RESOURCE_API_URL"):
        parse_spec({**GOOD, "resourceApi": {"credentialsSecretRef": {"name": "c"}}}, None)


@pytest.mark.parametrize(
    "url, ok",
    [
        ("https://api.azaion.com", True),
        ("https://api.azaion.com/", True),
        ("https://API.azaion.com/v2/keys", True),
        ("https://api.azaion.com.evil.test", False),
        ("https://api.azaion.com@evil.test", False),
        ("http://api.azaion.com", False),
        ("https://api.azaion.com:8443", False),
        ("https://evil.test/https://api.azaion.com", False),
    ],
)
def test_url_allowlist_matches_scheme_host_port_and_path_segments(url, ok):

    assert url_allowed(url, ["https://api.azaion.com"]) is ok


def test_prefix_paths_match_on_segment_boundaries():

    assert url_allowed("https://h.test/tenant-a/x", ["https://h.test/tenant-a"])
    assert not url_allowed("https://h.test/tenant-ab", ["https://h.test/tenant-a"])


def test_spec_url_outside_the_allowlist_is_refused():
    spec = {**GOOD, "resourceApi": {"url": "https://collector.evil.test", "credentialsSecretRef": {"name": "c"}}}
    with pytest.raises(ConfigurationError, match="not an allowed resource API"):
        parse_spec(spec, "https://api.example.test", ["https://api.example.test"])
    assert parse_spec(spec, None).key_source.url == "https://collector.evil.test"  # the CLI: the user's own call


def test_reclaim_policy_defaults_to_unpin_and_is_checked():
    from imageunlock.engine.reclaim import ReclaimPolicy

    assert parse_spec(GOOD, None).reclaim_policy is ReclaimPolicy.UNPIN
    assert parse_spec({**GOOD, "reclaimPolicy": "Delete"}, None).reclaim_policy is ReclaimPolicy.DELETE
    with pytest.raises(ConfigurationError, match=r"spec\.reclaimPolicy 'Shred' is not one of Retain, Unpin, Delete"):
        parse_spec({**GOOD, "reclaimPolicy": "Shred"}, None)


def test_key_sealing_defaults_to_none_and_takes_tpm_with_pcrs():
    assert parse_spec(GOOD, None).key_sealing == "None"
    sealed = parse_spec({**GOOD, "keySealing": "TPM", "keySealingPCRs": [7, 0, 7]}, None)
    assert (sealed.key_sealing, sealed.key_sealing_pcrs) == ("TPM", (0, 7))


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ({"keySealing": "tpm"}, "spec.keySealing 'tpm' is not one of None, TPM"),
        ({"keySealing": "TPM", "keySealingPCRs": [24]}, "spec.keySealingPCRs must be a list of PCR numbers 0 to 23"),
        ({"keySealing": "TPM", "keySealingPCRs": [True]}, "spec.keySealingPCRs must be a list"),
        ({"keySealingPCRs": [7]}, "spec.keySealingPCRs needs spec.keySealing TPM"),
        ({"keySealing": "TPM", "keySealingPCRs": [7, 23]}, "spec.keySealingPCRs [23] bind nothing"),
    ],
)
def test_key_sealing_problems_are_named(extra, problem):
    with pytest.raises(ConfigurationError) as caught:
        parse_spec({**GOOD, **extra}, None)
    assert problem in caught.value.message
