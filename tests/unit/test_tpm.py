"""engine/keys/tpm.py without a TPM: the blob's format, the checks made before the TPM is
asked, how the tools' answers become errors. The TPM itself: tests/tpm."""

from __future__ import annotations

import struct

import pytest

from imageunlock.engine.keys import tpm
from imageunlock.errors import ConfigurationError, KeySealError, TpmUnavailableError, UnsealRefusedError

NOWHERE = "swtpm:host=127.0.0.1,port=1"  # nothing listens: a test that reaches it fails loudly


def blob(identity: str = "archive-1", pcrs: tuple[int, ...] = (7,)) -> bytes:
    return tpm._pack(tpm.BlobInfo(identity, pcrs), b"P" * 48, b"R" * 130)


def test_the_format_round_trips() -> None:
    info, public, private = tpm._unpack(blob())
    assert info == tpm.BlobInfo("archive-1", (7,)) and public == b"P" * 48 and private == b"R" * 130
    assert tpm.blob_info(blob("a", ())) == tpm.BlobInfo("a", ())
    assert blob().startswith(tpm.MAGIC + bytes([tpm.VERSION]))


def _reheader(header: bytes) -> bytes:
    return tpm.MAGIC + b"\x01" + struct.pack(">I", len(header)) + header + blob()[-(4 + 48 + 4 + 130) :]


@pytest.mark.parametrize(
    "bad",
    [
        b"",
        b"not a blob",
        blob()[:-1],
        blob() + b"\0",
        tpm.MAGIC + b"\x02" + blob()[len(tpm.MAGIC) + 1 :],
        _reheader(b"{not json"),
        _reheader(b'{"identity":"a","pcrs":[7]}'),
        _reheader(b'{"identity":"","pcrs":[7],"bank":"sha256"}'),
        _reheader(b'{"identity":"a","pcrs":[24],"bank":"sha256"}'),
        _reheader(b'{"identity":"a","pcrs":[7,0],"bank":"sha256"}'),
        _reheader(b'{"identity":"a","pcrs":[7],"bank":"sha1"}'),
        _reheader(b'{"identity":"a","pcrs":[true],"bank":"sha256"}'),
    ],
)
def test_anything_else_is_an_invalid_blob_refused_before_the_tpm(bad: bytes) -> None:
    with pytest.raises(UnsealRefusedError) as caught:
        tpm.unseal(bad, tcti=NOWHERE, identity="a")
    assert caught.value.cause == "BlobInvalid" and not caught.value.transient


def test_another_archives_blob_is_refused_before_the_tpm() -> None:
    with pytest.raises(UnsealRefusedError) as caught:
        tpm.unseal(blob("archive-1"), tcti=NOWHERE, identity="archive-2")
    assert caught.value.cause == "OtherArchive" and "archive-1" in caught.value.message


@pytest.mark.parametrize("key", [b"", b"k" * 129])
def test_a_key_of_the_wrong_size_is_refused_without_its_bytes(key: bytes) -> None:
    with pytest.raises(ConfigurationError) as caught:
        tpm.seal(key, tcti=NOWHERE, identity="a")
    assert f"got {len(key)}" in caught.value.message and "kk" not in caught.value.message


@pytest.mark.parametrize("pcrs", [[24], [-1], ["7"], [True], "7"])
def test_pcrs_are_numbers_0_to_23(pcrs: object) -> None:
    with pytest.raises(ConfigurationError):
        tpm.seal(b"k" * 32, tcti=NOWHERE, pcrs=pcrs, identity="a")  # type: ignore[arg-type]


@pytest.mark.parametrize("identity", ["", "\udc80", "x" * 4097])
def test_the_identity_is_non_empty_text(identity: str) -> None:
    with pytest.raises(ConfigurationError):
        tpm.seal(b"k" * 32, tcti=NOWHERE, identity=identity)
    with pytest.raises(ConfigurationError):
        tpm.unseal(blob(), tcti=NOWHERE, identity=identity)


def test_the_auth_value_is_the_identitys_and_nothing_else() -> None:
    assert tpm._auth_value("a") == tpm._auth_value("a") != tpm._auth_value("b")
    assert len(tpm._auth_value("a")) == 32  # a SHA-256 name algorithm's digest size, the most it may be


def test_the_auth_value_never_holds_a_zero_byte() -> None:
    """tpm2-tools reads a policy session's inline hex auth as a C string: a 0x00 cut it short."""
    for n in range(2000):
        auth = tpm._auth_value(f"/var/lib/imageunlock/images-{n}.enc")
        assert b"\0" not in auth and len(auth) == 32


def test_response_codes_lose_their_handle_session_parameter_number() -> None:
    assert tpm._base(0x99D) == tpm._RC_POLICY_FAIL  # session 1
    assert tpm._base(0x9A2) == tpm._RC_BAD_AUTH
    assert tpm._base(0x98E) == tpm._RC_AUTH_FAIL
    assert tpm._base(0x1DF) == tpm._RC_INTEGRITY  # parameter 1
    assert tpm._base(0x902) == tpm._base(0x922) == tpm._base(0x921) == tpm._RC_WARN  # memory, retry, lockout
    assert tpm._base(0xA000A) is None and tpm._base(None) is None and tpm._base(0x101) is None


def test_the_tools_failure_is_read_from_their_last_error_line() -> None:
    stderr = (
        b"WARNING:esys:src/tss2-esys/api/Esys_Unseal.c:295:Esys_Unseal_Finish() Received TPM Error \n"
        b"ERROR:esys:src/tss2-esys/api/Esys_Unseal.c:98:Esys_Unseal() Esys Finish ErrorCode (0x0000099d) \n"
        b"ERROR: Esys_Unseal(0x99D) - tpm:session(1):a policy check failed\n"
        b"ERROR: Unable to run tpm2_unseal\n"
    )
    assert tpm._failure("tpm2_unseal", stderr) == ("Esys_Unseal", 0x99D, "tpm:session(1):a policy check failed")
    assert tpm._failure("tpm2_load", b'ERROR: Could not open file "x"\n\x1b[31m') == (
        "tpm2_load",
        None,
        'ERROR: Could not open file "x"',
    )


def test_a_step_failure_becomes_unavailable_or_a_seal_error() -> None:
    step = tpm._Tpm(NOWHERE)  # not entered: no tool runs
    with pytest.raises(TpmUnavailableError):
        step.fail("Esys_Create", 0x902, "tpm:warn(2.0): out of memory for object contexts")
    with pytest.raises(TpmUnavailableError):
        step.fail("Esys_Create", 0xA000A, "")
    with pytest.raises(KeySealError) as caught:
        step.fail("Esys_CreatePrimary", 0x9A2, "tpm:session(1):authorization failure without DA implications")
    assert type(caught.value) is KeySealError and "0x9A2" in caught.value.message


def test_a_message_holding_the_key_is_withheld() -> None:
    key = bytes(range(32))
    step = tpm._Tpm(NOWHERE, secret=key)
    for leaked in (key.hex(), key.hex().upper()):
        with pytest.raises(KeySealError) as caught:
            step.fail("Esys_Create", None, f"bad input {leaked}")
        assert leaked not in caught.value.message and "withheld" in caught.value.message


def test_a_tcti_string_is_one_line() -> None:
    with pytest.raises(ConfigurationError):
        tpm.seal(b"k" * 32, tcti="swtpm:host=127.0.0.1\n,port=1", identity="a")
