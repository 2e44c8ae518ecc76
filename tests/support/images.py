"""Test image archives: real images made by the Engine, encrypted two independent ways.

No registry is reachable here, so images come from ``docker import`` of generated rootfs
tars, and the archive from ``docker save``. Encryption is done by ``openssl enc`` (an
independent implementation) and by our own ``encrypt_stream``, so a shared mistake in
both directions of our code cannot pass unnoticed.
"""

from __future__ import annotations

import io
import random
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from imageunlock.engine.crypto import IV_SIZE, derive_key, encrypt_stream, read_chunks

from .dockerd import Dockerd

TEST_VERSION = "1.4.2"  # the version the session's test archives are built at


def rootfs_tar(path: Path, name: str, payload_bytes: int, seed: int) -> Path:
    """A tiny root file system: an identity file plus ``payload_bytes`` of pseudo-random data."""
    rng = random.Random(seed)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for member, data in (
            ("etc/image-name", name.encode() + b"\n"),
            ("opt/payload.bin", rng.randbytes(payload_bytes)),
        ):
            info = tarfile.TarInfo(member)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return path


def import_images(dockerd: Dockerd, workdir: Path, refs: list[str], payload_bytes: int) -> dict[str, str]:
    """``docker import`` one image per ref; returns ``{ref: image ID}``."""
    ids = {}
    for i, ref in enumerate(refs):
        rootfs = rootfs_tar(workdir / f"rootfs-{i}.tar", ref, payload_bytes, seed=i)
        out = dockerd.docker("import", str(rootfs), ref, text=True)
        ids[ref] = out.stdout.strip()
        rootfs.unlink()
    return ids


def save(dockerd: Dockerd, refs: list[str], out: Path) -> Path:
    dockerd.docker("save", "-o", str(out), *refs)
    return out


def openssl_encrypt(plain: Path, out: Path, fragment: bytes, iv: bytes) -> Path:
    """``IV || openssl enc -aes-256-cbc`` (PKCS7 padding is openssl's default)."""
    assert len(iv) == IV_SIZE
    with open(out, "wb") as dst:
        dst.write(iv)
        dst.flush()
        subprocess.run(
            ["openssl", "enc", "-aes-256-cbc", "-K", derive_key(fragment).hex(), "-iv", iv.hex(), "-in", str(plain)],
            stdout=dst,
            check=True,
            timeout=600,
        )
    return out


def own_encrypt(plain: Path, out: Path, fragment: bytes) -> Path:
    with open(plain, "rb") as src, open(out, "wb") as dst:
        for chunk in encrypt_stream(read_chunks(src), fragment):
            dst.write(chunk)
    return out


@dataclass(frozen=True)
class ArchiveSet:
    """A plaintext ``docker save`` tar of ``refs`` and its encrypted forms."""

    refs: list[str]
    ids: dict[str, str]
    plaintext: Path
    openssl_archive: Path
    own_archive: Path
    fragment: bytes
    version: str

    @property
    def names(self) -> list[str]:
        return [ref.rsplit(":", 1)[0] for ref in self.refs]


def build_archive_set(
    dockerd: Dockerd, workdir: Path, names: list[str], version: str, fragment: bytes, payload_bytes: int
) -> ArchiveSet:
    workdir.mkdir(parents=True, exist_ok=True)
    refs = [f"{name}:{version}" for name in names]
    ids = import_images(dockerd, workdir, refs, payload_bytes)
    plaintext = save(dockerd, refs, workdir / "images.tar")
    dockerd.docker("rmi", "-f", *refs)
    return ArchiveSet(
        refs=refs,
        ids=ids,
        plaintext=plaintext,
        openssl_archive=openssl_encrypt(plaintext, workdir / "images.openssl.enc", fragment, bytes(range(16))),
        own_archive=own_encrypt(plaintext, workdir / "images.enc", fragment),
        fragment=fragment,
        version=version,
    )
