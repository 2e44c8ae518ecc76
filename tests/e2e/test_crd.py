"""The ImageUnlock CRD as the API server serves it: its resource names, ``kubectl explain``,
and the schema refusing invalid specs before any operator sees them."""

from __future__ import annotations

import json

import pytest

from imageunlock.kube.client import GROUP

from ..support.cluster import spec_for, unlock_object

pytestmark = pytest.mark.e2e


def test_crd_is_served_and_explained(cluster, crd):
    resources = cluster.kubectl("api-resources", "--api-group", GROUP).stdout
    assert "imageunlocks" in resources and "iu" in resources
    spec = cluster.kubectl("explain", "imageunlock.spec").stdout
    fields = ("archivePath", "version", "images", "keySource", "resourceApi", "runtime", "archiveSha256")
    for field in (*fields, "reclaimPolicy", "keySealing", "keySealingPCRs"):
        assert field in spec, field
    policy = cluster.kubectl("explain", "imageunlock.spec.reclaimPolicy").stdout
    assert "Unpin" in policy and "Delete" in policy and "Retain" in policy and "Ready" in policy
    reclaimed = cluster.kubectl("explain", "imageunlock.status.nodes.reclaimed").stdout
    assert "refs" in reclaimed and "policy" in reclaimed and "kept" in reclaimed
    sealing = cluster.kubectl("explain", "imageunlock.spec.keySealing").stdout
    assert "TPM" in sealing and "sealed blob" in sealing
    pcrs = cluster.kubectl("explain", "imageunlock.spec.keySealingPCRs").stdout
    assert "secure-boot" in pcrs
    for where in ("resourceApi", "keySource.resourceApi"):
        ref = cluster.kubectl("explain", f"imageunlock.spec.{where}.credentialsSecretRef").stdout
        assert "name" in ref and "email" in ref, where


BAD_SPECS = {
    "relative path": ({"archivePath": "images.enc"}, "spec.archivePath"),
    "bad tag": ({"version": "1.0 beta"}, "spec.version"),
    "bad image": ({"images": ["Azaion/Flights"]}, "spec.images[0]"),
    "bad digest": ({"archiveSha256": "xyz"}, "spec.archiveSha256"),
    "unknown runtime": ({"runtime": "podman"}, "spec.runtime"),
    "unknown reclaim policy": ({"reclaimPolicy": "Shred"}, "spec.reclaimPolicy"),
    "no secret": ({"resourceApi": {"url": "http://x"}}, "spec.resourceApi.credentialsSecretRef"),
    "both key sources": (
        {"keySource": {"resourceApi": {"credentialsSecretRef": {"name": "c"}}}},
        "give exactly one of spec.keySource and spec.resourceApi",
    ),
    "no key source": ({"resourceApi": None}, "give exactly one of spec.keySource and spec.resourceApi"),
    "empty key source": ({"resourceApi": None, "keySource": {}}, "spec.keySource"),
    "unknown key sealing": ({"keySealing": "HSM"}, "spec.keySealing"),
    "PCR out of range": ({"keySealing": "TPM", "keySealingPCRs": [24]}, "spec.keySealingPCRs[0]"),
    "PCRs without TPM": ({"keySealingPCRs": [7]}, "spec.keySealingPCRs needs spec.keySealing TPM"),
    "a resettable PCR": (
        {"keySealing": "TPM", "keySealingPCRs": [7, 16]},
        "spec.keySealingPCRs 16 and 23 bind nothing",
    ),
}


@pytest.mark.parametrize("case", list(BAD_SPECS))
def test_invalid_specs_are_refused_by_the_api_server(cluster, namespace, case):
    change, field = BAD_SPECS[case]
    spec = {**spec_for("/var/lib/imageunlock/images.enc", "1.0", "creds"), **change}
    spec = {name: value for name, value in spec.items() if value is not None}  # None: left out
    manifest = json.dumps(unlock_object(namespace, "bad", spec))
    result = cluster.kubectl("apply", "-f", "-", input=manifest, check=False)
    assert result.returncode != 0
    assert field in result.stderr, result.stderr


def test_a_key_source_member_is_accepted_in_place_of_resource_api(cluster, namespace):
    spec = spec_for("/var/lib/imageunlock/images.enc", "1.0", "creds")
    spec["keySource"] = {"resourceApi": spec.pop("resourceApi")}
    manifest = json.dumps(unlock_object(namespace, "member", spec))
    result = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=manifest, check=False)
    assert result.returncode == 0, result.stderr
