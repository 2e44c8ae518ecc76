"""What the benchmark runs on: a private dockerd, 7 images, their ``docker save`` archive encrypted.

Real parts only: Debian's dockerd (``tests.support.dockerd``: vfs, own socket and roots), images
made by ``docker import`` from rootfs tars generated on the fly, the archive made by
``docker save`` and ``openssl enc -aes-256-cbc`` (an implementation independent of ours).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support.dockerd import Dockerd

MIB = 1 << 20
GEN_CHUNK = 1 * MIB  # random payload generation / streaming into `docker import`


def human(n: float) -> str:
    return f"{n / MIB:,.1f} MiB" if n < 1 << 30 else f"{n / (1 << 30):,.2f} GiB"


def mount_tmpfs(path: Path, mode: str, what: str) -> Path:
    """A tmpfs at ``path`` (so disk noise drops out of the figures); needs root."""
    path.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"mode={mode}", "iu-bench", str(path)],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    if mount.returncode != 0:
        raise RuntimeError(f"cannot mount a tmpfs for {what} (root needed): {mount.stderr.strip()}")
    return path


@dataclass(frozen=True)
class Archive:
    """``plaintext`` (the ``docker save`` tar), ``body`` (``openssl enc`` of it: the archive
    without its IV, what the floor's ``openssl enc -d`` reads) and ``archive`` (IV || body)."""

    plaintext: Path
    body: Path
    archive: Path
    key_hex: str
    iv_hex: str
    ids: dict[str, str]  # ref: image ID, as the Engine made them

    @property
    def size(self) -> int:
        return self.archive.stat().st_size


# ----------------------------------------------------------------------------------------
# the Engine, optionally with its data root on tmpfs
# ----------------------------------------------------------------------------------------


class Engine:
    """A private dockerd, its data root on disk or (``tmpfs=True``) on a tmpfs mounted for it,
    so the layers it writes cost memory, not disk I/O, and disk noise drops out of the figures."""

    def __init__(self, root: Path, *, tmpfs: bool, tmpdir_tmpfs: bool = False) -> None:
        # tmpdir_tmpfs: only the Engine's temp dir (DOCKER_TMPDIR, where it unpacks every
        # ``docker load`` body before importing it) on a tmpfs, the data root where ``tmpfs`` says.
        self.tmpdir_tmpfs = tmpdir_tmpfs
        env = {"DOCKER_TMPDIR": str(Path(root) / "engine-tmp")} if tmpdir_tmpfs else {}
        self.dockerd = Dockerd(root, env=env)
        self.tmpfs = tmpfs
        self._mounted: list[Path] = []

    @property
    def url(self) -> str:
        return self.dockerd.url

    @property
    def pid(self) -> int | None:
        return self.dockerd.proc.pid if self.dockerd.proc is not None else None

    @property
    def data_root(self) -> Path:
        return self.dockerd.data_root

    @property
    def temp_dir(self) -> Path:
        """Where the Engine unpacks the whole ``docker load`` body before importing it."""
        return self.dockerd.temp_dir

    def start(self) -> Engine:
        if self.tmpfs:  # dockerd's --data-root
            self._mounted.append(mount_tmpfs(self.dockerd.data_root, "0710", "dockerd's data root"))
        if self.tmpdir_tmpfs:  # DOCKER_TMPDIR
            self._mounted.append(mount_tmpfs(self.dockerd.temp_dir, "0700", "dockerd's DOCKER_TMPDIR"))
        self.dockerd.start()
        return self

    def describe(self) -> dict[str, str]:
        version = self.docker("version", "--format", "{{.Server.Version}}").stdout.strip()
        on_tmpfs = self.tmpfs or self.tmpdir_tmpfs
        temp = "DOCKER_TMPDIR" if self.tmpdir_tmpfs else "<data-root>/tmp"
        return {
            "engine": f"dockerd {version}",
            "storage": "vfs",
            "data root": "tmpfs" if self.tmpfs else "disk",
            "temp dir": f"{temp} on {'tmpfs' if on_tmpfs else 'disk'}",
        }

    def docker(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.dockerd.docker(*args, check=check, text=True)  # type: ignore[no-any-return]

    def stop(self) -> None:
        self.dockerd.stop()  # by PID (its process group), then its socket dir
        for mounted in reversed(self._mounted):
            subprocess.run(["umount", "-l", str(mounted)], capture_output=True, check=False, timeout=60)
        self._mounted = []

    def tail(self) -> str:
        return self.dockerd.tail()

    # -- what the measured runs start from and are checked against -----------------------

    def reset(self) -> None:
        """No image in the Engine: every measured load starts from the same state."""
        listed = self.docker("images", "-q", "--no-trunc").stdout.split()
        if listed:
            self.docker("rmi", "-f", *sorted(set(listed)), check=False)
        left = self.docker("images", "-q", "--no-trunc").stdout.split()
        if left:
            raise RuntimeError(f"could not remove images from the Engine: {left}")

    def image_ids(self, refs: list[str]) -> dict[str, str | None]:
        ids: dict[str, str | None] = {}
        for ref in refs:
            out = self.docker("image", "inspect", "--format", "{{.Id}}", ref, check=False)
            ids[ref] = out.stdout.strip() if out.returncode == 0 else None
        return ids


# ----------------------------------------------------------------------------------------
# images and the archive
# ----------------------------------------------------------------------------------------


def import_streamed(engine: Engine, ref: str, payload_bytes: int, logdir: Path) -> str:
    """``docker import -`` a rootfs tar generated on the fly: an identity file + ``payload_bytes``
    of os.urandom output, written straight into the CLI's stdin 1 MiB at a time."""

    def header(name: str, size: int) -> bytes:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = size, 0o644, int(time.time())
        return info.tobuf(tarfile.PAX_FORMAT)

    def pad(size: int) -> bytes:
        return bytes(-size % 512)

    out_path, err_path = logdir / "import.out", logdir / "import.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(
            ["docker", "-H", engine.url, "import", "-", ref], stdin=subprocess.PIPE, stdout=out, stderr=err
        )
        assert proc.stdin is not None
        try:
            identity = (ref + "\n").encode()
            proc.stdin.write(header("etc/image-name", len(identity)) + identity + pad(len(identity)))
            proc.stdin.write(header("opt/payload.bin", payload_bytes))
            left = payload_bytes
            while left > 0:  # bounded: left shrinks by >= 1 each turn
                n = min(GEN_CHUNK, left)
                proc.stdin.write(os.urandom(n))
                left -= n
            proc.stdin.write(pad(payload_bytes) + bytes(2 * 512))
            proc.stdin.close()
            proc.wait(600)
        except BaseException:
            proc.kill()
            proc.wait(30)
            raise
    if proc.returncode != 0:
        raise RuntimeError(f"docker import {ref} failed: {err_path.read_text(errors='replace').strip()}")
    return out_path.read_text().strip()


def build_archive(engine: Engine, workdir: Path, refs: list[str], payload_bytes: int, fragment: bytes) -> Archive:
    """Import one image per ref (``payload_bytes`` each), ``docker save`` them all, remove them
    from the Engine, and encrypt the tar with ``openssl enc`` under ``SHA-256(fragment)``."""
    from imageunlock.engine.crypto import IV_SIZE, derive_key

    ids = {}
    for ref in refs:
        ids[ref] = import_streamed(engine, ref, payload_bytes, workdir)
    plaintext = workdir / "plaintext.tar"
    engine.docker("save", "-o", str(plaintext), *refs)
    engine.reset()
    key_hex, iv = derive_key(fragment).hex(), os.urandom(IV_SIZE)
    body, archive = workdir / "body.enc", workdir / "archive.enc"
    subprocess.run(
        ["openssl", "enc", "-aes-256-cbc", "-K", key_hex, "-iv", iv.hex(), "-in", str(plaintext), "-out", str(body)],
        check=True, timeout=1800,
    )  # fmt: skip
    with open(archive, "wb") as dst, open(body, "rb") as src:
        dst.write(iv)
        shutil.copyfileobj(src, dst, GEN_CHUNK)
    return Archive(plaintext=plaintext, body=body, archive=archive, key_hex=key_hex, iv_hex=iv.hex(), ids=ids)


# ----------------------------------------------------------------------------------------
# containerd: the tests' private containerd (sid's 2.x build), behind the same interface
# ----------------------------------------------------------------------------------------


class ContainerdEngine:
    """A private containerd (``tests.support.containerd.Containerd``: its own config, root,
    state and socket; Debian sid's build from the cache), its root on disk or on a tmpfs.

    ``url`` is its socket path (what ``ctr -a`` and ``--containerd-address`` take); images are
    read and removed in the ``k8s.io`` namespace, the one kubelet uses."""

    NAMESPACE = "k8s.io"

    def __init__(self, root: Path, *, tmpfs: bool) -> None:
        from tests.support.containerd import Containerd, sid_build

        self.containerd = Containerd(root, sid_build())
        self.tmpfs = tmpfs
        self._mounted: Path | None = None

    @property
    def url(self) -> str:
        return str(self.containerd.socket)

    @property
    def ctr(self) -> str:
        return self.containerd.build.ctr

    @property
    def bin_dir(self) -> Path:
        return self.containerd.build.bin_dir

    @property
    def pid(self) -> int | None:
        return self.containerd.proc.pid if self.containerd.proc is not None else None

    @property
    def data_root(self) -> Path:
        return self.containerd.workdir / "root"

    @property
    def temp_dir(self) -> Path:
        """The content store's ingest dir: a blob being written, before it is committed."""
        return self.containerd.ingest_dir

    def start(self) -> ContainerdEngine:
        if self.tmpfs:
            # the config's root: content and snapshots
            self._mounted = mount_tmpfs(self.containerd.workdir / "root", "0711", "containerd's root")
        self.containerd.start()
        return self

    def describe(self) -> dict[str, str]:
        version = ".".join(map(str, self.containerd.build.version))
        return {
            "engine": f"containerd {version} ({self.containerd.build.name})",
            "snapshotter": "overlayfs",
            "data root": "tmpfs" if self.tmpfs else "disk",
            "temp dir": f"content ingest dir on {'tmpfs' if self.tmpfs else 'disk'}",
        }

    def stop(self) -> None:
        self.containerd.stop()  # by PID, its mounts below the work dir (the tmpfs too), then its dirs
        if self._mounted is not None:
            subprocess.run(["umount", "-l", str(self._mounted)], capture_output=True, check=False, timeout=60)
            self._mounted = None

    def tail(self) -> str:
        return self.containerd.tail()

    def reset(self) -> None:
        """No image records and no leases in ``k8s.io``, and (``images rm --sync``: a synchronous
        garbage collection) no content left: every import writes all its blobs for real."""
        self.containerd.reset()
        left = self.containerd.ctr("images", "ls", "-q").stdout.split()
        if left:
            raise RuntimeError(f"could not remove images from containerd: {left}")
        blobs = self.containerd.content()
        if blobs:
            raise RuntimeError(f"containerd kept {len(blobs)} blob(s) after the images went: {blobs[:3]}")

    def image_ids(self, refs: list[str]) -> dict[str, str | None]:
        """``{ref: config digest}`` (the image ID docker gave it), read from each image's
        manifest in the content store; ``None`` when the image is absent."""
        import json

        targets: dict[str, str] = {}
        for line in self.containerd.ctr("images", "ls").stdout.splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 3:
                targets[fields[0]] = fields[2]
        ids: dict[str, str | None] = {}
        for ref in refs:
            digest = targets.get(ref) or targets.get(_docker_io(ref))
            config = None
            if digest is not None:
                for _ in range(2):  # an index: its first manifest
                    doc = json.loads(self.containerd.ctr("content", "get", digest).stdout)
                    if "config" in doc:
                        config = doc["config"]["digest"]
                        break
                    digest = doc["manifests"][0]["digest"]
            ids[ref] = config
        return ids


def _docker_io(ref: str) -> str:
    """``name:tag`` as containerd records it: the Docker Hub domain (and ``library/``) made explicit."""
    first, _, rest = ref.partition("/")
    if not rest:
        return f"docker.io/library/{ref}"
    if "." in first or ":" in first or first == "localhost":
        return ref
    return f"docker.io/{ref}"
