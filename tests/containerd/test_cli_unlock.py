"""``imageunlock unlock --runtime containerd`` end to end: sid's containerd (pinning honoured),
the loopback resource API, openssl-made archives; what kubelet would see, asked over the CRI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from imageunlock.engine.crypto import decrypt_stream, encrypt_stream
from imageunlock.engine.keys.resource_api import KEY_FRAGMENT_PATH, LOGIN_PATH
from imageunlock.engine.refs import normalize_ref
from imageunlock.engine.runtimes.containerd import PINNED_LABEL
from imageunlock.errors import ARCHIVE_ERROR_MESSAGE

from ..support import tamper
from ..support.broken import broken_archives
from ..support.cli import CREDENTIALS_ENV, error_lines, run_cli
from ..support.containerd import Containerd, Cri
from ..support.images import ArchiveSet
from ..support.resource_api import FakeResourceApi

pytestmark = pytest.mark.containerd


@pytest.fixture
def cri(containerd: Containerd):
    client = Cri(containerd.socket, containerd.build.cri_proto)
    yield client
    client.close()


def unlock(
    archive: Path,
    archives: ArchiveSet,
    api: FakeResourceApi,
    daemon: Containerd,
    *extra: str,
    address: str | None = None,
    env: dict[str, str] | None = None,
):
    return run_cli(
        "unlock",
        "--archive",
        str(archive),
        "--version",
        archives.version,
        "--api-url",
        api.url,
        "--runtime",
        "containerd",
        "--containerd-address",
        address or str(daemon.socket),
        *extra,
        env={**CREDENTIALS_ENV, **daemon.env(), **(env or {})},
    )


def seen_by_kubelet(cri: Cri) -> dict[str, tuple[str, bool]]:
    """``{repo tag: (image ID, pinned)}`` as the CRI lists them (namespace k8s.io)."""
    return {tag: (image.id, image.pinned) for image in cri.list_images() for tag in image.repo_tags}


def test_unlocks_seven_images_pinned_into_k8s_io_then_fast_path_makes_no_key_request(
    clean_containerd, cri, archives, resource_api, tmp_path
):
    state = {"XDG_STATE_HOME": str(tmp_path)}
    first = unlock(archives.openssl_archive, archives, resource_api, clean_containerd, env=state)
    assert first.returncode == 0, first.stderr
    assert resource_api.calls == {LOGIN_PATH: 1, KEY_FRAGMENT_PATH: 1}
    # what kubelet sees: every image under its CRI name, with the verified ID, pinned
    expected = {normalize_ref(ref): (image_id, True) for ref, image_id in archives.ids.items()}
    assert seen_by_kubelet(cri) == expected
    for ref, image_id in archives.ids.items():
        status = cri.image_status(ref)
        assert status is not None and status.id == image_id and status.pinned
    assert all(PINNED_LABEL in image["labels"] for image in clean_containerd.images().values())

    resource_api.reset()
    second = unlock(archives.openssl_archive, archives, resource_api, clean_containerd, env=state)
    assert second.returncode == 0, second.stderr
    assert "already present" in second.stderr
    assert resource_api.calls[KEY_FRAGMENT_PATH] == 0 and resource_api.calls[LOGIN_PATH] == 0


def test_flipped_and_truncated_archives_load_nothing(clean_containerd, cri, archives, resource_api, tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    broken = broken_archives(archives, tmp_path)
    for name in ("flipped middle byte", "flipped last block", "truncated"):
        result = unlock(broken[name], archives, resource_api, clean_containerd, env={"TMPDIR": str(scratch)})
        assert result.returncode == 1, (name, result.stderr)
        assert error_lines(result.stderr) == [f"imageunlock: error: {ARCHIVE_ERROR_MESSAGE}"], name
        assert clean_containerd.images() == {} and seen_by_kubelet(cri) == {}, f"{name}: something was loaded"
        assert os.listdir(scratch) == [], f"{name}: left files"


def test_an_archive_failing_its_last_check_after_zero_padding_loads_nothing(
    clean_containerd, cri, archives, resource_api, tmp_path
):
    """A key holder's archive that would also tag nginx:latest, with 256 KiB of zero padding
    after the tar's end marker (valid tar): the refusal comes at the very end of the stream,
    long after the end marker has gone by. ctr imports at that marker, so the adapter must
    hold the zeros back: nothing may be imported, nginx least of all."""
    foreign = tamper.rewrite(
        archives.plaintext, tmp_path / "foreign.enc", archives.fragment, tamper.add_tags(["nginx:latest"])
    )
    with open(foreign, "rb") as f:
        plain = b"".join(decrypt_stream(f, archives.fragment)) + bytes(256 * 1024)
    padded = tmp_path / "padded.enc"
    padded.write_bytes(b"".join(encrypt_stream([plain], archives.fragment)))
    result = unlock(padded, archives, resource_api, clean_containerd)
    assert result.returncode == 1, result.stderr
    [line] = error_lines(result.stderr)
    assert "nginx:latest" in line and "nothing was loaded" in line
    assert clean_containerd.images() == {} and seen_by_kubelet(cri) == {}


def test_unreachable_containerd_is_a_transient_failure(archives, resource_api, containerd, tmp_path):
    result = unlock(
        archives.openssl_archive, archives, resource_api, containerd, address=str(tmp_path / "containerd.sock")
    )
    assert result.returncode == 75
    [line] = error_lines(result.stderr)
    assert "containerd at" in line and "not reachable" in line


@pytest.fixture(scope="module")
def archives_v2(dockerd, archives: ArchiveSet, tmp_path_factory) -> ArchiveSet:
    """The same services at 1.5.0, under the same key: an upgrade."""
    from ..support.images import build_archive_set

    return build_archive_set(
        dockerd, tmp_path_factory.mktemp("cli-v2"), archives.names, "1.5.0", archives.fragment, 16 * 1024
    )


def test_reclaim_policy_upgrade_unpins_rollback_pins_again_and_delete_keeps_what_a_container_uses(
    clean_containerd, cri, archives, archives_v2, resource_api, tmp_path
):
    """Issue 20, item 5: the previous version's images get the policy once this one is verified."""
    state = {"XDG_STATE_HOME": str(tmp_path)}
    old = {normalize_ref(ref) for ref in archives.refs}
    new = {normalize_ref(ref) for ref in archives_v2.refs}

    def pinned() -> dict[str, bool]:
        return {tag: is_pinned for tag, (_id, is_pinned) in seen_by_kubelet(cri).items()}

    assert unlock(archives.openssl_archive, archives, resource_api, clean_containerd, env=state).returncode == 0
    upgrade = unlock(archives_v2.openssl_archive, archives_v2, resource_api, clean_containerd, env=state)
    assert upgrade.returncode == 0, upgrade.stderr
    assert f"imageunlock: Reclaimed: unpinned {len(old)} image(s) of {archives.version}" in upgrade.stderr
    assert pinned() == {**dict.fromkeys(old, False), **dict.fromkeys(new, True)}

    # rollback: 1.4.2 is still there with the IDs this state file verified: found, pinned again
    used, *unused = sorted(new)
    clean_containerd.ctr("containers", "create", used, "stopped-user", "/bin/true")
    try:
        back = unlock(
            archives.openssl_archive, archives, resource_api, clean_containerd, "--reclaim-policy", "Delete", env=state
        )
        assert back.returncode == 0, back.stderr
        assert "already present" in back.stderr
        assert f"removed {len(unused)} image(s) of 1.5.0; kept 1" in back.stderr
        assert pinned() == {**dict.fromkeys(old, True), used: True}  # 1.5.0: only what the container uses
    finally:
        clean_containerd.ctr("containers", "rm", "stopped-user")
