"""A software TPM 2.0 for tests: Debian's ``swtpm`` in socket mode, like the dockerd and
containerd helpers (facts about it on this machine: ../shared/notes/tpm.md).

Each :class:`Swtpm` has its own state directory (a new TPM: its own seeds, so another
instance is "another device"), listens on 127.0.0.1 on two free ports in a row (commands on
P, control on P+1, where the swtpm TCTI looks for it), and starts with ``--flags
not-need-init,startup-clear``: it runs TPM2_Startup itself, so it answers at once. Reached
by the TPM software stack's TCTI string :attr:`Swtpm.tcti` (``swtpm:host=127.0.0.1,port=P``).
Started in its own session, stopped by PID (process group).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from .net import free_port
from .processes import await_answer, log_tail, stop_group


class SwtpmError(RuntimeError):
    pass


class Swtpm:
    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.port = 0
        self.ctrl_port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def state_dir(self) -> Path:
        return self.workdir / "state"

    @property
    def log_path(self) -> Path:
        return self.workdir / "swtpm.log"

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def start(self, timeout: float = 15.0, attempts: int = 3) -> Swtpm:
        binary = shutil.which("swtpm")
        if binary is None:
            raise SwtpmError("swtpm not installed (make setup installs Debian's swtpm)")
        if shutil.which("tpm2_getrandom") is None:
            raise SwtpmError("tpm2-tools not installed (make setup installs Debian's tpm2-tools)")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(attempts):  # a free port can be taken before swtpm binds it
            # the swtpm TCTI finds the control channel on the next port: two free in a row
            self.port = self.ctrl_port = 0
            while not self.port:
                port = free_port()
                if port < 65535 and _free(port + 1):
                    self.port, self.ctrl_port = port, port + 1
            args = [
                binary,
                "socket",
                "--tpm2",
                "--tpmstate",
                f"dir={self.state_dir}",
                "--server",
                f"type=tcp,port={self.port},bindaddr=127.0.0.1",
                "--ctrl",
                f"type=tcp,port={self.ctrl_port},bindaddr=127.0.0.1",
                "--flags",
                "not-need-init,startup-clear",
            ]
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                await_answer(
                    self.proc,
                    lambda: self.tool("tpm2_getrandom", "--hex", "8", check=False).returncode == 0,
                    timeout,
                    "swtpm",
                    self.log_path,
                    SwtpmError,
                )
                return self
            except SwtpmError:
                exited = self.proc is not None and self.proc.poll() is not None
                self.stop()
                if not exited or attempt == attempts - 1:  # only a lost port race is worth another try
                    raise
        raise AssertionError("unreachable")

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        stop_group(proc, timeout=timeout)

    def tail(self, lines: int = 30) -> str:
        return log_tail(self.log_path, lines)

    def tool(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        """A tpm2-tools command against this TPM."""
        done = subprocess.run([tool, *args, f"--tcti={self.tcti}"], capture_output=True, timeout=60)
        if check and done.returncode:
            raise SwtpmError(f"{tool} {' '.join(args)} failed: {done.stderr.decode(errors='replace')}")
        return done

    def pcr_extend(self, pcr: int, digest: bytes = b"\x01" * 32) -> None:
        """Extend SHA-256 bank PCR ``pcr`` (what a changed boot measurement does)."""
        self.tool("tpm2_pcrextend", f"{pcr}:sha256={digest.hex()}")

    def pcr(self, pcr: int) -> str:
        """The SHA-256 bank value of ``pcr``, as tpm2_pcrread prints it."""
        out = self.tool("tpm2_pcrread", f"sha256:{pcr}").stdout.decode()
        return out.strip().rsplit(":", 1)[-1].strip().lower()

    def __enter__(self) -> Swtpm:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def running(workdir: Path) -> Iterator[Swtpm]:
    """A fixture's body: a software TPM in ``workdir``, stopped at the end; when it cannot
    start, the test is skipped, or fails under CI=true (tests/support/ci.py)."""
    from .ci import unavailable

    tpm = Swtpm(workdir)
    try:
        tpm.start()
    except (SwtpmError, OSError) as exc:
        unavailable("swtpm", str(exc))
    try:
        yield tpm
    finally:
        tpm.stop()
