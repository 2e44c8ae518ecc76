"""The running plane: etcd and the API server as detached processes under one directory,
their certificates and kubeconfigs (openssl), audit log and authorization policy."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from .builder import APISERVER, build
from .common import ControlPlaneError, log, run

DEFAULT_AUDIT_POLICY = """\
apiVersion: audit.k8s.io/v1
kind: Policy
rules:
- level: Metadata
"""


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
    they outlive the caller until stop() / `python -m controlplane down`."""

    def __init__(self, directory, *, audit_log=None, audit_policy=None, authorization_policy=None, bin_dir=None):
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

    def start(self, timeout: float = 60) -> ControlPlane:
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
            self.state = {"etcd_port": ports[0], "peer_port": ports[1], "port": ports[2], "bin_dir": str(bin_dir)}
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
        with open(self.dir / f"{name}.log", "ab") as logf:  # the child keeps its own copy
            logf.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
            logf.flush()
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                start_new_session=True,
                close_fds=True,
            )
        self._procs[name] = proc
        (self.dir / f"{name}.pid").write_text(f"{proc.pid}\n")

    def _start_etcd(self, bin_dir: Path, timeout: float) -> None:
        c, p = self.state["etcd_port"], self.state["peer_port"]
        self._spawn(
            "etcd",
            [
                str(bin_dir / "etcd"),
                "--name",
                "controlplane",
                "--data-dir",
                str(self.dir / "etcd-data"),
                "--listen-client-urls",
                f"http://127.0.0.1:{c}",
                "--advertise-client-urls",
                f"http://127.0.0.1:{c}",
                "--listen-peer-urls",
                f"http://127.0.0.1:{p}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{p}",
                "--initial-cluster",
                f"controlplane=http://127.0.0.1:{p}",
                "--unsafe-no-fsync",
                "--log-level",
                "warn",
            ],
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._alive("etcd"):
                self._fail("etcd exited")
            with (
                contextlib.suppress(OSError, urllib.error.URLError),
                urllib.request.urlopen(f"http://127.0.0.1:{c}/health", timeout=2) as r,
            ):
                if json.load(r).get("health") == "true":
                    return
            time.sleep(0.1)
        self._fail(f"etcd not healthy within {timeout}s")

    def _start_apiserver(self, bin_dir: Path) -> None:
        cmd = [
            str(bin_dir / APISERVER),
            f"--etcd-servers=http://127.0.0.1:{self.state['etcd_port']}",
            "--bind-address=127.0.0.1",
            f"--secure-port={self.state['port']}",
            f"--tls-cert-file={self.pki / 'server.crt'}",
            f"--tls-private-key-file={self.pki / 'server.key'}",
            f"--client-ca-file={self.pki / 'ca.crt'}",
        ]
        if self.audit_log or self.audit_policy:
            policy = self.audit_policy
            if policy is None:
                policy = self.dir / "audit-policy.yaml"
                policy.write_text(DEFAULT_AUDIT_POLICY)
            cmd += [f"--audit-policy-file={policy}", f"--audit-log-path={self.audit_log or self.dir / 'audit.log'}"]
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
        msg = (
            f"{why}\n--- {self.dir / 'apiserver.log'} (tail)\n{_tail(self.dir / 'apiserver.log')}"
            f"\n--- {self.dir / 'etcd.log'} (tail)\n{_tail(self.dir / 'etcd.log')}"
        )
        self.stop()
        raise ControlPlaneError(msg)

    # -- certificates and kubeconfigs (openssl)
    def _ensure_pki(self) -> None:
        self.pki.mkdir(parents=True, exist_ok=True)
        if not (self.pki / "ca.crt").exists():
            run(
                [
                    "openssl",
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:prime256v1",
                    "-nodes",
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.crt",
                    "-days",
                    "3650",
                    "-subj",
                    "/CN=imageunlock-controlplane-ca",
                    "-addext",
                    "basicConstraints=critical,CA:TRUE",
                    "-addext",
                    "keyUsage=critical,keyCertSign,cRLSign",
                ],
                cwd=self.pki,
                timeout=60,
            )
        if not (self.pki / "server.crt").exists():
            self._issue("server", "/CN=controlplane-apiserver", "serverAuth", san="IP:127.0.0.1,DNS:localhost")
        if not (self.pki / "admin.crt").exists():
            self._issue("admin", _subject("admin", ["system:masters"]), "clientAuth")

    def _issue(self, name: str, subject: str, usage: str, san: str | None = None) -> None:
        ext = (
            f"basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage={usage}\n"
        )
        if san:
            ext += f"subjectAltName={san}\n"
        (self.pki / f"{name}.ext").write_text(ext)
        run(
            [
                "openssl",
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                f"{name}.key",
                "-out",
                f"{name}.csr",
                "-subj",
                subject,
            ],
            cwd=self.pki,
            timeout=60,
        )
        run(
            [
                "openssl",
                "x509",
                "-req",
                "-in",
                f"{name}.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-set_serial",
                "0x" + secrets.token_hex(16),
                "-days",
                "3650",
                "-extfile",
                f"{name}.ext",
                "-out",
                f"{name}.crt",
            ],
            cwd=self.pki,
            timeout=60,
        )
        os.chmod(self.pki / f"{name}.key", 0o600)

    def _write_kubeconfig(self, path: str, cert: str, user: str = "admin") -> None:
        b64 = lambda p: base64.b64encode(Path(p).read_bytes()).decode()  # noqa: E731
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "imageunlock-local",
                    "cluster": {"server": self.server, "certificate-authority-data": b64(self.ca_file)},
                }
            ],
            "users": [
                {
                    "name": user,
                    "user": {
                        "client-certificate-data": b64(self.pki / f"{cert}.crt"),
                        "client-key-data": b64(self.pki / f"{cert}.key"),
                    },
                }
            ],
            "contexts": [
                {
                    "name": "imageunlock-local",
                    "context": {"cluster": "imageunlock-local", "user": user, "namespace": "default"},
                }
            ],
            "current-context": "imageunlock-local",
            "preferences": {},
        }
        tmp = f"{path}.tmp"
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as fh:
            json.dump(cfg, fh, indent=1)  # JSON is valid YAML; every client reads it
        os.replace(tmp, path)
