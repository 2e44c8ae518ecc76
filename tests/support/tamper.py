"""Hostile archives made WITH the right key: a ``docker save`` tar rewritten member by member,
then encrypted. They pass decryption and every content address the rewrite keeps, so what
they test is what the operator does with a key holder's (or a compromised publisher's) input.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

from .images import own_encrypt
from .savetar import member_bytes

Members = dict[str, bytes]


def rewrite(plaintext: Path, out: Path, fragment: bytes, edit: Callable[[Members], Members]) -> Path:
    """Read the tar's regular files (in order), let ``edit`` change them, write and encrypt."""
    plain = out.with_suffix(".tar")
    plain.write_bytes(rewrite_plain(plaintext.read_bytes(), edit))
    own_encrypt(plain, out, fragment)
    plain.unlink()
    return out


def rewrite_plain(data: bytes, edit: Callable[[Members], Members]) -> bytes:
    """The same, in memory and unencrypted: the tar's regular files, edited, as a new tar."""
    members: Members = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for info in tar:
            if info.isfile():
                members[info.name] = member_bytes(tar, info)
    members = edit(members)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, body in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(body), 0o644, 1_700_000_000
            tar.addfile(info, io.BytesIO(body))
    return out.getvalue()


def add_tags(extra: list[str]) -> Callable[[Members], Members]:
    """manifest.json's first image also carries ``extra`` tags (manifest.json has no digest)."""

    def edit(members: Members) -> Members:
        manifest = json.loads(members["manifest.json"])
        manifest[0]["RepoTags"] = list(manifest[0].get("RepoTags") or []) + extra
        return {**members, "manifest.json": json.dumps(manifest).encode()}

    return edit


def nested_manifest(depth: int = 100_000) -> Callable[[Members], Members]:
    def edit(members: Members) -> Members:
        return {**members, "manifest.json": b"[" * depth + b"]" * depth}

    return edit


def layer_not_a_tar(members: Members) -> Members:
    """The first image's first layer becomes bytes that are no tar, with every digest that
    names it updated: the stream checks pass, the Engine's unpacking cannot."""
    manifest = json.loads(members["manifest.json"])
    entry = manifest[0]
    layer = entry["Layers"][0]
    garbage = hashlib.sha512(b"not a tar").digest() * 64
    config = json.loads(members[entry["Config"]])
    config["rootfs"]["diff_ids"][0] = "sha256:" + hashlib.sha256(garbage).hexdigest()
    config_bytes = json.dumps(config).encode()
    config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
    out = {k: v for k, v in members.items() if k != entry["Config"]}
    out[layer] = garbage
    out[config_name] = config_bytes
    entry["Config"] = config_name
    out["manifest.json"] = json.dumps(manifest).encode()
    return out
