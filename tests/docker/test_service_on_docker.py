"""The unlock service (``imageunlock.engine.service``) on the real Engine, through the Docker adapter:
phases, the fast path and what it insists on, and archives that must load nothing."""

from __future__ import annotations

import pytest

from imageunlock.engine.crypto import derive_key
from imageunlock.engine.keys.resource_api import ResourceApiKeySource
from imageunlock.engine.models import Credentials, Phase, Say, UnlockRequest
from imageunlock.engine.runtimes.docker import DockerRuntime
from imageunlock.engine.service import UnlockService
from imageunlock.errors import ImagesNotVerifiedError

from ..support.dockerd import loaded
from ..support.resource_api import TEST_EMAIL, TEST_PASSWORD

pytestmark = pytest.mark.docker


class RacingRuntime(DockerRuntime):
    """Someone removes an image between our load and our verification."""

    victim = ""

    def load(self, chunks, refs=(), owner=None):
        names = super().load(chunks, refs, owner)
        self.remove_image(self.victim)
        return names


def _service(runtime, api):
    return UnlockService(runtime, ResourceApiKeySource(api.url, _creds))


def _creds():
    return Credentials(TEST_EMAIL, TEST_PASSWORD)


def test_image_missing_after_load_is_named(clean_docker, archives, resource_api):
    runtime = RacingRuntime(clean_docker.url)
    runtime.victim = archives.refs[3]
    request = UnlockRequest(str(archives.openssl_archive), archives.version, tuple(archives.names))
    with pytest.raises(ImagesNotVerifiedError) as info:
        _service(runtime, resource_api).unlock(request)
    assert info.value.missing == [archives.refs[3]]
    assert archives.refs[3] in info.value.message


def test_phases_are_reported_in_order(clean_docker, archives, resource_api):
    phases: list[Phase] = []
    request = UnlockRequest(str(archives.own_archive), archives.version, tuple(archives.names))
    result = _service(DockerRuntime(clean_docker.url), resource_api).unlock(
        request, lambda phase, msg, done, total: phases.append(phase) if phase not in phases else None
    )
    assert phases == [Phase.PENDING, Phase.AUTHENTICATING, Phase.FETCHING_KEY, Phase.LOADING, Phase.VERIFYING]
    assert result.images == archives.ids and not result.fast_path


def test_fast_path_insists_on_known_ids(clean_docker, archives, resource_api):
    service = _service(DockerRuntime(clean_docker.url), resource_api)
    request = UnlockRequest(str(archives.own_archive), archives.version, tuple(archives.names))
    service.unlock(request)
    resource_api.reset()
    same = UnlockRequest(request.archive_path, request.version, request.images, known_ids=archives.ids)
    assert service.unlock(same).fast_path
    assert resource_api.calls[KEY] == 0
    # a retagged impostor under one of the names is not "present"
    clean_docker.docker("tag", archives.refs[0], archives.refs[1])
    again = service.unlock(same)
    assert not again.fast_path and resource_api.calls[KEY] == 1
    assert loaded(clean_docker) == archives.ids


KEY = "/binary-split/key-fragment"


def test_first_run_does_not_vouch_for_whatever_holds_the_tag(clean_docker, archives, resource_api):
    """Issue 8, item 4: with no verified IDs yet, an impostor at NAME:VERSION was reported
    already present and its ID recorded as verified. Now the first run unlocks and compares."""
    clean_docker.docker("load", "-i", str(archives.plaintext))
    impostor = archives.refs[0]
    clean_docker.docker("tag", archives.refs[1], impostor)  # another image's ID under the name
    service = _service(DockerRuntime(clean_docker.url), resource_api)
    request = UnlockRequest(str(archives.own_archive), archives.version, tuple(archives.names))
    result = service.unlock(request)
    assert not result.fast_path and resource_api.calls[KEY] == 1
    assert result.images == archives.ids and loaded(clean_docker) == archives.ids  # impostor replaced
    # images that are all genuine still cost one unlock when nothing vouches for them yet
    resource_api.reset()
    assert not service.unlock(request).fast_path and resource_api.calls[KEY] == 1


class _KeyHolder:
    """A key source (and its session) that serves a known fragment's key (the attacker holds
    the key here)."""

    def __init__(self, fragment: bytes) -> None:
        self.fragment = fragment

    def open(self) -> _KeyHolder:
        return self

    def authenticate(self, say: Say) -> None:
        return None

    def get_key(self, say: Say) -> bytes:
        return derive_key(self.fragment)

    def close(self) -> None:
        return None


def test_a_plaintext_the_engine_would_decompress_loads_nothing(clean_docker, tmp_path):
    """Adversarial review (high): an xz/tar polyglot passed the stream checks as the requested
    image alone, while the Engine decompressed it and also tagged nginx:latest."""
    from imageunlock.engine.crypto import encrypt_stream
    from imageunlock.errors import ArchiveError

    from ..support.polyglot import xz_polyglot

    polyglot, _ = xz_polyglot("azaion/a:1.0", "nginx:latest")
    fragment = b"fragment-known-to-the-key-holder"
    archive = tmp_path / "polyglot.enc"
    archive.write_bytes(b"".join(encrypt_stream([polyglot], fragment)))
    service = UnlockService(DockerRuntime(clean_docker.url), _KeyHolder(fragment))
    with pytest.raises(ArchiveError):
        service.unlock(UnlockRequest(str(archive), "1.0", ("azaion/a",)))
    assert loaded(clean_docker) == {}


class _RewritingKeyHolder(_KeyHolder):
    """Serves the key, and rewrites the archive in place while the unlock authenticates: after the
    digest check, before the decrypting pass."""

    def __init__(self, fragment: bytes, path, replacement: bytes) -> None:
        super().__init__(fragment)
        self.path, self.replacement = path, replacement

    def authenticate(self, say: Say) -> None:
        with open(self.path, "r+b") as f:
            f.write(self.replacement)
            f.truncate()


def test_archive_rewritten_after_the_digest_check_loads_nothing(clean_docker, archives, tmp_path):
    """Adversarial review (medium): archiveSha256 was checked in one pass and the file decrypted
    in a second; rewriting it in between loaded whatever the writer (holding the key) chose."""
    import hashlib

    from imageunlock.errors import DigestMismatchError

    from ..support import tamper

    trusted = archives.own_archive.read_bytes()
    other = tamper.rewrite(archives.plaintext, tmp_path / "other.enc", archives.fragment, tamper.add_tags([]))
    path = tmp_path / "images.enc"
    path.write_bytes(trusted)
    service = UnlockService(
        DockerRuntime(clean_docker.url), _RewritingKeyHolder(archives.fragment, path, other.read_bytes())
    )
    request = UnlockRequest(
        str(path), archives.version, tuple(archives.names), archive_sha256=hashlib.sha256(trusted).hexdigest()
    )
    with pytest.raises(DigestMismatchError):
        service.unlock(request)
    assert loaded(clean_docker) == {}
