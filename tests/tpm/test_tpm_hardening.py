"""engine/keys/tpm.py against a real TPM 2.0 (swtpm), as an attacker on the device would try
it (an independent review's findings; each test failed before its fix): the key must not
reach a disk or another program through what the tool processes inherit (environment, PATH),
and a PCR binding must bind.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from imageunlock.engine.keys import tpm
from imageunlock.errors import ConfigurationError, UnsealRefusedError

from ..support.tpm import Swtpm

pytestmark = pytest.mark.tpm

IDENTITY = "/var/lib/imageunlock/seeds-1.4.2.tar.enc@sha256:" + "ab" * 32


def _hexdump_bytes(text: str) -> bytes:
    """The bytes of every ``0000: 0a1b...`` line of a tpm2-tss log, joined."""
    return b"".join(bytes.fromhex(m[1]) for m in re.finditer(r"^[0-9a-f]{4}: ([0-9a-f]+)", text, re.M))


@pytest.mark.parametrize("pcrs", [(), (7,)], ids=["no-pcrs", "pcr7"])
def test_tss_debug_logging_in_the_environment_writes_no_key_to_disk(
    swtpm: Swtpm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pcrs: tuple[int, ...]
) -> None:
    """Every tpm2 tool used to inherit the whole environment. With ``TSS2_LOG=all+debug``
    (or ``+trace``) and ``TSS2_LOGFILE`` set for the agent or on the device (a debugging session,
    /etc/environment), tpm2-tss's ESYS logs each parameter before it encrypts it
    (``iesys_cryptossl_sym_aes_encrypt() IESYS AES input``): the key lands in plaintext in the
    log file (seal, and unseal at trace level), together with the session keys. The tools now
    run with an explicit environment, logging off."""
    log = tmp_path / "tss.log"
    monkeypatch.setenv("TSS2_LOG", "all+trace")
    monkeypatch.setenv("TSS2_LOGFILE", str(log))
    key = secrets.token_bytes(32)
    blob = tpm.seal(key, tcti=swtpm.tcti, pcrs=pcrs, identity=IDENTITY)
    assert tpm.unseal(blob, tcti=swtpm.tcti, identity=IDENTITY) == key
    text = log.read_text(errors="replace") if log.exists() else ""
    assert key not in _hexdump_bytes(text) and key.hex() not in text


def test_the_tools_get_no_credentials_from_the_environment(swtpm: Swtpm, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI takes the resource API password from IMAGEUNLOCK_PASSWORD; no tool inherits it
    (it would be in /proc/PID/environ). The tools need none of the parent's environment."""
    monkeypatch.setenv("IMAGEUNLOCK_PASSWORD", "canary-password-ha")
    seen: list[Any] = []
    real = subprocess.run

    def watched(args: list[str], **kw: Any) -> subprocess.CompletedProcess[bytes]:
        env = kw.get("env")
        seen.append(dict(os.environ) if env is None else dict(env))
        return real(args, **kw)

    monkeypatch.setattr(tpm.subprocess, "run", watched)
    tpm.seal(b"k" * 32, tcti=swtpm.tcti, identity=IDENTITY)
    assert seen and all("canary-password-ha" not in env.values() for env in seen)


def test_a_tpm2_tool_earlier_on_path_does_not_get_the_key(
    swtpm: Swtpm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tools run from /usr/bin or /bin, never from PATH: on a device, a directory on the
    user's PATH that someone else can write (or ``.``) would get a ``tpm2_create`` that reads
    the key from its standard input."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stolen = tmp_path / "stolen"
    for name in ("tpm2_create", "tpm2_unseal", "tpm2_createprimary"):
        fake = bin_dir / name
        fake.write_text(f"#!/bin/sh\ncat >> {stolen}\nexit 1\n")
        fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    key = secrets.token_bytes(32)
    blob = tpm.seal(key, tcti=swtpm.tcti, identity=IDENTITY)
    assert tpm.unseal(blob, tcti=swtpm.tcti, identity=IDENTITY) == key
    assert not stolen.exists()


@pytest.mark.parametrize("resettable", [16, 23])
def test_a_pcr_any_program_may_reset_is_refused_and_a_reset_opens_nothing_else(swtpm: Swtpm, resettable: int) -> None:
    """PCR 16 (debug) and 23 (application) may be reset by any program at locality 0
    (``tpm2_pcrreset``): sealed to one, a changed state is simply undone. Refused, with what
    to use instead; a PCR that records the boot (7) is not undone by resetting them."""
    key = secrets.token_bytes(32)
    with pytest.raises(ConfigurationError, match="bind nothing"):
        tpm.seal(key, tcti=swtpm.tcti, pcrs=[7, resettable], identity=IDENTITY)
    blob = tpm.seal(key, tcti=swtpm.tcti, pcrs=[7], identity=IDENTITY)
    swtpm.pcr_extend(7)
    swtpm.tool("tpm2_pcrreset", str(resettable))
    with pytest.raises(UnsealRefusedError) as refused:
        tpm.unseal(blob, tcti=swtpm.tcti, identity=IDENTITY)
    assert refused.value.cause == "PcrChanged"
