"""spec.keySealing TPM on the plane: the real agent process, a real TPM 2.0 (swtpm, reached
through IMAGEUNLOCK_TPM_TCTI as the chart's /dev/tpmrm0 would be), dockerd and the loopback
resource API (issue 23).

What must hold: after an unlock with the API up, the node's state directory holds one sealed
blob; with the API stopped, an image removed and the agent restarted (a reboot's effect on
memory), the repair loads it from the sealed key; a changed PCR or another TPM refuses the blob
and the node waits for the API with a reason that says so, then reseals once it answers; and
(the canary) no key bytes on disk, in logs, status, events or metrics."""

from __future__ import annotations

import base64
import json
import re
import urllib.request
from pathlib import Path

import pytest

from imageunlock.engine.crypto import derive_key
from imageunlock.engine.keys.resource_api import KEY_FRAGMENT_PATH, LOGIN_PATH
from imageunlock.engine.keys.sealed import SEALED_DIR

from ..support.cluster import NODE, is_ready, spec_for
from ..support.dockerd import loaded
from ..support.net import free_port
from ..support.operator_process import place
from ..support.tpm import Swtpm
from ..support.wait import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.tpm]


def blobs(state: Path) -> list[Path]:
    return sorted((state / SEALED_DIR).glob("*.tpmseal")) if (state / SEALED_DIR).exists() else []


def unlocked_with_a_sealed_key(cluster, namespace, secret, start_operator, archives, archive_root, env, name):
    path = place(archives.openssl_archive, archive_root)
    agent = start_operator(**env)
    spec = spec_for(path, archives.version, secret, keySealing="TPM", keySealingPCRs=[7])
    cluster.create_unlock(namespace, name, spec)
    wait_for(lambda: is_ready(cluster, namespace, name), 60, "Ready")
    return agent


def test_repair_after_an_agent_restart_comes_from_the_sealed_key_with_the_api_stopped(
    cluster,
    namespace,
    secret,
    start_operator,
    archives,
    archive_root,
    clean_docker,
    resource_api,
    swtpm: Swtpm,
    tmp_path,
):
    state = tmp_path / "node-state"
    env = {"IMAGEUNLOCK_STATE_DIR": str(state), "IMAGEUNLOCK_TPM_TCTI": swtpm.tcti}
    agent = unlocked_with_a_sealed_key(
        cluster, namespace, secret, start_operator, archives, archive_root, env, "sealed"
    )
    assert resource_api.calls[KEY_FRAGMENT_PATH] == 1
    [blob] = blobs(state)
    assert blob.stat().st_mode & 0o777 == 0o600 and (state / SEALED_DIR).stat().st_mode & 0o777 == 0o700

    resource_api.stop()
    agent.stop()
    clean_docker.docker("rmi", archives.refs[2])
    restarted = start_operator(**env)
    try:
        wait_for(lambda: loaded(clean_docker) == archives.ids, 90, "the removed image back, from the sealed key")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{restarted.log()[-4000:]}") from None
    wait_for(lambda: is_ready(cluster, namespace, "sealed"), 30, "Ready again")
    assert resource_api.calls[KEY_FRAGMENT_PATH] == 1 and resource_api.calls[LOGIN_PATH] == 1
    assert blobs(state) == [blob]
    assert "unsealed from this node's TPM" in restarted.log()


@pytest.mark.parametrize("change", ["other-tpm", "pcr-changed"])
def test_a_refused_sealed_key_waits_for_the_api_with_a_clear_reason_then_reseals(
    cluster,
    namespace,
    secret,
    start_operator,
    archives,
    archive_root,
    clean_docker,
    resource_api,
    swtpm: Swtpm,
    other_swtpm: Swtpm,
    tmp_path,
    change,
):
    state = tmp_path / "node-state"
    env = {"IMAGEUNLOCK_STATE_DIR": str(state), "IMAGEUNLOCK_TPM_TCTI": swtpm.tcti}
    agent = unlocked_with_a_sealed_key(
        cluster, namespace, secret, start_operator, archives, archive_root, env, "sealed"
    )
    [blob] = blobs(state)
    first = blob.read_bytes()

    resource_api.fail_until_stopped(LOGIN_PATH, 503)  # the API is down from here on
    agent.stop()
    if change == "other-tpm":  # the disk in another device
        env["IMAGEUNLOCK_TPM_TCTI"], cause = other_swtpm.tcti, "OtherTpm"
    else:  # a changed boot measurement
        swtpm.pcr_extend(7)
        cause = "PcrChanged"
    clean_docker.docker("rmi", archives.refs[2])
    start_operator(**env)

    def waiting() -> dict | None:
        entry = cluster.entries(namespace, "sealed").get(NODE) or {}
        return entry if entry.get("reason") == "ResourceApiUnavailable" else None

    entry = wait_for(waiting, 60, "the node waiting for the resource API")
    assert f"the key sealed to this node's TPM was not used ({cause}" in entry["message"], entry
    assert archives.refs[2] not in loaded(clean_docker)

    resource_api.stop_failing(LOGIN_PATH)
    wait_for(lambda: loaded(clean_docker) == archives.ids, 90, "the image back once the API answers")
    wait_for(lambda: is_ready(cluster, namespace, "sealed"), 30, "Ready again")
    assert resource_api.calls[KEY_FRAGMENT_PATH] == 2
    [resealed] = blobs(state)
    assert resealed.read_bytes() != first  # sealed again, to this TPM and PCR state


def spellings(secret: bytes) -> list[bytes]:
    return [secret, secret.hex().encode(), secret.hex().upper().encode(), base64.b64encode(secret)]


def test_canary_no_key_bytes_on_disk_in_logs_status_events_or_metrics(
    cluster, namespace, secret, start_operator, archives, archive_root, clean_docker, resource_api, swtpm, tmp_path
):
    """After a sealing unlock and a repair from the sealed key: the node's state directory
    holds the sealed blob (and the Docker ownership record: names and IDs) and nothing else;
    neither they, the TPM's own state and log, the agents' debug logs, the objects' status,
    the events nor /metrics hold the key or the fragment in any usual spelling."""
    port = free_port()
    state = tmp_path / "node-state"
    env = {
        "IMAGEUNLOCK_STATE_DIR": str(state),
        "IMAGEUNLOCK_TPM_TCTI": swtpm.tcti,
        "IMAGEUNLOCK_METRICS_ADDRESS": f"127.0.0.1:{port}",
        "IMAGEUNLOCK_LOG_LEVEL": "debug",
    }
    first = unlocked_with_a_sealed_key(cluster, namespace, secret, start_operator, archives, archive_root, env, "c")
    resource_api.fail_until_stopped(LOGIN_PATH, 503)
    first.stop()
    clean_docker.docker("rmi", archives.refs[0])
    second = start_operator(**env)
    wait_for(lambda: loaded(clean_docker) == archives.ids, 90, "the repair from the sealed key")
    wait_for(lambda: is_ready(cluster, namespace, "c"), 30, "Ready again")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        metrics = answer.read()

    key = derive_key(archives.fragment)
    needles = spellings(key) + spellings(archives.fragment)
    files = sorted(p for p in state.rglob("*") if p.is_file())
    names = [str(p.relative_to(state)) for p in files]
    assert [n for n in names if n.startswith(SEALED_DIR)] == [f"{SEALED_DIR}/{blobs(state)[0].name}"]
    # beside the blob only names: what this node loaded for whom, each ImageUnlock's reclaim policy
    records = r"owned-docker-\w+\.json|reclaim-policies\.json"
    assert all(n.startswith(SEALED_DIR + "/") or re.fullmatch(records, n) for n in names), names
    haystacks = {str(p): p.read_bytes() for p in files}
    haystacks |= {f"swtpm {p.name}": p.read_bytes() for p in swtpm.workdir.rglob("*") if p.is_file()}
    haystacks |= {
        "objects (status)": json.dumps(cluster.list(namespace)).encode(),
        "events": json.dumps(
            [e.to_dict() for e in cluster.core.list_namespaced_event(namespace).items], default=str
        ).encode(),
        "first agent's log": first.log().encode(),
        "second agent's log": second.log().encode(),
        "/metrics": metrics,
    }
    assert b"unsealed from this node's TPM" in haystacks["second agent's log"]
    for where, data in haystacks.items():
        for needle in needles:
            assert needle not in data, f"key material in {where}"
