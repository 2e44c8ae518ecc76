"""The build: etcd, kubectl and the API server (../main/*.go) from Debian sid's packages.

Packages (../packages.txt) are fetched with a private apt configuration and unpacked with
``dpkg-deb -x`` into the cache (common.cache_root()); the API server is built there with
Debian's Go in GOPATH mode. A finished build is keyed by the Go sources and the package
versions, so an unchanged tree reuses it without touching apt.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from .common import GO_SOURCES, PACKAGES_FILE, ControlPlaneError, cache_root, file_lock, log, run

# Bump when the way binaries are built changes, to invalidate cached builds.
BUILD_RECIPE = "1"
K8S_VERSION = "v1.36.4"  # stamped into the binary; kubectl refuses unparsable versions
GO_LDFLAGS = (
    f"-s -w -X k8s.io/component-base/version.gitVersion={K8S_VERSION}"
    " -X k8s.io/component-base/version.gitCommit=debian-sid"
    " -X k8s.io/component-base/version.gitTreeState=clean"
)
APISERVER = "controlplane-apiserver"
DEFAULT_MIRROR = "http://deb.debian.org/debian"


def _packages() -> list[str]:
    names = []
    for line in PACKAGES_FILE.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line)
    return names


def _debian_mirror() -> str:
    """The Debian archive the machine itself uses (sid lives on the same host)."""
    if os.environ.get("CONTROLPLANE_DEBIAN_MIRROR"):
        return os.environ["CONTROLPLANE_DEBIAN_MIRROR"].rstrip("/")
    candidates = []
    for f in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        candidates += re.findall(r"^URIs:\s*(\S+)", f.read_text(errors="replace"), re.M)
    for f in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.list"))]:
        if f.exists():
            candidates += re.findall(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)", f.read_text(errors="replace"), re.M)
    for uri in candidates:
        uri = uri.rstrip("/")
        if uri.endswith("/debian") and "security" not in uri:
            return uri
    return DEFAULT_MIRROR


class _Apt:
    """apt-get/apt-cache with a private configuration: sid lists in our cache, no effect
    on the system's apt state."""

    def __init__(self, root: Path):
        self.root = root / "apt"
        self.lists = self.root / "lists"
        self.sources = self.root / "sources.list"

    def opts(self) -> list[str]:
        o = {
            "Dir::Etc::sourcelist": self.sources,
            "Dir::Etc::sourceparts": "-",
            "Dir::Etc::preferences": "/dev/null",
            "Dir::Etc::preferencesparts": "-",
            "Dir::State::Lists": self.lists,
            "Dir::State::status": "/dev/null",
            "Dir::Cache": self.root / "cache",
            "Dir::Cache::archives": self.root / "cache" / "archives",
            "APT::Architectures": "amd64" if os.uname().machine == "x86_64" else "",
            "Acquire::Languages": "none",
            "Debug::NoLocking": "1",
        }
        if os.geteuid() == 0:
            o["APT::Sandbox::User"] = "root"  # our cache dirs are not readable by _apt
        return [x for k, v in o.items() if v != "" for x in ("-o", f"{k}={v}")]

    def has_lists(self) -> bool:
        return any(self.lists.glob("*_Packages*"))

    def update(self) -> None:
        for d in (self.lists / "partial", self.root / "cache" / "archives" / "partial"):
            d.mkdir(parents=True, exist_ok=True)
        self.sources.write_text(
            f"deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {_debian_mirror()} sid main\n"
        )
        log("apt-get update (private sid lists)")
        res = run(["apt-get", *self.opts(), "update"], timeout=600)
        if not self.has_lists() or re.search(r"^(W|E): Failed to fetch", res.stdout, re.M):
            # apt-get update exits 0 when the archive is unreachable; say so here.
            raise ControlPlaneError(f"apt-get update of Debian sid failed:\n{res.stdout[-2000:]}")

    def versions(self, pkgs: list[str]) -> dict[str, str]:
        res = subprocess.run(
            ["apt-cache", *self.opts(), "show", "--no-all-versions", *pkgs], text=True, capture_output=True, timeout=120
        )
        found, name = {}, None
        for line in res.stdout.splitlines():
            if line.startswith("Package: "):
                name = line.split(None, 1)[1]
            elif line.startswith("Version: ") and name:
                found[name] = line.split(None, 1)[1]
        return found

    def download(self, pkgs: list[str], dest: Path) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        log(f"downloading {len(pkgs)} packages")
        run(["apt-get", *self.opts(), "download", *pkgs], cwd=dest, timeout=1200)


def _deb_filename(pkg: str, version: str, debs: Path) -> Path | None:
    for v in (version.replace(":", "%3a"), version.split(":", 1)[-1]):  # apt quotes epochs
        hits = list(debs.glob(f"{pkg}_{v}_*.deb"))
        if hits:
            return hits[0]
    return None


def _go_sources_hash() -> str:
    if not PACKAGES_FILE.is_file():
        raise ControlPlaneError(
            f"{PACKAGES_FILE} not found: the control plane builds from its source tree, so the "
            "package must be installed editable (pip install -e tools/controlplane)"
        )
    h = hashlib.sha256()
    h.update(f"{BUILD_RECIPE}\n{GO_LDFLAGS}\n".encode())
    h.update(PACKAGES_FILE.read_bytes())
    for f in sorted(GO_SOURCES.glob("*.go")):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _complete_bin_dirs(root: Path, go_hash: str) -> list[Path]:
    dirs = [d for d in root.glob(f"bin-{go_hash}-*") if (d / ".complete").exists()]
    return sorted(dirs, key=lambda d: (d / ".complete").stat().st_mtime, reverse=True)


def build(refresh: bool = False) -> Path:
    """Ensure etcd, the API server and kubectl exist in the cache; return their directory.

    The cache key is a hash of the Go sources + package list, and a hash of the resolved
    package versions. A finished build for the current Go sources is reused without
    touching apt (instant); ``refresh=True`` re-reads sid and rebuilds if versions moved.
    """
    root = cache_root()
    go_hash = _go_sources_hash()
    if not refresh and (done := _complete_bin_dirs(root, go_hash)):
        return done[0]
    with file_lock(root / "build.lock"):
        if not refresh and (done := _complete_bin_dirs(root, go_hash)):
            return done[0]
        t0 = time.monotonic()
        apt = _Apt(root)
        pkgs = _packages()
        if refresh or not apt.has_lists():
            apt.update()
        versions = apt.versions(pkgs)
        if set(versions) != set(pkgs):
            apt.update()  # lists may predate a package rename; one retry with fresh lists
            versions = apt.versions(pkgs)
        missing = sorted(set(pkgs) - set(versions))
        if missing:
            raise ControlPlaneError(
                f"{len(missing)} packages not found in Debian sid: "
                f"{' '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"
            )
        ver_text = "".join(f"{p}={versions[p]}\n" for p in sorted(pkgs))
        ver_hash = hashlib.sha256(ver_text.encode()).hexdigest()[:16]

        sysroot = _ensure_sysroot(root, apt, pkgs, versions, ver_hash)
        bin_dir = root / f"bin-{go_hash}-{ver_hash}"
        if not (bin_dir / ".complete").exists():
            _go_build(root, sysroot, bin_dir, ver_text)
        else:
            (bin_dir / ".complete").touch()
        _prune(root, keep_bins=3, sysroot=sysroot)
        log(f"binaries ready in {bin_dir} ({time.monotonic() - t0:.1f}s)")
        return bin_dir


def _prune(root: Path, keep_bins: int, sysroot: Path) -> None:
    """Drop all but the newest builds and unpacked package sets (caller holds the lock).
    Running planes are unaffected: Linux keeps deleted executables alive."""
    bins = sorted(
        (d for d in root.glob("bin-*") if (d / ".complete").exists()),
        key=lambda d: (d / ".complete").stat().st_mtime,
        reverse=True,
    )
    for d in bins[keep_bins:]:
        shutil.rmtree(d, ignore_errors=True)
    for d in root.glob("sysroot-*"):
        if d != sysroot:
            shutil.rmtree(d, ignore_errors=True)


def _ensure_sysroot(root: Path, apt: _Apt, pkgs, versions, ver_hash) -> Path:
    """Unpack the packages (dpkg -x) into root/sysroot-<ver_hash>."""
    sysroot = root / f"sysroot-{ver_hash}"
    if (sysroot / ".complete").exists():
        return sysroot
    debs = root / "debs"
    for attempt in (1, 2):
        need = [p for p in pkgs if not _deb_filename(p, versions[p], debs)]
        if not need:
            break
        try:
            apt.download([f"{p}={versions[p]}" for p in need], debs)
        except ControlPlaneError:
            if attempt == 2:
                raise
            apt.update()  # sid moved on since our lists were fetched
            versions.update(apt.versions(pkgs))
    tmp = Path(tempfile.mkdtemp(prefix="tmp-sysroot-", dir=root))
    try:
        log(f"unpacking {len(pkgs)} packages")
        for p in pkgs:
            deb = _deb_filename(p, versions[p], debs)
            if deb is None:
                raise ControlPlaneError(f"download of {p}={versions[p]} did not produce a .deb")
            run(["dpkg-deb", "-x", str(deb), str(tmp)], timeout=300)
        (tmp / ".complete").write_text("".join(f"{p}={versions[p]}\n" for p in sorted(pkgs)))
        if sysroot.exists():
            shutil.rmtree(sysroot)
        tmp.rename(sysroot)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    keep = {_deb_filename(p, versions[p], debs) for p in pkgs}
    for old in debs.glob("*.deb"):  # drop superseded versions
        if old not in keep:
            old.unlink()
    return sysroot


def _go_build(root: Path, sysroot: Path, bin_dir: Path, ver_text: str) -> None:
    goroot = next((sysroot / "usr" / "lib").glob("go-1.*"))
    env = {
        "PATH": f"{goroot / 'bin'}:/usr/bin:/bin",
        "HOME": str(root),
        "GOROOT": str(goroot),
        "GOPATH": str(sysroot / "usr" / "share" / "gocode"),
        "GO111MODULE": "off",
        "CGO_ENABLED": "0",
        "GOTOOLCHAIN": "local",
        "GOPROXY": "off",
        "GOFLAGS": "",
        "GOCACHE": str(root / "gocache"),
        "GOTMPDIR": "",
    }
    tmp = Path(tempfile.mkdtemp(prefix="tmp-bin-", dir=root))
    try:
        log("go build (cold: ~3 min on 2 cores; warm: seconds)")
        t0 = time.monotonic()
        run(
            [str(goroot / "bin" / "go"), "build", "-trimpath", "-o", str(tmp / APISERVER), "-ldflags", GO_LDFLAGS, "."],
            cwd=GO_SOURCES,
            env=env,
            timeout=3600,
        )
        log(f"go build took {time.monotonic() - t0:.1f}s")
        for name in ("etcd", "kubectl"):
            src = sysroot / "usr" / "bin" / name
            try:
                os.link(src, tmp / name)
            except OSError:
                shutil.copy2(src, tmp / name)
        (tmp / ".complete").write_text(ver_text)
        if bin_dir.exists():
            shutil.rmtree(bin_dir)
        tmp.rename(bin_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def kubectl_path() -> str:
    """A working kubectl: $KUBECTL, else `kubectl` on PATH, else Debian sid's `kubectl`
    package from the cache (the one in the bin dir, or just that package, unpacked)."""
    for cand in (os.environ.get("KUBECTL"), shutil.which("kubectl")):
        if cand:
            try:
                ok = subprocess.run([cand, "version", "--client"], capture_output=True, timeout=30).returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                ok = False
            if ok:
                return cand
    root = cache_root()
    if done := _complete_bin_dirs(root, _go_sources_hash()):
        return str(done[0] / "kubectl")
    return str(_debian_kubectl(root))


def _debian_kubectl(root: Path) -> Path:
    """Only the kubectl package (no Go build): root/kubectl-<version>/kubectl."""
    with file_lock(root / "build.lock"):
        if have := sorted(root.glob("kubectl-*/kubectl")):
            return have[-1]
        apt = _Apt(root)
        if not apt.has_lists():
            apt.update()
        version = apt.versions(["kubectl"]).get("kubectl")
        if version is None:
            apt.update()
            version = apt.versions(["kubectl"]).get("kubectl")
        if version is None:
            raise ControlPlaneError("Debian sid has no kubectl package")
        tmp = Path(tempfile.mkdtemp(prefix="tmp-kubectl-", dir=root))
        try:
            apt.download([f"kubectl={version}"], tmp)
            run(["dpkg-deb", "-x", str(next(tmp.glob("kubectl_*.deb"))), str(tmp / "x")], timeout=300)
            dest = root / f"kubectl-{version}"
            dest.mkdir(exist_ok=True)
            os.replace(tmp / "x" / "usr" / "bin" / "kubectl", dest / "kubectl")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dest / "kubectl"
