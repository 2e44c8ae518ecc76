#!/usr/bin/env python3
"""A local, real Kubernetes control plane for end-to-end tests and demos.

etcd plus a CRD-capable Kubernetes API server (main/*.go: apiextensions-apiserver with a
minimal core/v1), built from Debian sid's packaged Go sources. Nothing is installed into
the system: packages are fetched with a private apt configuration and unpacked with
``dpkg -x`` into a cache outside the repository:

    ${XDG_CACHE_HOME:-~/.cache}/imageunlock/controlplane/

Command line::

    controlplane.py build [--refresh]         # ensure binaries; prints the bin dir
    controlplane.py up --dir DIR [--audit-log PATH] [--audit-policy PATH]
                       [--authorization-policy PATH] [--timeout SECONDS]
                                              # start detached; prints DIR/kubeconfig
    controlplane.py down --dir DIR            # stop by PID (idempotent)
    controlplane.py status --dir DIR          # "running <kubeconfig>" or "stopped"
    controlplane.py user --dir DIR --name NAME [--group G ...]
                                              # client cert + kubeconfig for another identity
    controlplane.py kubectl-path              # a working kubectl (PATH, else Debian's)
    controlplane.py clean                     # delete the whole cache

As a module (put this directory on sys.path)::

    from controlplane import ControlPlane
    cp = ControlPlane(tmpdir)
    cp.start()                 # blocks until /readyz passes (bounded)
    cp.kubeconfig              # path of the admin kubeconfig (O=system:masters)
    cp.add_user("alice", groups=["dev"])   # -> path of a kubeconfig for that identity
    cp.stop()

Standard library only (Python 3.11). Needs apt-get, dpkg and openssl.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
GO_SOURCES = HERE / "main"
PACKAGES_FILE = HERE / "packages.txt"

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
DEFAULT_AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
rules:
- level: Metadata
"""


class ControlPlaneError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[controlplane] {msg}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "imageunlock" / "controlplane"


def _run(cmd, *, timeout, cwd=None, env=None, quiet=True) -> subprocess.CompletedProcess:
    """Run a command with a time bound; raise with its output on failure."""
    try:
        res = subprocess.run(cmd, cwd=cwd, env=env, timeout=timeout, text=True,
                             stdout=subprocess.PIPE if quiet else None,
                             stderr=subprocess.STDOUT if quiet else None)
    except subprocess.TimeoutExpired as e:
        raise ControlPlaneError(f"timed out after {timeout}s: {' '.join(map(str, cmd))}") from e
    if res.returncode != 0:
        raise ControlPlaneError(f"command failed ({res.returncode}): {' '.join(map(str, cmd))}\n"
                                f"{(res.stdout or '')[-4000:]}")
    return res


@contextlib.contextmanager
def _file_lock(path: Path, timeout: float = 1800):
    """Exclusive lock so concurrent builds (parallel CI jobs, xdist) do not clash."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        deadline = time.monotonic() + timeout
        announced = False
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ControlPlaneError(f"could not take {path} within {timeout}s")
                if not announced:
                    log(f"waiting for another build holding {path}")
                    announced = True
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- build

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
            "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
            f"{_debian_mirror()} sid main\n")
        log("apt-get update (private sid lists)")
        res = _run(["apt-get", *self.opts(), "update"], timeout=600)
        if not self.has_lists() or re.search(r"^(W|E): Failed to fetch", res.stdout, re.M):
            # apt-get update exits 0 when the archive is unreachable; say so here.
            raise ControlPlaneError(f"apt-get update of Debian sid failed:\n{res.stdout[-2000:]}")

    def versions(self, pkgs: list[str]) -> dict[str, str]:
        res = subprocess.run(["apt-cache", *self.opts(), "show", "--no-all-versions", *pkgs],
                             text=True, capture_output=True, timeout=120)
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
        _run(["apt-get", *self.opts(), "download", *pkgs], cwd=dest, timeout=1200)


def _deb_filename(pkg: str, version: str, debs: Path) -> Path | None:
    for v in (version.replace(":", "%3a"), version.split(":", 1)[-1]):  # apt quotes epochs
        hits = list(debs.glob(f"{pkg}_{v}_*.deb"))
        if hits:
            return hits[0]
    return None


def _go_sources_hash() -> str:
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
    with _file_lock(root / "build.lock"):
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
            raise ControlPlaneError(f"{len(missing)} packages not found in Debian sid: "
                                    f"{' '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
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
    bins = sorted((d for d in root.glob("bin-*") if (d / ".complete").exists()),
                  key=lambda d: (d / ".complete").stat().st_mtime, reverse=True)
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
            _run(["dpkg-deb", "-x", str(deb), str(tmp)], timeout=300)
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
        _run([str(goroot / "bin" / "go"), "build", "-trimpath", "-o", str(tmp / APISERVER),
              "-ldflags", GO_LDFLAGS, "."], cwd=GO_SOURCES, env=env, timeout=3600)
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
                ok = subprocess.run([cand, "version", "--client"], capture_output=True,
                                    timeout=30).returncode == 0
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
    with _file_lock(root / "build.lock"):
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
            _run(["dpkg-deb", "-x", str(next(tmp.glob("kubectl_*.deb"))), str(tmp / "x")], timeout=300)
            dest = root / f"kubectl-{version}"
            dest.mkdir(exist_ok=True)
            os.replace(tmp / "x" / "usr" / "bin" / "kubectl", dest / "kubectl")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dest / "kubectl"


# --------------------------------------------------------------------------- run

def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Go listeners do
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _pid_alive(pid: int, marker: str) -> bool:
    """True if pid runs, is not a zombie and its command line mentions marker (guards
    against PID reuse)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in ("Z", "X") and marker in cmdline


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _subject(cn: str, groups) -> str:
    esc = lambda s: re.sub(r"([/=+,\\])", r"\\\1", s)  # noqa: E731
    return "".join(f"/O={esc(g)}" for g in groups) + f"/CN={esc(cn)}"


class ControlPlane:
    """etcd + API server under one directory. Processes are detached (own session), so
    they outlive the caller until stop() / `controlplane.py down`."""

    def __init__(self, directory, *, audit_log=None, audit_policy=None,
                 authorization_policy=None, bin_dir=None):
        self.dir = Path(directory).resolve()
        self.pki = self.dir / "pki"
        self.kubeconfig = str(self.dir / "kubeconfig")
        self.audit_log = Path(audit_log).resolve() if audit_log else None
        self.audit_policy = Path(audit_policy).resolve() if audit_policy else None
        self.authorization_policy = Path(authorization_policy).resolve() if authorization_policy else None
        self._bin_dir = Path(bin_dir) if bin_dir else None
        self._procs: dict[str, subprocess.Popen] = {}
        self.state: dict = {}
        self._load_state()

    # -- public API
    @property
    def bin_dir(self) -> Path:
        if self._bin_dir is None:
            self._bin_dir = build()
        return self._bin_dir

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.state['port']}"

    @property
    def ca_file(self) -> str:
        return str(self.pki / "ca.crt")

    def running(self) -> bool:
        return bool(self.state) and all(self._alive(n) for n in ("etcd", "apiserver"))

    def start(self, timeout: float = 60) -> "ControlPlane":
        """Start etcd and the API server (no-op if already running and ready)."""
        if self.running() and self._ready():
            return self
        self.stop()
        self.dir.mkdir(parents=True, exist_ok=True)
        bin_dir = self.bin_dir
        t0 = time.monotonic()
        self._ensure_pki()
        for attempt in range(3):
            ports = self._choose_ports()
            self.state = {"etcd_port": ports[0], "peer_port": ports[1], "port": ports[2],
                          "bin_dir": str(bin_dir)}
            (self.dir / "state.json").write_text(json.dumps(self.state, indent=1))
            try:
                self._start_etcd(bin_dir, timeout)
                self._start_apiserver(bin_dir)
                self._wait_ready(timeout)
                break
            except ControlPlaneError as e:
                # Another process may have taken a port between picking and binding it.
                if "address already in use" not in str(e) or attempt == 2:
                    raise
                log("a port was taken meanwhile; retrying with new ports")
                self.state = {}
        self._write_kubeconfig(self.kubeconfig, "admin")
        log(f"API server ready at {self.server} in {time.monotonic() - t0:.2f}s")
        return self

    def stop(self, timeout: float = 10) -> None:
        """Stop both processes by PID: SIGTERM, then SIGKILL after timeout. Idempotent."""
        for name in ("apiserver", "etcd"):
            pid_file = self.dir / f"{name}.pid"
            try:
                pid = int(pid_file.read_text().strip())
            except (OSError, ValueError):
                continue
            if self._alive(name):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + timeout
                while self._alive(name) and time.monotonic() < deadline:
                    self._reap(name)
                    time.sleep(0.05)
                if self._alive(name):
                    log(f"{name} (pid {pid}) ignored SIGTERM for {timeout}s; SIGKILL")
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    deadline = time.monotonic() + 5
                    while self._alive(name) and time.monotonic() < deadline:
                        self._reap(name)
                        time.sleep(0.05)
            self._reap(name)
            pid_file.unlink(missing_ok=True)
        self._procs.clear()

    def add_user(self, name: str, groups=()) -> str:
        """Mint a client certificate (CN=name, O=each group) signed by the plane's CA and
        write DIR/kubeconfig-<name>; return its path. The server authenticates it as that
        user; see main/authz.go for what it may do."""
        self._ensure_pki()
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        self._issue(f"user-{safe}", _subject(name, groups), "clientAuth")
        path = str(self.dir / f"kubeconfig-{safe}")
        self._write_kubeconfig(path, f"user-{safe}", user=name)
        return path

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- internals
    def _load_state(self):
        with contextlib.suppress(OSError, ValueError):
            self.state = json.loads((self.dir / "state.json").read_text())

    def _marker(self, name: str) -> str:
        return str(self.dir / ("etcd-data" if name == "etcd" else "pki"))

    def _alive(self, name: str) -> bool:
        proc = self._procs.get(name)
        if proc is not None:  # started by us: authoritative, and immune to the fork/exec race
            return proc.poll() is None
        try:
            pid = int((self.dir / f"{name}.pid").read_text().strip())
        except (OSError, ValueError):
            return False
        return _pid_alive(pid, self._marker(name))

    def _reap(self, name: str) -> None:
        proc = self._procs.get(name)
        if proc is not None:
            with contextlib.suppress(Exception):
                proc.wait(timeout=0)

    def _choose_ports(self) -> list[int]:
        # Reuse the previous ports when free: etcd keeps its peer URL in its data dir.
        old = [self.state.get(k) for k in ("etcd_port", "peer_port", "port")]
        if all(old) and all(_port_free(p) for p in old):
            return old
        if (self.dir / "etcd-data").exists():
            log("the previous ports are not available; starting with a fresh etcd data dir")
            shutil.rmtree(self.dir / "etcd-data")
        return _free_ports(3)

    def _spawn(self, name: str, cmd: list[str]) -> None:
        logf = open(self.dir / f"{name}.log", "ab")
        logf.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        logf.flush()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                cwd=self.dir, start_new_session=True, close_fds=True)
        logf.close()
        self._procs[name] = proc
        (self.dir / f"{name}.pid").write_text(f"{proc.pid}\n")

    def _start_etcd(self, bin_dir: Path, timeout: float) -> None:
        c, p = self.state["etcd_port"], self.state["peer_port"]
        self._spawn("etcd", [
            str(bin_dir / "etcd"), "--name", "controlplane",
            "--data-dir", str(self.dir / "etcd-data"),
            "--listen-client-urls", f"http://127.0.0.1:{c}",
            "--advertise-client-urls", f"http://127.0.0.1:{c}",
            "--listen-peer-urls", f"http://127.0.0.1:{p}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{p}",
            "--initial-cluster", f"controlplane=http://127.0.0.1:{p}",
            "--unsafe-no-fsync", "--log-level", "warn",
        ])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._alive("etcd"):
                self._fail("etcd exited")
            with contextlib.suppress(OSError, urllib.error.URLError):
                with urllib.request.urlopen(f"http://127.0.0.1:{c}/health", timeout=2) as r:
                    if json.load(r).get("health") == "true":
                        return
            time.sleep(0.1)
        self._fail(f"etcd not healthy within {timeout}s")

    def _start_apiserver(self, bin_dir: Path) -> None:
        cmd = [
            str(bin_dir / APISERVER),
            f"--etcd-servers=http://127.0.0.1:{self.state['etcd_port']}",
            "--bind-address=127.0.0.1", f"--secure-port={self.state['port']}",
            f"--tls-cert-file={self.pki / 'server.crt'}",
            f"--tls-private-key-file={self.pki / 'server.key'}",
            f"--client-ca-file={self.pki / 'ca.crt'}",
        ]
        if self.audit_log or self.audit_policy:
            policy = self.audit_policy
            if policy is None:
                policy = self.dir / "audit-policy.yaml"
                policy.write_text(DEFAULT_AUDIT_POLICY)
            cmd += [f"--audit-policy-file={policy}",
                    f"--audit-log-path={self.audit_log or self.dir / 'audit.log'}"]
        if self.authorization_policy:
            cmd.append(f"--authorization-policy-file={self.authorization_policy}")
        self._spawn("apiserver", cmd)

    def _ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca_file)
        ctx.load_cert_chain(self.pki / "admin.crt", self.pki / "admin.key")
        return ctx

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.server}/readyz", context=self._ssl_context(), timeout=2) as r:
                return r.status == 200
        except (OSError, urllib.error.URLError, KeyError, ssl.SSLError):
            return False

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._alive("apiserver"):
                self._fail("API server exited")
            if self._ready():
                return
            time.sleep(0.1)
        self._fail(f"API server not ready (/readyz) within {timeout}s")

    def _fail(self, why: str):
        msg = (f"{why}\n--- {self.dir / 'apiserver.log'} (tail)\n{_tail(self.dir / 'apiserver.log')}"
               f"\n--- {self.dir / 'etcd.log'} (tail)\n{_tail(self.dir / 'etcd.log')}")
        self.stop()
        raise ControlPlaneError(msg)

    # -- certificates and kubeconfigs (openssl)
    def _ensure_pki(self) -> None:
        self.pki.mkdir(parents=True, exist_ok=True)
        if not (self.pki / "ca.crt").exists():
            _run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                  "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "3650",
                  "-subj", "/CN=imageunlock-controlplane-ca",
                  "-addext", "basicConstraints=critical,CA:TRUE",
                  "-addext", "keyUsage=critical,keyCertSign,cRLSign"], cwd=self.pki, timeout=60)
        if not (self.pki / "server.crt").exists():
            self._issue("server", "/CN=controlplane-apiserver", "serverAuth",
                        san="IP:127.0.0.1,DNS:localhost")
        if not (self.pki / "admin.crt").exists():
            self._issue("admin", _subject("admin", ["system:masters"]), "clientAuth")

    def _issue(self, name: str, subject: str, usage: str, san: str | None = None) -> None:
        ext = f"basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage={usage}\n"
        if san:
            ext += f"subjectAltName={san}\n"
        (self.pki / f"{name}.ext").write_text(ext)
        _run(["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
              "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject],
             cwd=self.pki, timeout=60)
        _run(["openssl", "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
              "-set_serial", "0x" + secrets.token_hex(16), "-days", "3650",
              "-extfile", f"{name}.ext", "-out", f"{name}.crt"], cwd=self.pki, timeout=60)
        os.chmod(self.pki / f"{name}.key", 0o600)

    def _write_kubeconfig(self, path: str, cert: str, user: str = "admin") -> None:
        b64 = lambda p: base64.b64encode(Path(p).read_bytes()).decode()  # noqa: E731
        cfg = {
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "imageunlock-local", "cluster": {
                "server": self.server, "certificate-authority-data": b64(self.ca_file)}}],
            "users": [{"name": user, "user": {
                "client-certificate-data": b64(self.pki / f"{cert}.crt"),
                "client-key-data": b64(self.pki / f"{cert}.key")}}],
            "contexts": [{"name": "imageunlock-local", "context": {
                "cluster": "imageunlock-local", "user": user, "namespace": "default"}}],
            "current-context": "imageunlock-local",
            "preferences": {},
        }
        tmp = f"{path}.tmp"
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as fh:
            json.dump(cfg, fh, indent=1)  # JSON is valid YAML; every client reads it
        os.replace(tmp, path)


# --------------------------------------------------------------------------- CLI

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="controlplane.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="ensure binaries; print their directory")
    b.add_argument("--refresh", action="store_true", help="re-read Debian sid and rebuild if versions changed")
    u = sub.add_parser("up", help="start etcd + API server detached; print the kubeconfig path")
    u.add_argument("--dir", required=True)
    u.add_argument("--audit-log", help="audit log path (a Metadata-level policy is used unless --audit-policy)")
    u.add_argument("--audit-policy", help="audit policy file (log defaults to DIR/audit.log)")
    u.add_argument("--authorization-policy", help="RBAC YAML for non-system:masters users (see main/authz.go)")
    u.add_argument("--timeout", type=float, default=60)
    d = sub.add_parser("down", help="stop the processes started by `up` (by PID)")
    d.add_argument("--dir", required=True)
    s = sub.add_parser("status", help="print 'running KUBECONFIG' or 'stopped'")
    s.add_argument("--dir", required=True)
    us = sub.add_parser("user", help="mint a client cert + kubeconfig for another identity")
    us.add_argument("--dir", required=True)
    us.add_argument("--name", required=True, help="user name (certificate CN)")
    us.add_argument("--group", action="append", default=[], help="group (certificate O); repeatable")
    sub.add_parser("kubectl-path", help="print a working kubectl")
    sub.add_parser("clean", help="delete the build cache")
    args = ap.parse_args(argv)

    try:
        if args.cmd == "build":
            print(build(refresh=args.refresh))  # the bin dir also holds Debian's kubectl
        elif args.cmd == "up":
            cp = ControlPlane(args.dir, audit_log=args.audit_log, audit_policy=args.audit_policy,
                              authorization_policy=args.authorization_policy)
            cp.start(timeout=args.timeout)
            print(cp.kubeconfig)
        elif args.cmd == "down":
            ControlPlane(args.dir).stop()
        elif args.cmd == "status":
            cp = ControlPlane(args.dir)
            up = cp.running() and cp._ready()
            print(f"running {cp.kubeconfig}" if up else "stopped")
            return 0 if up else 1
        elif args.cmd == "user":
            print(ControlPlane(args.dir).add_user(args.name, args.group))
        elif args.cmd == "kubectl-path":
            print(kubectl_path())
        elif args.cmd == "clean":
            shutil.rmtree(cache_root(), ignore_errors=True)
    except ControlPlaneError as e:
        print(f"controlplane: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
