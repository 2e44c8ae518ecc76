"""Build image archives shaped like ``docker save`` output, in memory, without an Engine.

Two layouts: the legacy one (``<id>/layer.tar``, ``<id>/json``, ``<id>/VERSION``,
``<config>.json``, ``manifest.json``, ``repositories``; a shared layer as a symlink, as the
Engine writes it) and the OCI one (``blobs/sha256/<hex>``, ``index.json``, ``oci-layout``,
plus ``manifest.json``). Content is deterministic for a given seed.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
from typing import Any


def member_bytes(tar: tarfile.TarFile, member: str | tarfile.TarInfo) -> bytes:
    """The bytes of a regular file in ``tar`` (tarfile's ``extractfile`` answers None for
    any other kind of member)."""
    file = tar.extractfile(member)
    if file is None:
        raise ValueError(f"{member} is not a regular file in the archive")
    return file.read()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 1_700_000_000
    tar.addfile(info, io.BytesIO(data))


def _layer(rng: random.Random, size: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, "opt/data.bin", rng.randbytes(size))
    return buf.getvalue()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build(
    tags: list[str],
    *,
    layout: str = "legacy",
    layers_per_image: int = 2,
    layer_bytes: int = 3000,
    seed: int = 7,
    share_first_layer: bool = False,
    long_names: bool = False,
) -> bytes:
    rng = random.Random(seed)
    shared = _layer(rng, layer_bytes)
    buf = io.BytesIO()
    manifest: list[dict[str, Any]] = []
    repositories: dict[str, dict[str, str]] = {}
    index: list[dict[str, Any]] = []
    written: dict[str, str] = {}  # layer digest -> path already in the archive
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for n, tag in enumerate(tags):
            layers = [
                shared if (share_first_layer and i == 0) else _layer(rng, layer_bytes) for i in range(layers_per_image)
            ]
            diff_ids = [f"sha256:{_sha(layer)}" for layer in layers]
            config = json.dumps(
                {
                    "architecture": "amd64",
                    "os": "linux",
                    "created": "2026-01-01T00:00:00Z",
                    "rootfs": {"type": "layers", "diff_ids": diff_ids},
                    "config": {"Labels": {"n": str(n)}},
                }
            ).encode()
            paths = []
            for i, layer in enumerate(layers):
                digest = _sha(layer)
                if layout == "oci":
                    path = f"blobs/sha256/{digest}"
                    if digest not in written:
                        _add(tar, path, layer)
                        written[digest] = path
                    paths.append(path)
                    continue
                layer_id = _sha(f"{tag}/{i}".encode())  # the Engine's v1 layer ID, one per image layer
                dirname = ("d" * 80 + "/" + layer_id) if long_names else layer_id
                path = f"{dirname}/layer.tar"
                if digest in written:
                    link = tarfile.TarInfo(path)
                    link.type = tarfile.SYMTYPE
                    link.linkname = "../" * (dirname.count("/") + 1) + written[digest]
                    _add(tar, f"{dirname}/VERSION", b"1.0")
                    tar.addfile(link)
                else:
                    _add(tar, f"{dirname}/VERSION", b"1.0")
                    _add(tar, f"{dirname}/json", json.dumps({"id": layer_id}).encode())
                    _add(tar, path, layer)
                    written[digest] = path
                paths.append(path)
            if layout == "oci":
                config_path = f"blobs/sha256/{_sha(config)}"
                _add(tar, config_path, config)
                oci_manifest = json.dumps({"schemaVersion": 2, "config": {"digest": f"sha256:{_sha(config)}"}}).encode()
                _add(tar, f"blobs/sha256/{_sha(oci_manifest)}", oci_manifest)
                index.append(
                    {"digest": f"sha256:{_sha(oci_manifest)}", "annotations": {"io.containerd.image.name": tag}}
                )
            else:
                config_path = f"{_sha(config)}.json"
                _add(tar, config_path, config)
            manifest.append({"Config": config_path, "RepoTags": [tag], "Layers": paths})
            name, version = tag.rsplit(":", 1)
            repositories.setdefault(name, {})[version] = _sha(config)
        if layout == "oci":
            _add(tar, "oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
            _add(tar, "index.json", json.dumps({"schemaVersion": 2, "manifests": index}).encode())
        _add(tar, "manifest.json", json.dumps(manifest).encode())
        _add(tar, "repositories", json.dumps(repositories).encode())
    return buf.getvalue()


def config_ids(archive: bytes) -> dict[str, str]:
    """``{tag: sha256:<config digest>}`` read back with tarfile (an independent reader)."""
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        manifest: list[dict[str, Any]] = json.loads(member_bytes(tar, "manifest.json"))
        return {tag: "sha256:" + _sha(member_bytes(tar, e["Config"])) for e in manifest for tag in e["RepoTags"]}
