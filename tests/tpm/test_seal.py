"""Keys sealed to a real TPM 2.0 (Debian's swtpm, one new TPM per test): engine/keys/tpm.py
through Debian's tpm2-tools, as the product runs it (issue 23, the engine's part).

What must hold: the key comes back from the TPM that sealed it, for the archive it was sealed
for, while its PCRs are unchanged, also after the TPM restarts; anything else is refused with
a stable cause; the blob alone decrypts nothing; the key is on no disk at any step (the temp
directory after each tool, the TPM's state, its log) nor in any tool's command line or error.
"""

from __future__ import annotations

import base64
import hashlib
import io
import secrets
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from imageunlock.engine import crypto
from imageunlock.engine.keys import tpm
from imageunlock.errors import ArchiveError, KeySealError, TpmUnavailableError, UnsealRefusedError

from ..support.tpm import Swtpm

pytestmark = pytest.mark.tpm

IDENTITY = "/var/lib/imageunlock/seeds-1.4.2.tar.enc@sha256:" + "ab" * 32
OTHER_IDENTITY = "/var/lib/imageunlock/seeds-1.4.3.tar.enc@sha256:" + "cd" * 32


@pytest.fixture
def key() -> bytes:
    return secrets.token_bytes(32)


def spellings(secret: bytes) -> list[bytes]:
    """``secret`` as it could appear in a file or a text: raw, hex (both cases), base64."""
    return [secret, secret.hex().encode(), secret.hex().upper().encode(), base64.b64encode(secret)]


def files_holding(root: Path, secret: bytes) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            if any(form in data for form in spellings(secret)):
                found.append(str(path))
    return found


def refused(call: Callable[[], object]) -> UnsealRefusedError:
    with pytest.raises(UnsealRefusedError) as caught:
        call()
    assert caught.value.reason == "UnsealRefused" and not caught.value.transient
    return caught.value


@pytest.mark.parametrize("pcrs", [(), (7,), (0, 7)], ids=["no-pcrs", "pcr7", "pcr0+7"])
def test_seal_then_unseal_returns_the_key(swtpm: Swtpm, key: bytes, pcrs: tuple[int, ...]) -> None:
    blob = tpm.seal(key, tcti=swtpm.tcti, pcrs=pcrs, identity=IDENTITY)
    assert tpm.unseal(blob, tcti=swtpm.tcti, identity=IDENTITY) == key
    assert tpm.blob_info(blob) == tpm.BlobInfo(IDENTITY, pcrs)
    # and again: the primary key is created anew each time, the same one
    assert tpm.unseal(blob, tcti=swtpm.tcti, identity=IDENTITY) == key


def test_unseals_with_pcrs_for_identities_whose_digest_holds_a_zero_byte(swtpm: Swtpm, key: bytes) -> None:
    """A regression: the auth value was the raw SHA-256 of the identity, and tpm2-tools cut a
    policy session's inline auth at its first 0x00 (about one identity in eight): BAD_AUTH."""
    zeroed = [
        identity
        for n in range(200)
        if b"\0" in hashlib.sha256(tpm._AUTH_CONTEXT + (identity := f"{IDENTITY}#{n}").encode()).digest()
    ][:3]
    assert len(zeroed) == 3
    for identity in zeroed:
        blob = tpm.seal(key, tcti=swtpm.tcti, pcrs=[7], identity=identity)
        assert tpm.unseal(blob, tcti=swtpm.tcti, identity=identity) == key


def test_unseals_after_the_tpm_restarts(swtpm: Swtpm, key: bytes) -> None:
    """A reboot: nothing of ours stayed loaded or persisted in the TPM; same seed, same primary."""
    blob = tpm.seal(key, tcti=swtpm.tcti, pcrs=[7], identity=IDENTITY)
    swtpm.stop()
    swtpm.start()
    assert tpm.unseal(blob, tcti=swtpm.tcti, identity=IDENTITY) == key
    persistent = swtpm.tool("tpm2_getcap", "handles-persistent").stdout
    assert persistent.strip() == b""


def test_a_blob_from_another_tpm_is_refused(swtpm: Swtpm, other_swtpm: Swtpm, key: bytes) -> None:
    blob = tpm.seal(key, tcti=other_swtpm.tcti, identity=IDENTITY)
    error = refused(lambda: tpm.unseal(blob, tcti=swtpm.tcti, identity=IDENTITY))
    assert error.cause == "OtherTpm" and "another TPM" in error.message
    assert tpm.unseal(blob, tcti=other_swtpm.tcti, identity=IDENTITY) == key  # its own TPM still can


def test_a_changed_pcr_refuses(swtpm: Swtpm, key: bytes) -> None:
    blob = tpm.seal(key, tcti=swtpm.tcti, pcrs=[7], identity=IDENTITY)
    swtpm.pcr_extend(8)  # a PCR the key is not sealed to: no matter
    assert tpm.unseal(blob, tcti=swtpm.tcti, identity=IDENTITY) == key
    swtpm.pcr_extend(7)  # e.g. secure boot turned off
    error = refused(lambda: tpm.unseal(blob, tcti=swtpm.tcti, identity=IDENTITY))
    assert error.cause == "PcrChanged" and "sha256:7" in error.message
    # the key, got again from the resource API, seals to the new state
    again = tpm.seal(key, tcti=swtpm.tcti, pcrs=[7], identity=IDENTITY)
    assert tpm.unseal(again, tcti=swtpm.tcti, identity=IDENTITY) == key


def test_a_wrong_identity_refuses(swtpm: Swtpm, key: bytes) -> None:
    blob = tpm.seal(key, tcti=swtpm.tcti, identity=IDENTITY)
    error = refused(lambda: tpm.unseal(blob, tcti=swtpm.tcti, identity=OTHER_IDENTITY))
    assert error.cause == "OtherArchive" and "another archive" in error.message


@pytest.mark.parametrize("pcrs", [(), (7,)], ids=["no-pcrs", "pcr7"])
def test_an_edited_header_is_refused_by_the_tpm_itself(swtpm: Swtpm, key: bytes, pcrs: tuple[int, ...]) -> None:
    """The identity is the sealed object's auth value too: claiming another archive's identity
    in the header does not get the key out for that archive."""
    info, public, private = tpm._unpack(tpm.seal(key, tcti=swtpm.tcti, pcrs=pcrs, identity=IDENTITY))
    forged = tpm._pack(tpm.BlobInfo(OTHER_IDENTITY, info.pcrs), public, private)
    error = refused(lambda: tpm.unseal(forged, tcti=swtpm.tcti, identity=OTHER_IDENTITY))
    assert error.cause == "OtherArchive" and "TPM refuses" in error.message
    # noDA: wrong identities never lock the TPM out; the right one still works
    for _ in range(5):
        refused(lambda: tpm.unseal(forged, tcti=swtpm.tcti, identity=OTHER_IDENTITY))
    assert tpm.unseal(tpm._pack(info, public, private), tcti=swtpm.tcti, identity=IDENTITY) == key


def test_the_blob_holds_no_key_and_decrypts_nothing(swtpm: Swtpm, key: bytes) -> None:
    """A blob copied off the disk: not the key in any spelling, and neither it nor any 32 bytes
    of it, nor its hash, opens an archive encrypted with the key."""
    blob = tpm.seal(key, tcti=swtpm.tcti, pcrs=[7], identity=IDENTITY)
    assert not any(form in blob for form in spellings(key))
    plaintext = secrets.token_bytes(4096)
    archive = b"".join(crypto.encrypt_with_key([plaintext], key))
    assert b"".join(crypto.decrypt_with_key(io.BytesIO(archive), key)) == plaintext  # the real key does
    candidates = [blob[i : i + 32] for i in range(len(blob) - 31)]
    candidates += [hashlib.sha256(blob).digest(), crypto.derive_key(blob)]
    _, public, private = tpm._unpack(blob)
    candidates += [hashlib.sha256(part).digest() for part in (public, private)]
    for candidate in candidates:
        try:
            got = b"".join(crypto.decrypt_with_key(io.BytesIO(archive), candidate))
        except ArchiveError:
            continue
        assert got != plaintext


@pytest.fixture
def temp_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The adapter's temp directories go here, where the test can look."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


@pytest.fixture
def tool_steps(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """Every tpm2 tool the adapter runs, seen as it finishes: its command line, and its
    working directory's mode and files while they still exist."""
    real = subprocess.run
    steps: list[dict[str, Any]] = []

    def watched(args: list[str], **kw: Any) -> subprocess.CompletedProcess[bytes]:
        done = real(args, **kw)
        cwd = Path(kw["cwd"])
        files = {p.name: p.read_bytes() for p in cwd.rglob("*") if p.is_file()}
        steps.append({"args": list(args), "mode": cwd.stat().st_mode & 0o777, "dir": cwd, "files": files})
        return done

    monkeypatch.setattr(tpm.subprocess, "run", watched)
    yield steps


@pytest.mark.parametrize("pcrs", [(), (7,)], ids=["no-pcrs", "pcr7"])
def test_no_key_bytes_on_disk_or_command_lines(
    swtpm: Swtpm, key: bytes, pcrs: tuple[int, ...], temp_root: Path, tool_steps: list[dict[str, Any]]
) -> None:
    """The canary: after every tool of a seal and an unseal, nothing in the adapter's temp
    directory (0700) holds the key; nor does any command line (nor, but for a policy session,
    the identity's auth value: it is read from a memory-only file); afterwards the temp directory is
    gone, and the TPM's state directory and log hold no key bytes."""
    blob = tpm.seal(key, tcti=swtpm.tcti, pcrs=pcrs, identity=IDENTITY)
    assert tpm.unseal(blob, tcti=swtpm.tcti, identity=IDENTITY) == key
    auth = tpm._auth_value(IDENTITY)
    assert len(tool_steps) >= 10
    for step in tool_steps:
        assert step["mode"] == 0o700, step["args"]
        assert step["dir"].parent == temp_root
        for name, data in step["files"].items():
            assert not any(form in data for form in spellings(key)), (step["args"], name)
            # tpm2-tools keeps a policy session's auth value in the session's saved context
            assert (pcrs and name == "policy.ctx") or auth not in data, (step["args"], name)
        line = "\0".join(step["args"]).encode()
        assert not any(form in line for form in spellings(key)), step["args"]
        # the auth value (derived from the identity: no secret) is inline only where tpm2-tools
        # takes nothing else: a policy session's auth
        inline_ok = Path(step["args"][0]).name == "tpm2_unseal" and pcrs
        assert inline_ok or not any(form in line for form in spellings(auth)), step["args"]
    seen = {name for step in tool_steps for name in step["files"]}
    assert {"primary.ctx", "sealed.pub", "sealed.priv", "sealed.ctx"} <= seen  # the scan saw the parts
    (create,) = [step["args"] for step in tool_steps if Path(step["args"][0]).name == "tpm2_create"]
    assert create[create.index("-i") + 1] == "-"  # the key went in on its standard input
    assert list(temp_root.iterdir()) == []  # every temp directory removed
    assert files_holding(swtpm.workdir, key) == []


def test_error_texts_carry_no_key_bytes(swtpm: Swtpm, other_swtpm: Swtpm, key: bytes) -> None:
    """Every refusal and failure, seal and unseal, as a status, event or log would show it."""
    errors: list[Exception] = []

    def collect(call: Callable[[], object]) -> None:
        with pytest.raises(KeySealError) as caught:
            call()
        errors.append(caught.value)

    blob = tpm.seal(key, tcti=swtpm.tcti, pcrs=[7], identity=IDENTITY)
    info, public, private = tpm._unpack(blob)
    collect(lambda: tpm.unseal(blob, tcti=swtpm.tcti, identity=OTHER_IDENTITY))
    forged = tpm._pack(tpm.BlobInfo(OTHER_IDENTITY, info.pcrs), public, private)
    collect(lambda: tpm.unseal(forged, tcti=swtpm.tcti, identity=OTHER_IDENTITY))
    collect(lambda: tpm.unseal(blob, tcti=other_swtpm.tcti, identity=IDENTITY))
    collect(lambda: tpm.unseal(blob[:-5], tcti=swtpm.tcti, identity=IDENTITY))
    swtpm.pcr_extend(7)
    collect(lambda: tpm.unseal(blob, tcti=swtpm.tcti, identity=IDENTITY))
    # a seal the TPM refuses: the owner hierarchy has an auth value we do not know
    other_swtpm.tool("tpm2_changeauth", "-c", "o", "hex:" + secrets.token_hex(16))
    collect(lambda: tpm.seal(key, tcti=other_swtpm.tcti, pcrs=[7], identity=IDENTITY))
    swtpm.stop()
    collect(lambda: tpm.seal(key, tcti=swtpm.tcti, identity=IDENTITY))
    collect(lambda: tpm.unseal(blob, tcti=swtpm.tcti, identity=IDENTITY))

    kinds = [(type(e).__name__, getattr(e, "cause", e.reason)) for e in errors]
    assert kinds == [
        ("UnsealRefusedError", "OtherArchive"),
        ("UnsealRefusedError", "OtherArchive"),
        ("UnsealRefusedError", "OtherTpm"),
        ("UnsealRefusedError", "BlobInvalid"),
        ("UnsealRefusedError", "PcrChanged"),
        ("KeySealError", "KeySealFailed"),
        ("TpmUnavailableError", "TpmUnavailable"),
        ("TpmUnavailableError", "TpmUnavailable"),
    ]
    for error in errors:
        text = f"{error}\n{error!r}\n{error.args!r}".encode()
        assert not any(form in text for form in spellings(key)), text
        assert not any(form in text.lower() for form in spellings(key)), text


def test_an_unreachable_tpm_is_unavailable_and_transient(tmp_path: Path, key: bytes) -> None:
    swtpm = Swtpm(tmp_path)  # never started: nothing listens on its port
    swtpm.port = 1
    with pytest.raises(TpmUnavailableError) as caught:
        tpm.seal(key, tcti=swtpm.tcti, identity=IDENTITY)
    assert caught.value.transient and caught.value.reason == "TpmUnavailable"
    assert swtpm.tcti in caught.value.message


def test_no_tpm_object_stays_loaded(swtpm: Swtpm, key: bytes) -> None:
    """Without a resource manager every transient object and session must be flushed, or the
    TPM runs out of slots (3 objects on swtpm) after a few calls."""
    for _ in range(4):
        blob = tpm.seal(key, tcti=swtpm.tcti, pcrs=[7], identity=IDENTITY)
        assert tpm.unseal(blob, tcti=swtpm.tcti, identity=IDENTITY) == key
    for handles in ("handles-transient", "handles-loaded-session", "handles-saved-session"):
        assert swtpm.tool("tpm2_getcap", handles).stdout.strip() == b"", handles
