"""Adapter: the archive key sealed to the node's TPM 2.0 (issue 23, the engine's part).

:func:`seal` turns a key into an opaque blob that only this TPM gives back, only for the same
archive identity and, when asked, only while the chosen SHA-256 PCRs hold the values they held
at sealing; :func:`unseal` gives the key back or raises :class:`UnsealRefusedError` with a
stable ``cause``. The blob alone (a copy of the disk) decrypts nothing.

The library: Debian's ``tpm2-tools``, run as subprocesses, not the ``tpm2-pytss`` binding.
``tpm2-tools`` (with the ``libtss2-*`` libraries it depends on) is a plain Debian package for
amd64 and arm64 alike, so a fresh Debian machine and the arm64 image get it with
``apt-get``/``apt-get download`` and nothing is compiled. ``tpm2-pytss`` has no binary wheel
on PyPI (checked: ``pip download --only-binary=:all: tpm2-pytss`` finds none; 3.0.0 is an
sdist that builds against the libtss2 headers with a C compiler), which the image's
wheels-only build stage refuses by design; Debian's ``python3-tpm2-pytss`` is built for
Debian's own ``/usr/bin/python3``, not the image's or a virtualenv's Python. Both sit on the
same libtss2 (the tools' TCTI strings are the library's), and this machine's checks
(../shared/notes/tpm.md) were made with the tools.

What the TPM holds:

* The parent is the owner (storage) hierarchy's primary key, created each time from one fixed
  template — the TCG storage-key template for ECC NIST P-256 (SHA-256 name, AES-128-CFB,
  restricted decrypt, fixedTPM/fixedParent, sensitiveDataOrigin, userWithAuth, noDA). The
  same seed and template give the same key, so nothing is persisted in the TPM (no NV, no
  persistent handle) and a cleared TPM (new seed) or another TPM cannot load the blob.
* The key is a sealed data object (KEYEDHASH) under it: fixedTPM, fixedParent, noDA, at most
  128 bytes. Without PCRs its auth value is required (userWithAuth). With PCRs, userWithAuth
  is off and its policy is ``PolicyPCR(sha256: pcrs) + PolicyAuthValue``: the PCR values at
  sealing AND the auth value.
* Its auth value is ``base64(SHA-256("imageunlock tpm seal v1" NUL identity)[:24])``: 32
  printable bytes (the most a SHA-256 object's auth value may hold), never a zero byte —
  tpm2-tools 5.4 reads a policy session's inline ``hex:`` auth value as a C string, so a raw
  digest with a 0x00 in it (about one identity in eight) was cut short there and refused
  (TPM_RC_BAD_AUTH), and the TPM drops trailing zeros of an auth value anyway. The identity is
  ALSO written in the blob's header. Both, because they do different jobs: the header lets
  :func:`unseal` refuse a blob for another archive before touching the TPM, with a clear
  message, and lets a caller tell which archive a blob is for (:func:`blob_info`); the auth
  value makes the TPM itself enforce the binding, so an edited header or a blob copied to
  another archive's name is still refused (TPM_RC_BAD_AUTH). The identity is not a secret, so
  neither is this auth value: it binds, it does not protect against root on the node (who can
  ask this TPM to unseal as we do: SECURITY.md will say so when the agent uses this). That is
  also why the object has noDA: a wrong identity must not count towards the TPM's dictionary
  attack lockout, which would lock out other users of the TPM.

The key never touches a disk: it goes to ``tpm2_create`` on its standard input and comes
back from ``tpm2_unseal`` on its standard output (pipes). The auth value is read from a
memory-only file (``memfd_create``) passed as ``/dev/fd/N``, off every command line — except
when unsealing through a PCR policy session, where tpm2-tools 5.4 takes it only inline
(``session:FILE+hex:...``) and keeps it in the session's saved context in the temp directory;
it is no secret (above). Both commands run in a salted HMAC session that encrypts their first
parameter (``tpm2_startauthsession --hmac-session``, salted with the primary key): the key
crosses the bus to and from the TPM encrypted, which matters on a discrete TPM whose bus can
be probed (against a passive probe: the salt key's public part is read over the same bus).
The temp directory (mode 0700, removed afterwards) holds only the public and private
(TPM-encrypted) parts, the TPM's saved contexts and a policy digest.

The tools are run by absolute path from /usr/bin or /bin (never found on PATH, where a device
user's directory could hold a fake ``tpm2_create`` reading the key), with an environment of
our choosing only: no credential of ours in their ``/proc/PID/environ``, and tpm2-tss logging
off (``TSS2_LOG`` at debug or trace would write each command parameter, the key included,
before encrypting it). The TCTI must name a TPM device or a software TPM on loopback
(:func:`check_tcti`): libtss2's ``cmd:`` TCTI runs a shell command, and a name with a slash
is loaded as a library. PCRs 16 and 23 are refused: any program may reset them.

Without a resource manager (a software TPM, ``/dev/tpm0``) transient objects stay loaded
between the tools' processes: each step is followed by ``tpm2_flushcontext -t`` and each
session flushed by its context, and one process seals or unseals on one TPM at a time (a lock
per TCTI string). With the kernel's resource manager (the default ``device:/dev/tpmrm0``) the
flushes find nothing. A TPM without one must not be used by another program at the same time.

Errors: the TPM could not be reached, or is busy → :class:`TpmUnavailableError` (transient);
the blob is refused → :class:`UnsealRefusedError` (``OtherArchive``, ``OtherTpm``,
``PcrChanged``, ``BlobInvalid``); anything else → :class:`KeySealError`. Messages name the tool
and the TPM's response code and words; never key bytes (checked again before raising).

Blob format (version 1), all integers big-endian::

    b"IUTPMSEAL" || 0x01 || u32 len || header JSON {"identity", "pcrs", "bank"}
                         || u32 len || TPM2B_PUBLIC || u32 len || TPM2B_PRIVATE
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from imageunlock.errors import (
    ConfigurationError,
    KeySealError,
    TpmUnavailableError,
    UnsealRefusedError,
)

MAX_KEY_BYTES = 128  # MAX_SYM_DATA: the most a sealed data object holds
PCR_BANK = "sha256"
MAX_PCR = 23  # PC Client TPMs have PCRs 0..23
# PCR 16 (debug) and 23 (application) may be reset by any program at locality 0
# (TPM2_PCR_Reset): sealed to them, a "changed" state is undone by `tpm2_pcrreset`.
RESETTABLE_PCRS = frozenset({16, 23})
MAX_IDENTITY_BYTES = 4096
COMMAND_TIMEOUT = 60.0  # seconds for one tool; a real TPM answers these in well under one

MAGIC = b"IUTPMSEAL"
VERSION = 1
_MAX_PART = 64 * 1024
_MAX_HEADER = 8 * 1024
# The tools run from here only, never from PATH: a directory on a device user's PATH must not
# get the key on a fake tool's standard input.
TOOL_DIRS = ("/usr/bin", "/bin")
# ... and with this environment only: nothing of ours (a password in the environment), and
# tpm2-tss logging off — TSS2_LOG at debug/trace writes each parameter before encrypting it.
_TOOL_ENV = {"PATH": ":".join(TOOL_DIRS), "TSS2_LOG": "all+none", "LC_ALL": "C"}
# The TCTIs we accept: the kernel's TPM devices, and a software TPM on this host's loopback
# (swtpm, mssim). Never another: libtss2's `cmd:` runs a shell command, and a name with a
# slash is dlopen()ed as a library.
_TCTI_ALLOWED = re.compile(
    r"^(?:device:/dev/tpm(?:rm)?[0-9]+|(?:swtpm|mssim):host=(?:127\.0\.0\.1|localhost|::1),port=[0-9]{1,5})$"
)
_PRIMARY = ["-C", "o", "-g", "sha256", "-G", "ecc256:aes128cfb", "-a"]
_PRIMARY_ATTRIBUTES = "restricted|decrypt|fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda"
_SEALED_ATTRIBUTES = "fixedtpm|fixedparent|noda"
_AUTH_CONTEXT = b"imageunlock tpm seal v1\0"

# TPM 2.0 response codes (Part 2, TPM_RC) the outcome depends on, as the tools print them.
_RC_FMT1 = 0x080
_RC_INTEGRITY = _RC_FMT1 + 0x01F
_RC_POLICY_FAIL = _RC_FMT1 + 0x01D
_RC_AUTH_FAIL = _RC_FMT1 + 0x00E
_RC_BAD_AUTH = _RC_FMT1 + 0x022
_RC_WARN = 0x900
_TCTI_LAYER = 10 << 16
_ERROR_LINE = re.compile(r"^ERROR: (\w+)\((0x[0-9A-Fa-f]+)\)(?: - ([^\n]*))?$", re.MULTILINE)
_TCTI_FAILED = re.compile(r"Could not load tcti|Failed to instantiate TCTI")

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


@dataclass(frozen=True)
class BlobInfo:
    """What a blob's header says: the archive identity it was sealed for, and its PCRs."""

    identity: str
    pcrs: tuple[int, ...]


def seal(key: bytes, *, tcti: str, pcrs: Sequence[int] = (), identity: str) -> bytes:
    """Seal ``key`` (1 to 128 bytes) to the TPM reached through ``tcti`` for the archive
    ``identity``; with ``pcrs``, also to the current values of those SHA-256 bank PCRs.
    Returns the blob to keep (it is safe to store: only this TPM opens it)."""
    if not isinstance(key, bytes | bytearray) or not 1 <= len(key) <= MAX_KEY_BYTES:
        raise ConfigurationError(f"a key to seal must be 1 to {MAX_KEY_BYTES} bytes (got {len(key)})")
    selection = _pcr_list(pcrs)
    auth = _auth_value(identity)
    with _Tpm(tcti, secret=bytes(key)) as tpm:
        tpm.create_primary()
        policy: list[str] = []
        if selection:
            tpm.run("tpm2_startauthsession", "-S", tpm.path("trial.ctx"))
            tpm.sessions.append("trial.ctx")
            tpm.run("tpm2_policypcr", "-Q", "-S", tpm.path("trial.ctx"), "-l", _pcr_arg(selection))
            tpm.run("tpm2_policyauthvalue", "-Q", "-S", tpm.path("trial.ctx"), "-L", tpm.path("policy.digest"))
            tpm.flush_session("trial.ctx")
            policy = ["-L", tpm.path("policy.digest")]
        attributes = _SEALED_ATTRIBUTES if selection else _SEALED_ATTRIBUTES + "|userwithauth"
        encrypting = tpm.encrypting_session()
        with _memfd(auth) as auth_path:
            tpm.run(
                "tpm2_create",
                "-Q",
                "-C",
                tpm.path("primary.ctx"),
                "-S",
                encrypting,
                "-i",
                "-",
                "-a",
                attributes,
                *policy,
                "-p",
                f"file:{auth_path}",
                "-u",
                tpm.path("sealed.pub"),
                "-r",
                tpm.path("sealed.priv"),
                stdin=bytes(key),
                pass_fd=auth_path,
            )
        tpm.flush_session("encrypting.ctx")
        public = Path(tpm.path("sealed.pub")).read_bytes()
        private = Path(tpm.path("sealed.priv")).read_bytes()
    return _pack(BlobInfo(identity, selection), public, private)


def unseal(blob: bytes, *, tcti: str, identity: str) -> bytes:
    """The key sealed in ``blob``, from the TPM reached through ``tcti``, if the blob was sealed
    by this TPM for ``identity`` and its PCRs (if any) still hold their values of then.
    Raises :class:`UnsealRefusedError` otherwise."""
    auth = _auth_value(identity)
    info, public, private = _unpack(blob)
    if info.identity != identity:
        raise UnsealRefusedError(
            "OtherArchive",
            f"the sealed key is for another archive ({_printable(info.identity)[:120]!r}, not {identity[:120]!r})",
        )
    with _Tpm(tcti) as tpm:
        tpm.create_primary()
        Path(tpm.path("sealed.pub")).write_bytes(public)
        Path(tpm.path("sealed.priv")).write_bytes(private)
        loaded = tpm.run_status(
            "tpm2_load",
            "-Q",
            "-C",
            tpm.path("primary.ctx"),
            "-u",
            tpm.path("sealed.pub"),
            "-r",
            tpm.path("sealed.priv"),
            "-c",
            tpm.path("sealed.ctx"),
        )
        if loaded is not None:
            tool, rc, words = loaded
            if rc is None:  # the tool could not even read the parts
                raise UnsealRefusedError(
                    "BlobInvalid", f"the sealed parts are unreadable ({_describe(tool, rc, words)})"
                )
            if _base(rc) is not None and _base(rc) != _RC_WARN:
                raise UnsealRefusedError(
                    "OtherTpm",
                    "the sealed key does not load on this TPM: it was sealed by another TPM, or this "
                    f"TPM was cleared since ({_describe(tool, rc, words)})",
                )
            tpm.fail(tool, rc, words)
        tpm.flush_transient()
        if info.pcrs:
            tpm.run("tpm2_startauthsession", "--policy-session", "-S", tpm.path("policy.ctx"))
            tpm.sessions.append("policy.ctx")
            tpm.run("tpm2_policypcr", "-Q", "-S", tpm.path("policy.ctx"), "-l", _pcr_arg(info.pcrs))
            tpm.run("tpm2_policyauthvalue", "-Q", "-S", tpm.path("policy.ctx"))
        encrypting = tpm.encrypting_session()
        with _memfd(auth) as auth_path:
            # tpm2-tools 5.4 takes a policy session's auth value only as text or hex after the
            # session ("session:FILE+hex:..."), not from a file: there it is on the command line
            # (no secret: it is derived from the identity, which the header shows anyway).
            auth_arg = f"session:{tpm.path('policy.ctx')}+hex:{auth.hex()}" if info.pcrs else f"file:{auth_path}"
            done = tpm.run_raw(
                "tpm2_unseal", "-c", tpm.path("sealed.ctx"), "-p", auth_arg, "-S", encrypting, pass_fd=auth_path
            )
        failed = tpm.failure_of("tpm2_unseal", done)
        if failed is not None:
            tool, rc, words = failed
            base = _base(rc)
            if base == _RC_POLICY_FAIL:
                raise UnsealRefusedError(
                    "PcrChanged",
                    f"the PCRs the key was sealed to ({_pcr_arg(info.pcrs)}) have changed since "
                    f"({_describe(tool, rc, words)})",
                )
            if base in (_RC_BAD_AUTH, _RC_AUTH_FAIL):
                raise UnsealRefusedError(
                    "OtherArchive",
                    f"the TPM refuses the sealed key for archive {identity!r}: it was sealed for another "
                    f"archive ({_describe(tool, rc, words)})",
                )
            tpm.fail(tool, rc, words)
        return done.stdout


def blob_info(blob: bytes) -> BlobInfo:
    """The header of ``blob`` (raises :class:`UnsealRefusedError` ``BlobInvalid`` if it is none)."""
    return _unpack(blob)[0]


# ---------------------------------------------------------------------------- the blob


def _pack(info: BlobInfo, public: bytes, private: bytes) -> bytes:
    header = json.dumps(
        {"identity": info.identity, "pcrs": list(info.pcrs), "bank": PCR_BANK}, separators=(",", ":")
    ).encode()
    parts = b"".join(struct.pack(">I", len(part)) + part for part in (header, public, private))
    return MAGIC + bytes([VERSION]) + parts


def _unpack(blob: bytes) -> tuple[BlobInfo, bytes, bytes]:
    def invalid(why: str) -> UnsealRefusedError:
        return UnsealRefusedError("BlobInvalid", f"not a key sealed by imageunlock ({why})")

    if not isinstance(blob, bytes | bytearray) or not blob.startswith(MAGIC):
        raise invalid("no header")
    if blob[len(MAGIC) : len(MAGIC) + 1] != bytes([VERSION]):
        raise invalid("unknown format version")
    view, offset, parts = bytes(blob), len(MAGIC) + 1, []
    for _ in range(3):
        if offset + 4 > len(view):
            raise invalid("truncated")
        (size,) = struct.unpack_from(">I", view, offset)
        offset += 4
        if size == 0 or size > _MAX_PART or offset + size > len(view):
            raise invalid("truncated or oversized part")
        parts.append(view[offset : offset + size])
        offset += size
    if offset != len(view):
        raise invalid("trailing bytes")
    if len(parts[0]) > _MAX_HEADER:
        raise invalid("oversized header")
    try:
        header = json.loads(parts[0])
        identity, pcrs, bank = header["identity"], header["pcrs"], header["bank"]
    except (ValueError, TypeError, KeyError, RecursionError):
        raise invalid("unreadable header") from None
    valid_pcrs = isinstance(pcrs, list) and all(type(p) is int and 0 <= p <= MAX_PCR for p in pcrs)
    if not isinstance(identity, str) or not identity or bank != PCR_BANK or not valid_pcrs:
        raise invalid("unexpected header")
    if len(identity.encode("utf-8", "replace")) > MAX_IDENTITY_BYTES:
        raise invalid("oversized identity")
    if pcrs != sorted(set(pcrs)):
        raise invalid("unexpected header")
    return BlobInfo(identity, tuple(pcrs)), parts[1], parts[2]


def _auth_value(identity: str) -> bytes:
    if not isinstance(identity, str) or not identity:
        raise ConfigurationError("the archive identity to seal a key for must be a non-empty string")
    try:
        encoded = identity.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigurationError("the archive identity to seal a key for must be valid text") from None
    if len(encoded) > MAX_IDENTITY_BYTES:
        raise ConfigurationError(f"the archive identity to seal a key for is longer than {MAX_IDENTITY_BYTES} bytes")
    # printable: no zero byte for tpm2-tools' C strings to stop at (module docstring)
    return base64.b64encode(hashlib.sha256(_AUTH_CONTEXT + encoded).digest()[:24])


def _pcr_list(pcrs: Sequence[int]) -> tuple[int, ...]:
    if isinstance(pcrs, str | bytes) or not all(type(p) is int and 0 <= p <= MAX_PCR for p in pcrs):
        raise ConfigurationError(f"PCRs to seal to must be numbers 0 to {MAX_PCR} (got {list(pcrs)!r})")
    if resettable := sorted(RESETTABLE_PCRS.intersection(pcrs)):
        raise ConfigurationError(
            f"PCR(s) {resettable} bind nothing: any program may reset them; seal to PCRs that "
            "record the boot (e.g. 0,2,4,7)"
        )
    return tuple(sorted(set(pcrs)))


def check_tcti(tcti: str) -> str:
    """``tcti`` if it names a TPM device or a software TPM on loopback; ConfigurationError
    otherwise (whoever chose the TCTI would choose code that the key is handed to)."""
    if not isinstance(tcti, str) or not _TCTI_ALLOWED.match(tcti):
        shown = tcti[:80] if isinstance(tcti, str) else type(tcti).__name__
        raise ConfigurationError(
            f"not an accepted TCTI: {shown!r}; use device:/dev/tpmrm0 (or device:/dev/tpm0), or a "
            "software TPM on loopback: swtpm:host=127.0.0.1,port=PORT"
        )
    return tcti


def _tool(name: str) -> str:
    """The absolute path of a tpm2-tools program in TOOL_DIRS, or TpmUnavailableError."""
    for directory in TOOL_DIRS:
        path = os.path.join(directory, name)
        if os.access(path, os.X_OK):
            return path
    raise TpmUnavailableError(f"the TPM tools are not installed ({name} not in {', '.join(TOOL_DIRS)}: tpm2-tools)")


def _pcr_arg(pcrs: Sequence[int]) -> str:
    return f"{PCR_BANK}:" + ",".join(str(p) for p in pcrs)


# ---------------------------------------------------------------------------- the tools


@contextmanager
def _memfd(data: bytes) -> Iterator[str]:
    """``data`` in a memory-only file, as the ``/dev/fd/N`` path a child process opens."""
    fd = os.memfd_create("imageunlock-tpm-auth", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
        yield f"/dev/fd/{fd}"
    finally:
        os.close(fd)


def _failure(tool: str, stderr: bytes) -> tuple[str, int | None, str]:
    """The failing TSS call, its response code and the TPM's words from a tool's stderr."""
    text = stderr.decode("utf-8", "replace")
    found = list(_ERROR_LINE.finditer(text))
    if found:
        last = found[-1]
        return last[1], int(last[2], 16), _printable(last[3] or "")
    lines = [line for line in text.splitlines() if line.startswith("ERROR")]
    return tool, None, _printable(lines[0] if lines else text.strip()[-200:])


def _printable(text: str) -> str:
    return "".join(ch if " " <= ch <= "~" else "?" for ch in text)[:200]


def _base(rc: int | None) -> int | None:
    """A TPM response code without its handle/session/parameter number: the TPM_RC_* value of a
    format-1 error, TPM_RC_WARN for every warning (busy, retry, lockout: try again later), None
    for anything else (a format-0 error, or an error of the software stack, not of the TPM)."""
    if rc is None or rc & ~0xFFF:
        return None
    if rc & _RC_FMT1:
        return (rc & 0x3F) | _RC_FMT1
    if rc & 0xF00 == _RC_WARN:
        return _RC_WARN
    return None


def _describe(tool: str, rc: int | None, words: str) -> str:
    code = f" 0x{rc:X}" if rc is not None else ""
    return f"{tool}{code}" + (f": {words}" if words else "")


class _Tpm:
    """One seal or unseal: a 0700 temp directory for the non-secret parts, the TCTI's lock,
    and the tools run against that TCTI, each step's transient objects flushed."""

    def __init__(self, tcti: str, secret: bytes = b"") -> None:
        self.tcti = check_tcti(tcti)
        self.secret = secret
        self.sessions: list[str] = []
        with _locks_guard:
            self.lock = _locks.setdefault(tcti, threading.Lock())
        self.dir = ""

    def __enter__(self) -> _Tpm:
        _tool("tpm2_createprimary")
        self.lock.acquire()
        try:
            self.dir = tempfile.mkdtemp(prefix="imageunlock-tpm-")  # mode 0700
        except OSError as exc:
            self.lock.release()
            raise KeySealError(f"no temporary directory for the TPM tools: {exc.strerror}") from None
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            for name in self.sessions:
                self.run_raw("tpm2_flushcontext", self.path(name))
            self.run_raw("tpm2_flushcontext", "-t")
        except KeySealError:
            pass  # the TPM went away: there is nothing left to flush
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.lock.release()

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def create_primary(self) -> None:
        self.run("tpm2_createprimary", "-Q", *_PRIMARY, _PRIMARY_ATTRIBUTES, "-c", self.path("primary.ctx"))
        self.flush_transient()

    def encrypting_session(self) -> str:
        """A salted HMAC session that encrypts the first command and response parameter."""
        self.run(
            "tpm2_startauthsession",
            "--hmac-session",
            "-c",
            self.path("primary.ctx"),
            "-S",
            self.path("encrypting.ctx"),
        )
        self.sessions.append("encrypting.ctx")
        self.flush_transient()  # the salt key loaded for the session
        return self.path("encrypting.ctx")

    def flush_transient(self) -> None:
        self.run("tpm2_flushcontext", "-t")

    def flush_session(self, name: str) -> None:
        self.run("tpm2_flushcontext", self.path(name))
        self.sessions.remove(name)

    def run_raw(
        self, tool: str, *args: str, stdin: bytes = b"", pass_fd: str = ""
    ) -> subprocess.CompletedProcess[bytes]:
        fds = (int(pass_fd.rsplit("/", 1)[1]),) if pass_fd else ()
        try:
            return subprocess.run(
                [_tool(tool), *args, f"--tcti={self.tcti}"],
                input=stdin,
                capture_output=True,
                timeout=COMMAND_TIMEOUT,
                pass_fds=fds,
                cwd=self.dir,
                env={**_TOOL_ENV, "TMPDIR": self.dir},
            )
        except FileNotFoundError:
            raise TpmUnavailableError(f"the TPM tools are not installed ({tool} not found)") from None
        except subprocess.TimeoutExpired:
            raise TpmUnavailableError(
                f"the TPM ({self.tcti}) did not answer {tool} within {COMMAND_TIMEOUT:g}s"
            ) from None

    def run_status(
        self, tool: str, *args: str, stdin: bytes = b"", pass_fd: str = ""
    ) -> tuple[str, int | None, str] | None:
        """None on success, else the failure as :func:`_failure` reads it."""
        return self.failure_of(tool, self.run_raw(tool, *args, stdin=stdin, pass_fd=pass_fd))

    def failure_of(self, tool: str, done: subprocess.CompletedProcess[bytes]) -> tuple[str, int | None, str] | None:
        """None if ``done`` succeeded, else its failure; raises when the TPM was not reached."""
        if done.returncode == 0:
            return None
        if _TCTI_FAILED.search(done.stderr.decode("utf-8", "replace")):
            raise TpmUnavailableError(f"the TPM could not be reached through {self.tcti!r} ({tool})")
        return _failure(tool, done.stderr)

    def run(self, tool: str, *args: str, stdin: bytes = b"", pass_fd: str = "") -> None:
        failed = self.run_status(tool, *args, stdin=stdin, pass_fd=pass_fd)
        if failed is not None:
            self.fail(*failed)

    def fail(self, tool: str, rc: int | None, words: str) -> None:
        """Raise the error for a failed step: busy/unreachable, or anything else."""
        if rc is not None and (rc & ~0xFFFF) == _TCTI_LAYER:
            raise TpmUnavailableError(self._safe(f"the TPM could not be reached through {self.tcti!r}"))
        if _base(rc) == _RC_WARN:
            raise TpmUnavailableError(self._safe(f"the TPM is busy ({_describe(tool, rc, words)})"))
        raise KeySealError(self._safe(f"the TPM refused a step of sealing ({_describe(tool, rc, words)})"))

    def _safe(self, message: str) -> str:
        """``message``, unless it contains the key in any usual spelling (it cannot: the tools
        never see it on their command lines, but an error text is shown everywhere)."""
        key = self.secret
        if key and any(
            form in message
            for form in (key.hex(), key.hex().upper(), base64.b64encode(key).decode(), key.decode("latin-1"))
        ):
            return "the TPM refused a step of sealing (details withheld: they contained key material)"
        return message
