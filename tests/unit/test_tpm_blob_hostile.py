"""engine/keys/tpm.py without a TPM, as an attacker would try it (an independent review's
findings; each test failed before its fix): a hostile sealed blob in the state directory, and
a TCTI string that names code rather than a TPM.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from imageunlock.engine.keys import tpm
from imageunlock.errors import ConfigurationError, UnlockError, UnsealRefusedError

NOWHERE = "swtpm:host=127.0.0.1,port=1"


def _blob_with_header(header: bytes) -> bytes:
    parts = (header, b"P" * 48, b"R" * 130)
    return tpm.MAGIC + bytes([tpm.VERSION]) + b"".join(struct.pack(">I", len(p)) + p for p in parts)


def test_a_deeply_nested_header_is_blob_invalid_not_a_recursion_error() -> None:
    """A crafted file in the state directory whose header is 30 000 nested JSON
    arrays (60 KB, under the 64 KiB part limit) makes blob_info and unseal raise RecursionError:
    not an UnlockError, so a caller sees an internal error (transient: retried for ever), the
    same class of bug SECURITY.md item 7 fixed for manifest.json."""
    hostile = _blob_with_header(b"[" * 30000 + b"]" * 30000)
    for call in (lambda: tpm.blob_info(hostile), lambda: tpm.unseal(hostile, tcti=NOWHERE, identity="a")):
        with pytest.raises(UnsealRefusedError) as caught:
            call()
        assert caught.value.cause == "BlobInvalid"


def test_a_header_identity_is_not_echoed_unbounded_into_error_messages() -> None:
    """The header's identity is not held to MAX_IDENTITY_BYTES and is echoed with
    repr() into the OtherArchive message (a status/event text): a 60 KB identity gives a 60 KB
    message. The header is unauthenticated input."""
    header = b'{"identity":"' + b"A" * 60000 + b'","pcrs":[],"bank":"sha256"}'
    with pytest.raises(UnlockError) as caught:
        tpm.unseal(_blob_with_header(header), tcti=NOWHERE, identity="archive-1")
    assert len(caught.value.message) < 1024, len(caught.value.message)


@pytest.mark.parametrize(
    "tcti_of",
    [
        lambda marker: f"cmd:touch {marker}",  # libtss2-tcti-cmd: runs a shell command
        lambda marker: f"/nonexistent/lib{marker.name}.so",  # tctildr dlopen()s a path as given
    ],
    ids=["cmd", "dlopen-path"],
)
def test_only_device_and_test_tctis_are_accepted(tmp_path: Path, tcti_of: object) -> None:
    """Only TPM devices and a software TPM on loopback: any other TCTI is refused. Debian's libtss2 ships
    libtss2-tcti-cmd, so ``cmd:<shell command>`` runs that command (checked on this machine:
    ``tpm2_getrandom --tcti='cmd:touch /tmp/x'`` creates /tmp/x), and tctildr dlopen()s a name
    with a slash as a library path. Whoever sets the TCTI runs code in the process that gets
    the key on its stdin. Keep the TCTI an operator setting and allow only
    ``device:/dev/tpmrm0``, ``device:/dev/tpm0`` (and swtpm/mssim on 127.0.0.1 for tests)."""
    marker = tmp_path / "ran"
    tcti = tcti_of(marker)  # type: ignore[operator]
    with pytest.raises(ConfigurationError):
        tpm.seal(b"k" * 32, tcti=tcti, identity="archive-1")
    assert not marker.exists()


@pytest.mark.parametrize(
    "tcti",
    ["device:/dev/tpmrm0", "device:/dev/tpm0", "swtpm:host=127.0.0.1,port=2321", "mssim:host=localhost,port=2321"],
)
def test_the_usual_tctis_are_accepted(tcti: str) -> None:
    assert tpm.check_tcti(tcti) == tcti


@pytest.mark.parametrize("tcti", ["swtpm:host=10.0.0.5,port=2321", "device:/dev/../tmp/x", "tabrmd:", "", "device"])
def test_a_remote_or_odd_tcti_is_refused_with_what_to_use(tcti: str) -> None:
    with pytest.raises(ConfigurationError, match="device:/dev/tpmrm0"):
        tpm.check_tcti(tcti)
