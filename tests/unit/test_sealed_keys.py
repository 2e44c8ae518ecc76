"""engine/keys/sealed.py: the key sealed to the node's TPM around another key source, with a
fake TPM (the real one: tests/tpm). What must hold: a kept blob for this archive is used with
no login; no blob, a refused blob or an unreachable TPM falls back to the wrapped source (and
reseals); a blob is written only after :meth:`keep`; the store holds blobs only; a failure of
both says why each was not used."""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

import pytest

from imageunlock.engine.keys.sealed import SealedKeySource, SealedKeyStore, Sealing, archive_identity
from imageunlock.engine.models import Phase
from imageunlock.errors import ApiUnavailableError, TpmUnavailableError, UnsealRefusedError

KEY = secrets.token_bytes(32)


class FakeTpm:
    """Seals by prefixing a marker and the identity (never the key's spellings in tests that
    look for them: the blob is checked through this class only)."""

    def __init__(self) -> None:
        self.refuse: UnsealRefusedError | None = None
        self.down = False
        self.sealed = 0
        self.unsealed = 0
        self.vault: dict[bytes, bytes] = {}

    def seal(self, key: bytes, *, tcti: str, pcrs: tuple[int, ...], identity: str) -> bytes:
        from imageunlock.engine.keys import tpm

        if self.down:
            raise TpmUnavailableError("the TPM could not be reached")
        self.sealed += 1
        blob = tpm._pack(tpm.BlobInfo(identity, tuple(pcrs)), secrets.token_bytes(8), secrets.token_bytes(8))
        self.vault[blob] = key
        return blob

    def unseal(self, blob: bytes, *, tcti: str, identity: str) -> bytes:
        if self.down:
            raise TpmUnavailableError("the TPM could not be reached")
        if self.refuse is not None:
            raise self.refuse
        self.unsealed += 1
        return self.vault[blob]


class FakeSource:
    def __init__(self) -> None:
        self.logins = 0
        self.keys = 0
        self.opened = 0
        self.down = False

    def open(self) -> FakeSource:
        self.opened += 1
        return self

    def authenticate(self, say) -> None:
        if self.down:
            raise ApiUnavailableError("resource API unreachable (connection refused)")
        self.logins += 1
        say(Phase.AUTHENTICATING, "logging in")

    def get_key(self, say) -> bytes:
        self.keys += 1
        return KEY

    def close(self) -> None:
        pass


def say(phase: Phase, message: str) -> None:
    pass


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    path = tmp_path / "archives" / "images.enc"
    path.parent.mkdir()
    path.write_bytes(b"encrypted")
    return path


def source(tmp_path: Path, archive: Path, fake: FakeTpm, inner: FakeSource) -> SealedKeySource:
    identity = archive_identity("ns", "resourceApi https://api", str(archive))
    return SealedKeySource(
        inner, SealedKeyStore(str(tmp_path / "state" / "sealed-keys")), identity, Sealing(tcti="x"),
        seal=fake.seal, unseal=fake.unseal,
    )  # fmt: skip


def key_of(keys: SealedKeySource) -> bytes:
    session = keys.open()
    try:
        session.authenticate(say)
        return session.get_key(say)
    finally:
        session.close()


def test_first_unlock_asks_the_api_and_keeps_only_a_blob_after_keep(tmp_path, archive) -> None:
    fake, inner = FakeTpm(), FakeSource()
    keys = source(tmp_path, archive, fake, inner)
    assert key_of(keys) == KEY and inner.keys == 1 and fake.sealed == 1
    store = tmp_path / "state" / "sealed-keys"
    assert not store.exists()  # nothing before the unlock was verified
    assert keys.keep() is True
    [blob] = list(store.iterdir())
    assert stat.S_IMODE(os.stat(store).st_mode) == 0o700 and stat.S_IMODE(blob.stat().st_mode) == 0o600
    assert KEY not in blob.read_bytes() and KEY.hex().encode() not in blob.read_bytes()


def test_later_unlock_unseals_with_no_login(tmp_path, archive) -> None:
    fake, inner = FakeTpm(), FakeSource()
    key_of(first := source(tmp_path, archive, fake, inner))
    first.keep()
    inner.down = True  # the API is gone
    again = source(tmp_path, archive, fake, inner)
    assert key_of(again) == KEY and again.unsealed
    assert inner.logins == 1 and inner.keys == 1 and fake.unsealed == 1
    assert again.keep() is False  # nothing new to keep
    assert inner.opened == 2  # the Secret is still read: deleting it still stops the node


def test_a_new_archive_falls_back_and_reseals_in_the_same_slot(tmp_path, archive) -> None:
    fake, inner = FakeTpm(), FakeSource()
    key_of(first := source(tmp_path, archive, fake, inner))
    first.keep()
    archive.write_bytes(b"a new archive, longer")
    second = source(tmp_path, archive, fake, inner)
    assert key_of(second) == KEY and not second.unsealed and inner.keys == 2 and fake.unsealed == 0
    second.keep()
    assert len(list((tmp_path / "state" / "sealed-keys").iterdir())) == 1


@pytest.mark.parametrize("cause", ["OtherTpm", "PcrChanged", "BlobInvalid", "OtherArchive"])
def test_a_refused_blob_falls_back_to_the_api_and_reseals(tmp_path, archive, cause) -> None:
    fake, inner = FakeTpm(), FakeSource()
    key_of(first := source(tmp_path, archive, fake, inner))
    first.keep()
    fake.refuse = UnsealRefusedError(cause, "refused")
    again = source(tmp_path, archive, fake, inner)
    assert key_of(again) == KEY and inner.keys == 2 and fake.sealed == 2
    assert again.keep() is True


def test_refused_blob_and_api_down_says_both(tmp_path, archive) -> None:
    fake, inner = FakeTpm(), FakeSource()
    key_of(first := source(tmp_path, archive, fake, inner))
    first.keep()
    fake.refuse = UnsealRefusedError("OtherTpm", "the sealed key does not load on this TPM")
    inner.down = True
    with pytest.raises(ApiUnavailableError) as caught:
        key_of(source(tmp_path, archive, fake, inner))
    assert caught.value.transient and caught.value.reason == "ResourceApiUnavailable"
    assert "sealed to this node's TPM was not used (OtherTpm" in caught.value.message
    assert "resource API unreachable" in str(caught.value)


def test_tpm_down_at_sealing_costs_only_the_offline_path(tmp_path, archive) -> None:
    fake, inner = FakeTpm(), FakeSource()
    fake.down = True
    keys = source(tmp_path, archive, fake, inner)
    assert key_of(keys) == KEY and keys.keep() is False
    assert not (tmp_path / "state" / "sealed-keys").exists()


def test_no_archive_no_identity_no_sealing(tmp_path) -> None:
    fake, inner = FakeTpm(), FakeSource()
    assert archive_identity("ns", "s", str(tmp_path / "absent")) is None
    keys = source(tmp_path, tmp_path / "absent", fake, inner)
    assert key_of(keys) == KEY and fake.sealed == 0 and keys.keep() is False


def test_identity_binds_scope_source_path_file_and_digest(tmp_path, archive) -> None:
    base = archive_identity("ns", "s", str(archive))
    assert base != archive_identity("other", "s", str(archive))
    assert base != archive_identity("ns", "t", str(archive))
    assert base != archive_identity("ns", "s", str(archive), sha256="ab" * 32)
    store = SealedKeyStore(str(tmp_path))
    assert store.path_for(base) != store.path_for(archive_identity("other", "s", str(archive)))


def test_a_sealed_key_that_did_not_unlock_is_dropped(tmp_path, archive) -> None:
    """An archive rewritten in place (inode, size and mtime kept): the unsealed key does not
    decrypt it; the blob goes, so the next attempt asks the API instead of failing forever."""
    from imageunlock.errors import ArchiveError, RuntimeUnavailableError

    fake, inner = FakeTpm(), FakeSource()
    key_of(first := source(tmp_path, archive, fake, inner))
    first.keep()
    again = source(tmp_path, archive, fake, inner)
    key_of(again)
    assert again.failed(RuntimeUnavailableError("the runtime is down")) is False  # transient: kept
    assert len(list((tmp_path / "state" / "sealed-keys").iterdir())) == 1
    assert again.failed(ArchiveError()) is True
    assert list((tmp_path / "state" / "sealed-keys").iterdir()) == []
    third = source(tmp_path, archive, fake, inner)
    assert key_of(third) == KEY and not third.unsealed and inner.keys == 2
    assert first.failed(ArchiveError()) is False  # a key from the API: no blob to blame


def test_a_blob_slot_that_is_a_fifo_or_a_symlink_is_not_read(tmp_path, archive) -> None:
    """The state directory is node-local input: a FIFO in a blob's place must not hang the
    agent, and a symlink must not be followed; either counts as no blob (the key source is
    asked) and stays as it is."""
    import os

    store = SealedKeyStore(str(tmp_path / "sealed-keys"))
    os.makedirs(store.directory, mode=0o700, exist_ok=True)
    fifo_id, link_id, ok_id = (archive_identity(ns, "s", str(archive)) for ns in ("a", "b", "c"))
    os.mkfifo(store.path_for(fifo_id), 0o600)
    (tmp_path / "elsewhere").write_bytes(b"IUTPMSEAL" + b"\x01" * 40)
    os.symlink(tmp_path / "elsewhere", store.path_for(link_id))
    assert store.load(fifo_id) is None and store.load(link_id) is None
    assert os.path.exists(store.path_for(fifo_id)) and os.path.islink(store.path_for(link_id))
    store.save(ok_id, b"blob")
    assert store.load(ok_id) == b"blob"
