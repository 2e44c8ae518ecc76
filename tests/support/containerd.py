"""A private containerd for tests, and a CRI client to ask it what kubelet would see.

Two builds of containerd:

* Debian sid's (2.x), whose CRI honours the ``io.cri-containerd.pinned`` label (from 1.7.3):
  the ``.deb`` is fetched with the control plane's private sid apt configuration, unpacked
  with ``dpkg-deb -x`` (never installed) into ``~/.cache/imageunlock/containerd/``, and
  reused from there without touching apt. sid's ``golang-k8s-cri-api-dev`` is unpacked with
  it, for the CRI's ``api.proto``;
* Debian bookworm's (1.6, ``/usr/bin/containerd``, installed by scripts/setup.sh), whose CRI
  ignores that label.

:class:`Containerd` runs one with its own config file (``version = 3`` for 2.x, ``2`` for
1.x): root, state, sockets, CNI and ``opt`` directories all in a temporary directory, NRI
off; started and stopped by PID; its overlay mounts are unmounted deepest first before the
directory goes. :func:`cri_stubs` generates the CRI's Python gRPC stubs from that
``api.proto`` with grpcio-tools once, into a cache directory (no generated code in the tree).
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from .processes import await_answer, log_tail, stop_group, unmount_below

CRI_PROTO = Path("usr/share/gocode/src/k8s.io/cri-api/pkg/apis/runtime/v1/api.proto")
SID_PACKAGES = ("containerd", "golang-k8s-cri-api-dev")
NAMESPACE = "k8s.io"


class ContainerdError(RuntimeError):
    pass


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "imageunlock" / "containerd"


@dataclass(frozen=True)
class Build:
    """One containerd build: its ``containerd`` and ``ctr``, and the CRI proto if it came with one."""

    name: str
    bin_dir: Path
    version: tuple[int, int, int]
    cri_proto: Path | None = None

    @property
    def ctr(self) -> str:
        return str(self.bin_dir / "ctr")


def _version_of(binary: Path) -> tuple[int, int, int]:
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30).stdout
    found = re.search(r" v?(\d+)\.(\d+)\.(\d+)", out)
    if not found:
        raise ContainerdError(f"cannot tell the version of {binary}: {out!r}")
    return int(found[1]), int(found[2]), int(found[3])


def bookworm_build() -> Build:
    binary, ctr = shutil.which("containerd"), shutil.which("ctr")
    if binary is None or ctr is None:
        raise ContainerdError("containerd/ctr not installed (scripts/setup.sh installs Debian's containerd)")
    if Path(binary).parent != Path(ctr).parent:
        raise ContainerdError(f"containerd ({binary}) and ctr ({ctr}) are not from one package")
    return Build("bookworm", Path(binary).parent, _version_of(Path(binary)))


def sid_build() -> Build:
    """sid's containerd, unpacked in the cache (fetched on first use; later runs need no network)."""
    root = cache_root()
    if done := _complete_sid_dirs(root):
        return _sid_build_from(done[0])
    try:
        import controlplane
        from controlplane.builder import _Apt  # the control plane's private sid apt setup
        from controlplane.common import file_lock
    except ImportError as exc:
        raise ContainerdError(f"tools/controlplane is not installed in .venv ({exc}): run scripts/setup.sh") from None
    plane_cache = controlplane.cache_root()
    # The sid package lists are the control plane's: take its lock while apt runs.
    with file_lock(plane_cache / "build.lock"), file_lock(root / "fetch.lock"):
        if done := _complete_sid_dirs(root):
            return _sid_build_from(done[0])
        apt = _Apt(plane_cache)
        try:
            if not apt.has_lists():
                apt.update()
            versions = apt.versions(list(SID_PACKAGES))
            if set(versions) != set(SID_PACKAGES):
                apt.update()
                versions = apt.versions(list(SID_PACKAGES))
            if set(versions) != set(SID_PACKAGES):
                raise ContainerdError(f"Debian sid lacks {sorted(set(SID_PACKAGES) - set(versions))}")
            tmp = Path(tempfile.mkdtemp(prefix="tmp-sid-", dir=root))
            try:
                try:
                    apt.download([f"{p}={versions[p]}" for p in SID_PACKAGES], tmp / "debs")
                except controlplane.ControlPlaneError:
                    apt.update()  # sid moved on since the lists were fetched
                    versions = apt.versions(list(SID_PACKAGES))
                    apt.download([f"{p}={versions[p]}" for p in SID_PACKAGES], tmp / "debs")
                for deb in sorted((tmp / "debs").glob("*.deb")):
                    subprocess.run(
                        ["dpkg-deb", "-x", str(deb), str(tmp / "x")], check=True, timeout=300, capture_output=True
                    )
                shutil.rmtree(tmp / "debs")
                label = "sid-" + "-".join(versions[p].replace(":", "_").replace("+", "_") for p in SID_PACKAGES)
                (tmp / "x" / ".complete").write_text("".join(f"{p}={versions[p]}\n" for p in SID_PACKAGES))
                target = root / label
                if target.exists():
                    shutil.rmtree(target)
                (tmp / "x").rename(target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        except controlplane.ControlPlaneError as exc:
            raise ContainerdError(f"fetching Debian sid's containerd failed: {exc}") from None
        return _sid_build_from(target)


def _complete_sid_dirs(root: Path) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    dirs = [d for d in root.glob("sid-*") if (d / ".complete").exists()]
    return sorted(dirs, key=lambda d: (d / ".complete").stat().st_mtime, reverse=True)


def _sid_build_from(directory: Path) -> Build:
    bin_dir = directory / "usr" / "bin"
    proto = directory / CRI_PROTO
    return Build("sid", bin_dir, _version_of(bin_dir / "containerd"), proto if proto.exists() else None)


class Containerd:
    def __init__(self, workdir: Path, build: Build) -> None:
        self.workdir = Path(workdir)
        self.build = build
        # unix socket paths are limited to 108 bytes: keep the sockets in a short dir.
        self.sock_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"iu-ctrd-{os.getpid()}-{id(self) & 0xFFFF:x}"
        self.socket = self.sock_dir / "containerd.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / "containerd.log"

    @property
    def content_dir(self) -> Path:
        """The content store: ``blobs/sha256/<digest>`` (committed) and ``ingest/`` (being written)."""
        return self.workdir / "root" / "io.containerd.content.v1.content"

    @property
    def ingest_dir(self) -> Path:
        return self.content_dir / "ingest"

    def config(self) -> str:
        root, state = self.workdir / "root", self.workdir / "state"
        cni = self.workdir / "cni"
        common = (
            f"root = '{root}'\nstate = '{state}'\n"
            f"[grpc]\n  address = '{self.socket}'\n"
            f"[ttrpc]\n  address = '{self.socket}.ttrpc'\n"
        )
        if self.build.version >= (2, 0, 0):
            return (
                "version = 3\ndisabled_plugins = ['io.containerd.nri.v1.nri']\n"
                + common
                + f"[plugins.'io.containerd.internal.v1.opt']\n  path = '{self.workdir / 'opt'}'\n"
                + f"[plugins.'io.containerd.cri.v1.runtime'.cni]\n  bin_dirs = ['{cni}/bin']\n"
                + f"  conf_dir = '{cni}/net.d'\n"
            )
        return (
            "version = 2\n"
            + common
            + f"[plugins.'io.containerd.internal.v1.opt']\n  path = '{self.workdir / 'opt'}'\n"
            + f"[plugins.'io.containerd.grpc.v1.cri'.cni]\n  bin_dir = '{cni}/bin'\n  conf_dir = '{cni}/net.d'\n"
        )

    def start(self, timeout: float = 60.0) -> Containerd:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.sock_dir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "config.toml"
        config.write_text(self.config())
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(self.build.bin_dir / "containerd"), "--config", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            await_answer(
                self.proc,
                lambda: self.socket.exists() and self.ctr("version", check=False).returncode == 0,
                timeout,
                "containerd",
                self.log_path,
                ContainerdError,
            )
        except ContainerdError:
            self.stop()
            raise
        return self

    def tail(self, lines: int = 30) -> str:
        return log_tail(self.log_path, lines)

    def ctr(
        self, *args: str, check: bool = True, namespace: str = NAMESPACE, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [self.build.ctr, "-a", str(self.socket), "-n", namespace, *args],
            capture_output=True,
            text=True,
            timeout=120,
            **kw,
        )
        if check and result.returncode:
            raise ContainerdError(f"ctr {' '.join(args)} failed: {result.stderr}")
        return result

    def env(self) -> dict[str, str]:
        """Environment for a process that should find this build's ``ctr`` first."""
        return {"PATH": f"{self.build.bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}"}

    def images(self) -> dict[str, dict[str, str]]:
        """``{name: {"digest": target digest, "labels": "k=v,..."}}`` in the k8s.io namespace,
        without the CRI's own ``sha256:<id>`` records."""
        found = {}
        for line in self.ctr("images", "ls").stdout.splitlines()[1:]:
            fields = line.split()
            if fields and not fields[0].startswith("sha256:"):
                found[fields[0]] = {"digest": fields[2], "labels": fields[-1] if "=" in fields[-1] else ""}
        return found

    def content(self) -> list[str]:
        return self.ctr("content", "ls", "-q").stdout.split()

    def leases(self) -> dict[str, str]:
        """``{lease ID: labels}``."""
        rows = self.ctr("leases", "ls").stdout.splitlines()[1:]
        return {row.split()[0]: (row.split()[-1] if "=" in row.split()[-1] else "") for row in rows if row.strip()}

    def reset(self) -> None:
        """No images, no leases and so (after a synchronous garbage collection) no content."""
        names = self.ctr("images", "ls", "-q").stdout.split()
        if names:
            self.ctr("images", "rm", "--sync", *names)
        for lease in self.leases():
            self.ctr("leases", "rm", "--sync", lease)

    def stop(self, timeout: float = 20.0) -> None:
        proc, self.proc = self.proc, None
        stop_group(proc, timeout=timeout)
        for directory in (self.workdir, self.sock_dir):
            unmount_below(directory)
        shutil.rmtree(self.workdir / "root", ignore_errors=True)
        shutil.rmtree(self.workdir / "state", ignore_errors=True)
        shutil.rmtree(self.sock_dir, ignore_errors=True)


# -- the CRI, as kubelet asks it -------------------------------------------------------------


def cri_stubs(proto: Path) -> tuple[ModuleType, ModuleType]:
    """``(messages, services)`` generated from the CRI's ``api.proto``: once per proto and
    grpcio-tools version, into the cache, then imported from there."""
    import grpc_tools
    from grpc_tools import protoc  # noqa: F401 - fails early, with its own message, when absent

    version = getattr(grpc_tools, "__version__", "") or _dist_version("grpcio-tools")
    key = hashlib.sha256(proto.read_bytes() + version.encode()).hexdigest()[:16]
    out = cache_root() / f"cri-stubs-{key}"
    if not (out / ".complete").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="tmp-stubs-", dir=out.parent))
        try:
            shutil.copyfile(proto, tmp / "cri_api.proto")  # a module name of our own: cri_api_pb2
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "grpc_tools.protoc",
                    f"-I{tmp}",
                    f"--python_out={tmp}",
                    f"--grpc_python_out={tmp}",
                    str(tmp / "cri_api.proto"),
                ],
                capture_output=True,
                text=True,
                timeout=120,
            )
            if done.returncode:
                raise ContainerdError(f"protoc failed on {proto}: {done.stderr}")
            (tmp / ".complete").write_text(version + "\n")
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if str(out) not in sys.path:
        sys.path.insert(0, str(out))
    return importlib.import_module("cri_api_pb2"), importlib.import_module("cri_api_pb2_grpc")


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


@dataclass(frozen=True)
class CriImage:
    id: str
    repo_tags: tuple[str, ...]
    pinned: bool


class Cri:
    """The CRI on containerd's socket: the ImageService kubelet reads (namespace k8s.io)."""

    def __init__(self, socket: Path, proto: Path) -> None:
        import grpc

        self.pb, services = cri_stubs(proto)
        self.channel = grpc.insecure_channel(f"unix://{socket}")
        self.images = services.ImageServiceStub(self.channel)
        self.runtime = services.RuntimeServiceStub(self.channel)

    def version(self) -> Any:
        return self.runtime.Version(self.pb.VersionRequest(), timeout=10)

    def image_status(self, ref: str) -> CriImage | None:
        answer = self.images.ImageStatus(self.pb.ImageStatusRequest(image=self.pb.ImageSpec(image=ref)), timeout=10)
        if not answer.HasField("image"):
            return None
        return CriImage(answer.image.id, tuple(answer.image.repo_tags), answer.image.pinned)

    def list_images(self) -> list[CriImage]:
        answer = self.images.ListImages(self.pb.ListImagesRequest(), timeout=10)
        return [CriImage(i.id, tuple(i.repo_tags), i.pinned) for i in answer.images]

    def close(self) -> None:
        self.channel.close()
