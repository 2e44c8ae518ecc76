"""The in-stream image-archive check: accepts what ``docker save`` writes, rejects any damage."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imageunlock.engine.crypto import decrypt_stream, encrypt_stream
from imageunlock.engine.dockersave import ImageTarVerifier, verified_stream
from imageunlock.errors import ARCHIVE_ERROR_MESSAGE, ArchiveError, ForeignTagsError, ImagesNotInArchiveError

from ..support import savetar
from ..support.tarbuild import EVIL, TAGS, add_repo_tag, append, edit_json, member, rewrite
from ..support.tarcheck import refused, streamed, verify


@pytest.mark.parametrize("layout", ["legacy", "oci"])
@pytest.mark.parametrize("chunk", [1, 511, 512, 4096, 1 << 20])
def test_accepts_both_layouts_in_any_chunking(layout: str, chunk: int):
    data = savetar.build(TAGS, layout=layout, share_first_layer=True)
    assert verify(data, chunk) == savetar.config_ids(data)


def test_accepts_long_names_and_shared_layer_symlinks():
    data = savetar.build(TAGS, long_names=True, share_first_layer=True)
    assert verify(data) == savetar.config_ids(data)


def test_layer_with_wrong_diff_id_is_rejected():
    data = savetar.build(TAGS)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        layer = next(m for m in tar.getmembers() if m.name.endswith("layer.tar") and m.isfile())
        offset = layer.offset_data + 100
    tampered = bytearray(data)
    tampered[offset] ^= 0x01
    with pytest.raises(ArchiveError):
        verify(bytes(tampered))


def test_config_not_matching_its_name_is_rejected():
    data = savetar.build(TAGS)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))
    good = manifest[0]["Config"]
    bad = data.replace(good.encode(), ("0" * 64 + ".json").encode())
    with pytest.raises(ArchiveError):
        verify(bad)


def test_plain_tar_without_manifest_is_rejected():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("hello.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(ArchiveError):
        verify(buf.getvalue())


def test_verified_stream_passes_everything_through_when_intact():
    data = savetar.build(TAGS)
    chunks = [data[i : i + 65536] for i in range(0, len(data), 65536)]
    assert b"".join(verified_stream(chunks, ImageTarVerifier(), TAGS)) == data


def test_missing_expected_image_stops_before_the_tail():
    data = savetar.build(TAGS)
    chunks = [data[i : i + 2048] for i in range(0, len(data), 2048)]
    out = bytearray()
    with pytest.raises(ImagesNotInArchiveError) as info:
        for chunk in verified_stream(chunks, ImageTarVerifier(), [*TAGS, "azaion/detections:2.0"]):
            out += chunk
    assert info.value.missing == ["azaion/detections:2.0"]
    assert len(out) <= len(data) - 1024  # the end-of-archive marker never went out


def _decrypt_verify(archive: bytes, fragment: bytes) -> int:
    """Bytes that would have reached the runtime before the check stopped the stream."""
    sent = 0
    try:
        for chunk in verified_stream(decrypt_stream(io.BytesIO(archive), fragment), ImageTarVerifier(), TAGS):
            sent += len(chunk)
    except (ArchiveError, ImagesNotInArchiveError, ForeignTagsError) as exc:
        assert not isinstance(exc, ArchiveError) or str(exc) == ARCHIVE_ERROR_MESSAGE
        return -sent - 1
    return sent


def test_any_flipped_ciphertext_byte_stops_the_stream_before_the_end():
    """CBC has no MAC: the content addresses must catch a flip wherever it lands."""
    fragment = b"fixed fragment for a deterministic test"
    plain = savetar.build(TAGS, share_first_layer=True)
    archive = b"".join(encrypt_stream([plain], fragment, iv=bytes(range(16))))
    assert _decrypt_verify(archive, fragment) == len(plain)
    positions = sorted({*range(0, 16), *range(16, len(archive), 97), *range(len(archive) - 48, len(archive))})
    for pos in positions:
        tampered = bytearray(archive)
        tampered[pos] ^= 0x40
        sent = _decrypt_verify(bytes(tampered), fragment)
        assert sent < 0, f"flip at {pos} of {len(archive)} went through"
        assert -sent - 1 <= len(plain) - 1024, f"flip at {pos}: end marker was sent"


# -- whatever the content, failures are the uniform ArchiveError -----------------------------


@pytest.mark.parametrize("name", ["manifest.json", "repositories"])
def test_deeply_nested_json_is_an_archive_error(name):
    data = rewrite(savetar.build(TAGS), name, lambda body: b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(ArchiveError) as info:
        streamed(data)
    assert str(info.value) == ARCHIVE_ERROR_MESSAGE


_KEYS = st.sampled_from(
    [
        "Config",
        "Layers",
        "RepoTags",
        "rootfs",
        "diff_ids",
        "manifests",
        "annotations",
        "io.containerd.image.name",
        "azaion/flights",
    ]
)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=6) | st.sampled_from([*TAGS, EVIL]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_KEYS | st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)


def _config_with(rootfs) -> tuple[bytes, str]:
    config = json.dumps({"rootfs": rootfs}).encode()
    return config, hashlib.sha256(config).hexdigest() + ".json"


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    st.sampled_from(
        [
            "manifest",
            "entry",
            "Config",
            "Layers",
            "RepoTags",
            "rootfs",
            "repositories",
            "index",
            "manifests",
            "annotations",
        ]
    ),
    _JSON,
)
def test_any_json_in_metadata_fails_as_an_unlock_error(slot, value):
    """Whatever shape the JSON has: success, or an error the service handles (no crash)."""
    base = savetar.build(TAGS[:1], layout="oci")
    config, config_name = _config_with(value)
    edits = {
        "manifest": ("manifest.json", lambda m: value),
        "entry": ("manifest.json", lambda m: [value]),
        "rootfs": ("manifest.json", lambda m: [*m, {"Config": config_name, "RepoTags": [], "Layers": []}]),
        "repositories": ("repositories", lambda r: value),
        "index": ("index.json", lambda i: value),
        "manifests": ("index.json", lambda i: {"manifests": value}),
        "annotations": ("index.json", lambda i: {"manifests": [{"annotations": value}]}),
    }
    name, edit = edits.get(slot, ("manifest.json", lambda m: [{**m[0], slot: value}]))
    data = append(edit_json(base, name, edit), member(config_name, config))
    try:
        streamed(data, TAGS[:1])
    except ArchiveError as exc:
        assert str(exc) == ARCHIVE_ERROR_MESSAGE
    except (ImagesNotInArchiveError, ForeignTagsError):
        pass


# -- only the requested refs may be created or moved -----------------------------------------


def _lower_case_repo_tags(manifest):
    first = {k: v for k, v in manifest[0].items() if k != "RepoTags"}
    return [{**first, "repotags": manifest[0]["RepoTags"] + [EVIL]}, *manifest[1:]]  # Go reads it


def _annotate(key, value):
    def edit(index):
        index["manifests"][0]["annotations"][key] = value
        return index

    return edit


@pytest.mark.parametrize(
    "layout, name, edit",
    [
        ("legacy", "manifest.json", add_repo_tag),
        ("oci", "manifest.json", add_repo_tag),
        ("legacy", "manifest.json", _lower_case_repo_tags),
        ("legacy", "repositories", lambda repos: {**repos, "nginx": {"latest": "0" * 64}}),
        ("oci", "index.json", _annotate("io.containerd.image.name", "docker.io/library/nginx:latest")),
        ("oci", "index.json", _annotate("org.opencontainers.image.ref.name", EVIL)),
    ],
    ids=["RepoTags", "RepoTags-oci", "repotags-spelling", "repositories", "containerd-name", "oci-ref-name"],
)
def test_foreign_tag_stops_the_stream_before_the_tail(layout, name, edit):
    data = edit_json(savetar.build(TAGS, layout=layout), name, edit)
    error = refused(data, ForeignTagsError)
    assert error.reason == "ArchiveHasForeignTags" and not error.transient
    assert EVIL in str(error) and "nothing was loaded" in str(error)


def test_foreign_tags_are_listed_at_most_five():
    extra = [f"team{i}/app:1" for i in range(7)]

    def edit(m):
        return [{**m[0], "RepoTags": m[0]["RepoTags"] + extra}, *m[1:]]

    message = str(refused(edit_json(savetar.build(TAGS), "manifest.json", edit), ForeignTagsError))
    assert all(ref in message for ref in extra[:5]) and extra[5] not in message
    assert "and 2 more" in message


def test_refs_compare_after_dockers_normalisation():
    spelled = {tag: "index.docker.io/" + tag for tag in TAGS}

    def edit(m):
        return [{**e, "RepoTags": [spelled[t] for t in e["RepoTags"]]} for e in m]

    data = edit_json(savetar.build(TAGS), "manifest.json", edit)
    assert streamed(data, ["docker.io/" + tag for tag in TAGS]) == data
    verifier = ImageTarVerifier()
    verifier.feed(data)
    contents = verifier.close()
    ids = savetar.config_ids(savetar.build(TAGS))
    assert all(contents.image_id(tag) == ids[tag] for tag in TAGS)
    assert contents.image_id("azaion/flights:2.1") is None


def test_untagged_images_and_relative_ref_names_are_fine():
    def untagged(m):
        return [*m, {**m[0], "RepoTags": None}]

    data = edit_json(savetar.build(TAGS, layout="oci"), "manifest.json", untagged)
    data = edit_json(data, "index.json", _annotate("org.opencontainers.image.ref.name", "2.0"))
    assert streamed(data) == data


def test_a_bare_ref_name_alone_is_a_name_ctr_would_invent_and_is_refused():
    """Issue 18, item 4: with no io.containerd.image.name beside it, ctr turns a bare
    ``org.opencontainers.image.ref.name`` into ``import-<date>:<tag>`` (and pinned it)."""

    def bare(index):
        index["manifests"][0]["annotations"] = {"org.opencontainers.image.ref.name": "1.0"}
        return index

    data = edit_json(savetar.build(TAGS, layout="oci"), "index.json", bare)
    error = refused(data, ForeignTagsError)
    assert "import-YYYY-MM-DD:1.0" in str(error)


def _index_points_at(digest_of):
    def edit(index):
        index["manifests"][0]["digest"] = digest_of(index)
        return index

    return edit


@pytest.mark.parametrize(
    "digest_of",
    [
        lambda index: "sha256:" + "7" * 64,  # content not in this archive (another tenant's, in the store)
        lambda index: index["manifests"][1]["digest"],  # another image's manifest than its name's
    ],
    ids=["manifest-not-in-the-archive", "manifest-of-another-image"],
)
def test_index_json_must_name_the_manifests_the_checks_verified(digest_of):
    """Review of issue 18 (medium): ctr imports an OCI-layout archive from index.json alone;
    an index naming content outside the archive, or another manifest than manifest.json's for
    that name, loaded unverified content and left it pinned."""
    data = edit_json(savetar.build(TAGS, layout="oci"), "index.json", _index_points_at(digest_of))
    assert isinstance(refused(data), ArchiveError)


def test_an_index_with_its_own_manifests_in_the_archive_passes():
    assert streamed(savetar.build(TAGS, layout="oci")) == savetar.build(TAGS, layout="oci")


def test_a_missing_ref_is_reported_before_foreign_ones():
    data = edit_json(savetar.build(TAGS), "manifest.json", add_repo_tag)
    error = refused(data, ImagesNotInArchiveError, [*TAGS, "azaion/detections:2.0"])
    assert error.missing == ["azaion/detections:2.0"]


def test_foreign_tags_in_a_status_message_are_printable_and_bounded():
    odd = ["evil\n\x1b[31m:1", "x" * 5000]

    def edit(m):
        return [{**m[0], "RepoTags": m[0]["RepoTags"] + odd}, *m[1:]]

    message = str(refused(edit_json(savetar.build(TAGS), "manifest.json", edit), ForeignTagsError))
    assert "evil??[31m:1" in message and "\x1b" not in message and len(message) < 700


# -- the JSON as the Engine reads it (Go's encoding/json) ----------------------------------
# Each archive below shows the checks one manifest.json (all refs requested) while the Engine,
# reading the same bytes, would load another that also tags nginx:latest.


def _repo_tags_spelled_twice(data):
    def edit(m):
        return [{**m[0], "repotags": [EVIL]}, *m[1:]]  # Go: the last one wins

    return edit_json(data, "manifest.json", edit)


def _annotations_given_twice(data):
    data = savetar.build(TAGS, layout="oci")  # Go merges the two maps; Python keeps the last
    spliced = b'"annotations": {"io.containerd.image.name": "docker.io/library/nginx:latest"}, "annotations"'
    return rewrite(data, "index.json", lambda body: body.replace(b'"annotations"', spliced, 1))


@pytest.mark.parametrize(
    "craft", [_repo_tags_spelled_twice, _annotations_given_twice], ids=lambda craft: craft.__name__.strip("_")
)
def test_archive_the_engine_would_read_differently_is_refused(craft):
    refused(craft(savetar.build(TAGS)))


@pytest.mark.parametrize("text", [b'"\\udc80"', b'"\\uDFFF"', b'"\\ufffd"', '"\ufffd"'.encode()])
def test_json_that_go_and_python_read_differently_is_refused(text):
    """Review: a manifest path with an escaped lone surrogate named one member for Python and
    another (U+FFFD) for the Engine's Go decoder."""
    data = rewrite(
        savetar.build(TAGS), "manifest.json", lambda body: body.replace(b"[{", b'[{"Comment": ' + text + b", ", 1)
    )
    refused(data, ArchiveError)


def test_a_member_name_that_is_not_utf8_is_refused():
    info = tarfile.TarInfo("x")
    block = bytearray(info.tobuf(tarfile.USTAR_FORMAT))
    block[0:2] = b"x\x80"  # Go reads U+FFFD where Python would keep the byte
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block[:512])
    refused(append(savetar.build(TAGS), bytes(block[:512])), ArchiveError)


def test_zero_padding_after_the_end_marker_never_releases_the_marker_before_the_checks():
    """Second review of issue 18 (high): the checks run at the end, and only the last chunk
    was held back; a plaintext padded with 1 MiB of zeros released the whole tar, end marker
    included, before the refusal. The Docker Engine from 23 untars in-process, stops at the
    marker without draining the body, and would have loaded it (foreign tag and all)."""
    data = edit_json(savetar.build(TAGS), "manifest.json", add_repo_tag) + bytes(1 << 20)
    released = bytearray()
    stream = verified_stream((data[i : i + 65536] for i in range(0, len(data), 65536)), ImageTarVerifier(), TAGS)
    with pytest.raises(ForeignTagsError):
        for chunk in stream:
            released += chunk
    assert len(released) <= len(data.rstrip(b"\0")), "the end marker (zeros) went out before the checks"


def test_zeros_held_back_all_go_out_once_the_checks_pass():
    data = savetar.build(TAGS) + bytes(600 * 512)
    out = b"".join(verified_stream((data[i : i + 4096] for i in range(0, len(data), 4096)), ImageTarVerifier(), TAGS))
    assert out == data


def test_an_index_cross_wired_through_ref_name_is_refused():
    """Second review of issue 18 (medium): names given by a full org.opencontainers.image.ref.name
    (which ctr tags with) were not tied to their manifest: two refs' manifests swapped passed."""

    def swap(index):
        first, second = index["manifests"][0], index["manifests"][1]
        for entry in (first, second):
            name = entry["annotations"].pop("io.containerd.image.name")
            entry["annotations"]["org.opencontainers.image.ref.name"] = name
        first["digest"], second["digest"] = second["digest"], first["digest"]
        return index

    data = edit_json(savetar.build(TAGS, layout="oci"), "index.json", swap)
    assert isinstance(refused(data), ArchiveError)
