"""Raw tar surgery on a built image archive: members made byte by byte, added before the
archive's end marker, or rewritten in place (the tar is changed, not the ciphertext: what a
key holder could do). ``savetar.build`` makes the well-formed archive these start from.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from typing import Any, Literal

from .savetar import member_bytes

TAGS = ["azaion/flights:2.0", "azaion/autopilot:2.0", "azaion/annotations:2.0"]
EVIL = "nginx:latest"  # the foreign ref a hostile archive tries to create or move


def manifest_of(data: bytes) -> list[dict[str, Any]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        manifest: list[dict[str, Any]] = json.loads(member_bytes(tar, "manifest.json"))
        return manifest


def rewrite(data: bytes, name: str, edit: Callable[[bytes | None], bytes | None]) -> bytes:
    """``data`` with member ``name``'s bytes replaced by ``edit(old bytes)``, or dropped when
    that is None (manifest.json, repositories and index.json carry no digest)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(data)) as src, tarfile.open(fileobj=out, mode="w") as tar:
        for member in src.getmembers():
            body = member_bytes(src, member) if member.isfile() else None
            if member.name == name and (body := edit(body)) is None:
                continue
            member.size = len(body or b"")
            tar.addfile(member, io.BytesIO(body) if body is not None else None)
    return out.getvalue()


def edit_json(data: bytes, name: str, edit: Callable[[Any], Any]) -> bytes:
    def apply(body: bytes | None) -> bytes:
        if body is None:
            raise ValueError(f"{name} is not a regular file in the archive")
        return json.dumps(edit(json.loads(body))).encode()

    return rewrite(data, name, apply)


def member(
    name: str,
    data: bytes = b"",
    kind: bytes = tarfile.REGTYPE,
    size: int | None = None,
    linkname: str = "",
    fmt: Literal[0, 1, 2] = tarfile.USTAR_FORMAT,  # tarfile's USTAR_FORMAT, GNU_FORMAT or PAX_FORMAT
) -> bytes:
    """One raw member: its header and its data padded to a whole block."""
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mtime = kind, linkname, 1_700_000_000
    info.size = len(data) if size is None else size
    return info.tobuf(fmt) + data + bytes(-len(data) % 512)


def pax(records: dict[str, str]) -> bytes:
    """A raw pax extended header carrying ``records`` (it applies to the member after it)."""
    # A private helper of tarfile, absent from its stubs: the one that writes pax headers.
    header: bytes = tarfile.TarInfo._create_pax_generic_header(records, tarfile.XHDTYPE, "utf-8")  # type: ignore[attr-defined]
    return header


def append(data: bytes, *members: bytes) -> bytes:
    """``data`` with raw ``members`` added before its end-of-archive marker."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.getmembers()
        end = tar.offset
    return data[:end] + b"".join(members) + bytes(1024)


def add_repo_tag(manifest: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A manifest.json edit: the first image also tags :data:`EVIL`."""
    return [{**manifest[0], "RepoTags": manifest[0]["RepoTags"] + [EVIL]}, *manifest[1:]]
