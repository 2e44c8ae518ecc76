"""What a node records about the images it loaded (issue 20): the owner text, Docker's
node-local ownership file, and how the containerd adapter reads labels and the CRI's
container records (no daemon needed; the daemons' side is in tests/docker, tests/containerd)."""

from __future__ import annotations

import base64
import json
import os
import stat
import threading
from pathlib import Path

import pytest

from imageunlock.engine.models import check_owner, is_owner, owner_of
from imageunlock.engine.refs import is_tagged_ref
from imageunlock.engine.runtimes import STATE_FILE_MAX, read_state_file
from imageunlock.engine.runtimes.containerd import (
    CRI_METADATA,
    DIGEST_KEY,
    OWNER_KEY,
    REF_KEY,
    ContainerdRuntime,
    _cri_image_ref,
    _labels,
)
from imageunlock.engine.runtimes.owned import OwnedFile
from imageunlock.errors import ConfigurationError

ID = "sha256:" + "a" * 64


def test_an_owner_is_namespace_slash_name():
    assert owner_of("edge", "azaion-images.v2") == "edge/azaion-images.v2"
    for bad in ("edge", "edge/a/b", "Edge/x", "edge/x=y", "edge/x,y", "/x", "edge/", "a" * 64 + "/x"):
        with pytest.raises(ConfigurationError, match="<namespace>/<name>"):
            check_owner(bad)


def test_the_ownership_file_is_written_whole_private_and_read_back(tmp_path):
    directory = tmp_path / "state"
    owned = OwnedFile(str(directory), "docker", "ENGINE:ID")
    assert owned.read() == {}  # no file yet: nothing owned
    owned.write({"azaion/x:1": ("edge/a", ID)})
    assert owned.read() == {"azaion/x:1": ("edge/a", ID)}
    assert stat.S_IMODE(os.stat(owned.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    assert os.listdir(directory) == [os.path.basename(owned.path)]  # no temporary file left
    assert json.loads(Path(owned.path).read_text()) == {
        "version": 1,
        "refs": {"azaion/x:1": {"owner": "edge/a", "id": ID}},
    }


def test_each_engine_has_its_own_file(tmp_path):
    first, second = OwnedFile(str(tmp_path), "docker", "ONE"), OwnedFile(str(tmp_path), "docker", "TWO")
    first.write({"azaion/x:1": ("edge/a", ID)})
    assert first.path != second.path and second.read() == {}


@pytest.mark.parametrize(
    "text",
    ["{not json", "[]", '{"version": 1}', '{"refs": {"azaion/x:1": "edge/a"}}', '{"refs": {"a:1": {"owner": 1}}}'],
)
def test_an_unreadable_file_owns_nothing(tmp_path, text):
    """The safe direction: what the node cannot read it does not touch."""
    owned = OwnedFile(str(tmp_path), "docker", "ID")
    with open(owned.path, "w") as f:
        f.write(text)
    assert owned.read() == {}


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    owned = OwnedFile(str(tmp_path), "docker", "ID")
    owned.write({"azaion/x:1": ("edge/a", ID)})

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        owned.write({})
    assert owned.read() == {"azaion/x:1": ("edge/a", ID)}
    assert os.listdir(tmp_path) == [os.path.basename(owned.path)]


def test_containerd_labels_column():
    text = "io.cri-containerd.pinned=pinned,unlock.loader.azaion.com/owner=edge/a"
    assert _labels(text) == {"io.cri-containerd.pinned": "pinned", "unlock.loader.azaion.com/owner": "edge/a"}
    assert _labels("") == {} and _labels("-") == {}


def _info(metadata: object) -> dict:
    value = base64.b64encode(json.dumps(metadata).encode()).decode()
    return {"Image": "", "Extensions": {CRI_METADATA: {"type_url": "x", "value": value}}}


def test_the_cri_image_ref_of_a_cri_container():
    assert _cri_image_ref(_info({"Version": "v1", "Metadata": {"ID": "c1", "ImageRef": ID}})) == ID
    assert _cri_image_ref(_info({"Metadata": {"ImageRef": "docker.io/x:1"}})) is None  # only an image ID counts
    assert _cri_image_ref(_info(["odd"])) is None
    assert _cri_image_ref({"Image": "docker.io/x:1"}) is None  # containerd's own container: no CRI record
    assert _cri_image_ref({"Extensions": {CRI_METADATA: {"value": "!!not base64"}}}) is None


# -- what is read back from the node: the state dir's files and containerd's labels ------------
# A node-local attacker (or an accident) can leave anything where a state file belongs. Each is
# read only when it is a plain file of ours, and each record is checked as it was on write:
# whatever fails counts as absent, so the agent touches nothing (the safe direction).


def in_thread(read, *args):
    """``read(*args)`` in a daemon thread, joined for 3 s: (finished, result)."""
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(read(*args)), daemon=True)
    thread.start()
    thread.join(3)
    return not thread.is_alive(), result[0] if result else None


def test_a_state_file_is_read_whole_and_an_absent_one_is_none(tmp_path):
    path = tmp_path / "state.json"
    assert read_state_file(str(path), "state") is None
    path.write_bytes(b"{}")
    path.chmod(0o600)
    assert read_state_file(str(path), "state") == b"{}"


def test_a_fifo_where_a_state_file_belongs_is_not_waited_on(tmp_path, caplog):
    """Plain open() blocks on a FIFO until someone writes: the agent would hang at start."""
    fifo = tmp_path / "state.json"
    os.mkfifo(fifo)
    finished, data = in_thread(read_state_file, str(fifo), "state")
    if not finished:  # let the thread go
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert finished and data is None
    assert "not a regular file" in caplog.text


def test_a_state_file_is_never_read_through_a_symlink(tmp_path, caplog):
    target = tmp_path / "elsewhere.json"
    target.write_text("{}")
    target.chmod(0o600)
    os.symlink(target, tmp_path / "state.json")
    assert read_state_file(str(tmp_path / "state.json"), "state") is None
    os.symlink("/dev/zero", tmp_path / "zero.json")  # or an endless device: never read
    assert read_state_file(str(tmp_path / "zero.json"), "state") is None
    assert caplog.text.count("treating it as empty") == 2


def test_a_state_file_over_4_mib_is_not_read(tmp_path):
    path = tmp_path / "state.json"
    with open(path, "wb") as f:
        f.truncate(STATE_FILE_MAX + 1)  # sparse: no disk used
    path.chmod(0o600)
    assert read_state_file(str(path), "state") is None
    os.truncate(path, STATE_FILE_MAX)
    assert len(read_state_file(str(path), "state") or b"") == STATE_FILE_MAX


def test_a_state_file_others_may_write_or_another_user_owns_is_not_read(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    path.write_text("{}")
    path.chmod(0o622)
    assert read_state_file(str(path), "state") is None
    path.chmod(0o600)
    assert read_state_file(str(path), "state") == b"{}"
    monkeypatch.setattr(os, "geteuid", lambda: os.stat(path).st_uid + 1)  # as if another user wrote it
    assert read_state_file(str(path), "state") is None


def test_the_ownership_file_is_not_read_through_a_symlink(tmp_path):
    target = tmp_path / "elsewhere.json"
    target.write_text(
        json.dumps({"version": 1, "refs": {"docker.io/library/nginx:latest": {"owner": "ns/gone", "id": ID}}})
    )
    target.chmod(0o600)
    owned = OwnedFile(str(tmp_path), "docker", "ENGINE")
    os.symlink(target, owned.path)
    assert owned.read() == {}


def test_records_read_back_are_checked_as_on_write(tmp_path):
    """An owner like ``a/b/c/../kube-system`` would have the agent post Events into (and apply a
    policy written for) another namespace; a "ref" that is an image ID would go to docker rmi."""
    owned = OwnedFile(str(tmp_path), "docker", "ENGINE")
    owned.write({"docker.io/a/app:1": ("ns/iu", ID), "docker.io/a/app:2": ("ns/iu", ID)})
    document = json.loads(Path(owned.path).read_text())
    document["refs"]["docker.io/a/app:1"]["owner"] = "a/b/c/../kube-system"
    document["refs"]["sha256:" + "b" * 64] = {"owner": "ns/iu", "id": ID}
    document["refs"]["-f:1"] = {"owner": "ns/iu", "id": ID}
    Path(owned.path).write_text(json.dumps(document))
    assert owned.read() == {"docker.io/a/app:2": ("ns/iu", ID)}


@pytest.mark.parametrize(
    ("ref", "ok"),
    [
        ("nginx:1", True),
        ("docker.io/library/nginx:latest", True),
        ("localhost:5000/team-a/app:1.0", True),
        ("registry.corp/team-a/app:2", True),
        ("deadbeefcafe/app:1", True),
        ("sha256:" + "a" * 64, False),  # an image ID
        ("sha256:abc", False),  # an ID prefix
        ("abcdef123456:1", False),  # docker takes a bare hex name for an ID
        ("nginx", False),  # a load records a tag
        ("docker.io/a/b@sha256:" + "a" * 64, False),
        ("-f:1", False),
        ("team/App:1", False),
        ("a b:1", False),
        ("docker.io/a/" + "b" * 250 + ":1", False),
        (None, False),
    ],
)
def test_what_counts_as_a_recorded_ref(ref, ok):
    assert is_tagged_ref(ref) is ok


def test_containerd_records_with_a_malformed_label_or_other_content_are_not_ours(monkeypatch):
    runtime = ContainerdRuntime()
    good = "docker.io/a/app:1"

    def labelled(name: str, owner: str) -> tuple[str, str, str]:
        return ("manifest", ID, f"{OWNER_KEY}={owner},{REF_KEY}={name},{DIGEST_KEY}={ID}")

    records = {
        good: labelled(good, "ns/iu"),
        "docker.io/a/app:2": labelled("docker.io/a/app:2", "kube-system/x/y"),
        "sha256:" + "b" * 64: labelled("sha256:" + "b" * 64, "ns/iu"),
        # imported again since (ctr import, a CRI pull): new content, our labels kept
        "docker.io/a/app:3": ("manifest", "sha256:" + "c" * 64, labelled("docker.io/a/app:3", "ns/iu")[2]),
    }
    monkeypatch.setattr(runtime, "_check_socket", lambda: None)
    monkeypatch.setattr(runtime, "_records", lambda: records)
    assert [(r.ref, r.owner) for r in runtime.owned_refs()] == [(good, "ns/iu")]
    assert is_owner("ns/iu") and not is_owner("kube-system/x/y") and not is_owner(None)
