#!/usr/bin/env python3
"""Turn a root filesystem tarball into a one-layer image archive for `docker load`, with an
image config that records the root filesystem's architecture.

    scripts/rootfs-image.py ROOTFS.tar.gz --arch arm64 --tag imageunlock-base:bookworm-arm64 | docker load

Why not `docker import`: dockerd 20.10's `docker import --platform linux/arm64` leaves the
image config's architecture at the daemon's own (amd64), and the classic builder copies the
base image's architecture into every image built FROM it, so an arm64 image would be labelled
amd64 (and a registry would serve it to the wrong nodes). `docker load` takes the config as it
is written here: {"architecture": "arm64", "variant": "v8", "os": "linux", ...}.

The archive is the `docker save` layout: manifest.json, the config (named by its SHA-256) and
the layer (the uncompressed root filesystem tar, whose SHA-256 is the config's diff_id).
The timestamps are the input file's modification time, so the same tarball always gives the
same image ID. Standard library only; the layer is unpacked once to a temporary file.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import hashlib
import io
import json
import os
import sys
import tarfile
import tempfile
from pathlib import Path

# Debian architecture name -> (OCI architecture, variant); the names `docker manifest` and
# registries use. Only what the operator image is built for.
ARCHES = {"amd64": ("amd64", None), "arm64": ("arm64", "v8")}
PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def build(rootfs: Path, arch: str, tag: str, out: io.BufferedIOBase, tmpdir: str | None = None) -> str:
    """Write the archive to ``out``; returns the image ID (sha256:<config digest>)."""
    oci_arch, variant = ARCHES[arch]
    created = datetime.datetime.fromtimestamp(int(rootfs.stat().st_mtime), datetime.UTC)
    stamp = created.strftime("%Y-%m-%dT%H:%M:%SZ")
    with tempfile.NamedTemporaryFile(dir=tmpdir, prefix="rootfs-image-", suffix=".tar") as layer:
        digest = hashlib.sha256()
        opener = gzip.open if rootfs.name.endswith((".gz", ".tgz")) else open
        with opener(rootfs, "rb") as src:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                layer.write(chunk)
        layer.flush()
        diff_id = f"sha256:{digest.hexdigest()}"
        config: dict[str, object] = {
            "architecture": oci_arch,
            "os": "linux",
            "created": stamp,
            "config": {"Env": [PATH], "Cmd": ["/bin/bash"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            "history": [{"created": stamp, "created_by": f"scripts/rootfs-image.py {rootfs.name} --arch {arch}"}],
        }
        if variant:
            config["variant"] = variant
        config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
        config_id = hashlib.sha256(config_bytes).hexdigest()
        layer_dir = digest.hexdigest()
        manifest = json.dumps(
            [{"Config": f"{config_id}.json", "RepoTags": [tag], "Layers": [f"{layer_dir}/layer.tar"]}]
        ).encode()
        mtime = int(rootfs.stat().st_mtime)
        with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:

            def add_bytes(name: str, data: bytes) -> None:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), mtime, 0o644
                tar.addfile(info, io.BytesIO(data))

            directory = tarfile.TarInfo(layer_dir)
            directory.type, directory.mtime, directory.mode = tarfile.DIRTYPE, mtime, 0o755
            tar.addfile(directory)
            info = tarfile.TarInfo(f"{layer_dir}/layer.tar")
            info.size, info.mtime, info.mode = os.fstat(layer.fileno()).st_size, mtime, 0o644
            with open(layer.name, "rb") as data:
                tar.addfile(info, data)
            add_bytes(f"{config_id}.json", config_bytes)
            add_bytes("manifest.json", manifest)
    return f"sha256:{config_id}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rootfs", type=Path, help="root filesystem tarball (.tar or .tar.gz)")
    parser.add_argument("--arch", required=True, choices=sorted(ARCHES), help="its Debian architecture")
    parser.add_argument("--tag", required=True, help="NAME:TAG the loaded image gets")
    parser.add_argument("-o", "--output", default="-", help="archive path (default: standard output)")
    args = parser.parse_args(argv)
    if args.output == "-":
        if sys.stdout.isatty():
            parser.error("refusing to write an archive to a terminal: pipe it to `docker load` or use -o")
        image_id = build(args.rootfs, args.arch, args.tag, sys.stdout.buffer)
        sys.stdout.flush()
    else:
        partial = Path(f"{args.output}.partial")
        with open(partial, "wb") as out:
            image_id = build(args.rootfs, args.arch, args.tag, out, tmpdir=str(partial.parent))
        os.replace(partial, args.output)
    print(f"rootfs-image: {args.tag} ({args.arch}) {image_id}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # `docker load` went away: its own error says why
        sys.exit(1)
