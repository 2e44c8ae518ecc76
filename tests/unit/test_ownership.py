"""What a node records about the images it loaded (issue 20): the owner text, Docker's
node-local ownership file, and how the containerd adapter reads labels and the CRI's
container records (no daemon needed; the daemons' side is in tests/docker, tests/containerd)."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from imageunlock.engine.models import check_owner, owner_of
from imageunlock.engine.runtimes.containerd import CRI_METADATA, _cri_image_ref, _labels
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
