"""The unlock workflow (UnlockService) with a fake runtime and a fake key client, on real
small archives: fast path, first unlock, phases, and each way it refuses or fails."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest

from imageunlock.engine.crypto import encrypt_stream
from imageunlock.engine.models import Credentials, Phase, UnlockRequest
from imageunlock.engine.service import UnlockService
from imageunlock.errors import (
    ARCHIVE_ERROR_MESSAGE,
    ApiUnavailableError,
    ArchiveError,
    ArchiveNotFoundError,
    AuthenticationError,
    ConfigurationError,
    DigestMismatchError,
    ImagesNotInArchiveError,
    ImagesNotVerifiedError,
    RuntimeUnavailableError,
)

from ..support.fakes import FakeKeyClient, FakeRuntime
from ..support.savetar import build, config_ids

VERSION = "2.0"
IMAGES = ("azaion/flights", "azaion/autopilot")
REFS = [f"{name}:{VERSION}" for name in IMAGES]
FRAGMENT = b"the-key-fragment"
CREDS = Credentials("edge@example.test", "pw")


@pytest.fixture
def plain() -> bytes:
    return build(REFS)


@pytest.fixture
def archive(tmp_path: Path, plain: bytes) -> Path:
    path = tmp_path / "images.enc"
    path.write_bytes(b"".join(encrypt_stream([plain], FRAGMENT)))
    return path


@pytest.fixture
def runtime() -> FakeRuntime:
    return FakeRuntime()


@pytest.fixture
def key() -> FakeKeyClient:
    return FakeKeyClient(FRAGMENT)


def service(
    runtime: FakeRuntime, key: FakeKeyClient, root: Path, credentials: Callable[[], Credentials] = lambda: CREDS
) -> UnlockService:
    return UnlockService(runtime, key.source(credentials), archive_roots=(str(root),), chunk_size=1024)


def request(path: Path, **kw) -> UnlockRequest:
    return UnlockRequest(archive_path=str(path), version=VERSION, images=IMAGES, **kw)


class Phases:
    def __init__(self) -> None:
        self.calls: list[tuple[Phase, int, int]] = []

    def __call__(self, phase: Phase, message: str, done: int, total: int) -> None:
        self.calls.append((phase, done, total))

    @property
    def order(self) -> list[Phase]:
        """The phases in the order first reported, repeats folded."""
        seen: list[Phase] = []
        for phase, _, _ in self.calls:
            if not seen or seen[-1] != phase:
                seen.append(phase)
        return seen


def test_fast_path_takes_present_images_with_their_verified_ids_and_opens_no_key_client(tmp_path, key):
    ids = {ref: f"sha256:{n:064x}" for n, ref in enumerate(REFS, 1)}
    runtime = FakeRuntime(ids)
    # no archive on disk at all: the fast path needs none
    result = service(runtime, key, tmp_path).unlock(request(tmp_path / "gone.enc", known_ids=ids))
    assert result.fast_path and result.images == ids
    assert key.opened == [] and runtime.loads == []


def test_present_images_without_verified_ids_are_unlocked_again(archive, plain, tmp_path, key):
    impostors = {ref: "sha256:" + "f" * 64 for ref in REFS}
    runtime = FakeRuntime(impostors)
    result = service(runtime, key, tmp_path).unlock(request(archive))
    assert not result.fast_path and result.images == config_ids(plain)
    assert runtime.image_ids(REFS) == config_ids(plain)  # the impostors were replaced


def test_an_image_whose_id_changed_since_verification_is_unlocked_again(archive, plain, tmp_path, key):
    verified = config_ids(plain)
    runtime = FakeRuntime({**verified, REFS[0]: "sha256:" + "e" * 64})
    result = service(runtime, key, tmp_path).unlock(request(archive, known_ids=verified))
    assert not result.fast_path and result.images == verified and len(runtime.loads) == 1


def test_first_run_unlocks_loads_once_and_compares_with_the_archive(archive, plain, tmp_path, runtime, key):
    result = service(runtime, key, tmp_path).unlock(request(archive))
    assert result.fast_path is False
    assert result.images == config_ids(plain)
    assert result.archive_bytes == archive.stat().st_size
    assert runtime.loads == [config_ids(plain)]
    assert key.opened == [CREDS] and (key.logins, key.fragments, key.closes) == (1, 1, 1)


def test_phases_are_reported_in_order_with_loading_progress_up_to_the_archive_size(archive, tmp_path, runtime, key):
    phases = Phases()
    service(runtime, key, tmp_path).unlock(request(archive), phases)
    assert phases.order == [Phase.PENDING, Phase.AUTHENTICATING, Phase.FETCHING_KEY, Phase.LOADING, Phase.VERIFYING]
    loading = [done for phase, done, _ in phases.calls if phase is Phase.LOADING]
    size = archive.stat().st_size
    assert loading == sorted(loading) and len(loading) > 2 and loading[-1] == size
    assert phases.calls[-1] == (Phase.VERIFYING, size, size)


def test_the_digest_is_checked_after_the_login_and_before_the_key_request(archive, tmp_path, runtime, key):
    """Issue 18, items 2 and 6: no one learns a file's size or a digest verdict without
    credentials the resource API accepts; the key is requested only for a matching file."""
    phases = Phases()
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    result = service(runtime, key, tmp_path).unlock(request(archive, archive_sha256=digest), phases)
    assert not result.fast_path
    seen = [phase for phase, _, _ in phases.calls]
    first_login, key_request = seen.index(Phase.AUTHENTICATING), seen.index(Phase.FETCHING_KEY)
    assert all(total == 0 for _, _, total in phases.calls[: first_login + 1])  # no size before the login
    hashed = [done for phase, done, total in phases.calls[first_login:key_request] if phase is Phase.PENDING and total]
    assert hashed and hashed[-1] == archive.stat().st_size


def test_digest_mismatch_fails_after_the_login_and_before_any_key_request(archive, tmp_path, runtime, key):
    with pytest.raises(DigestMismatchError) as caught:
        service(runtime, key, tmp_path).unlock(request(archive, archive_sha256="0" * 64))
    assert not caught.value.transient and "0" * 64 in caught.value.message
    assert key.logins == 1 and key.fragments == 0 and key.closes == 1
    assert runtime.loads == [] and runtime.images == {}


def test_without_accepted_credentials_nothing_about_the_archive_is_read_or_shown(archive, tmp_path, runtime):
    """A tenant with no valid credentials names another's archive and a digest guess: no
    hashing, no size, no verdict on the guess — only the login failure."""
    phases = Phases()
    key = FakeKeyClient(FRAGMENT, login_error=AuthenticationError("the resource API refused the credentials"))
    with pytest.raises(AuthenticationError):
        service(runtime, key, tmp_path).unlock(request(archive, archive_sha256="0" * 64), phases)
    assert all(total == 0 for _, _, total in phases.calls)
    assert key.fragments == 0 and runtime.loads == []


def test_a_missing_secret_costs_no_file_read(archive, tmp_path, runtime, key, monkeypatch):
    from imageunlock.engine import service as module

    monkeypatch.setattr(module, "open_archive", lambda *a: pytest.fail("the archive was opened"))

    def no_secret() -> Credentials:
        raise ConfigurationError("Secret ns/creds not found")

    with pytest.raises(ConfigurationError):
        service(runtime, key, tmp_path, no_secret).unlock(request(archive, archive_sha256="0" * 64))
    assert key.opened == []


def test_a_wrong_key_is_the_uniform_archive_error_and_loads_nothing(archive, tmp_path, runtime):
    key = FakeKeyClient(b"some-other-fragment")
    with pytest.raises(ArchiveError) as caught:
        service(runtime, key, tmp_path).unlock(request(archive))
    assert caught.value.message == ARCHIVE_ERROR_MESSAGE and not caught.value.transient
    assert runtime.loads == [] and runtime.images == {}
    assert key.closes == 1  # the session is closed before the archive is read


def test_an_archive_without_every_requested_image_loads_nothing(tmp_path, runtime, key):
    path = tmp_path / "partial.enc"
    path.write_bytes(b"".join(encrypt_stream([build(REFS[:1])], FRAGMENT)))
    with pytest.raises(ImagesNotInArchiveError) as caught:
        service(runtime, key, tmp_path).unlock(request(path))
    assert caught.value.missing == [REFS[1]]
    assert runtime.loads == [] and runtime.images == {}


def test_an_image_missing_after_the_load_is_not_verified(archive, tmp_path, runtime, key):
    runtime.drop_after_load = {REFS[1]}
    with pytest.raises(ImagesNotVerifiedError) as caught:
        service(runtime, key, tmp_path).unlock(request(archive))
    assert caught.value.missing == [REFS[1]] and caught.value.wrong == []
    assert not caught.value.transient and REFS[1] in caught.value.message


def test_an_image_with_another_id_after_the_load_is_not_verified(archive, tmp_path, runtime, key):
    runtime.alter_after_load = {REFS[0]: "sha256:" + "a" * 64}
    with pytest.raises(ImagesNotVerifiedError) as caught:
        service(runtime, key, tmp_path).unlock(request(archive))
    assert caught.value.missing == [] and caught.value.wrong == [REFS[0]]


def test_a_runtime_that_is_down_is_a_transient_failure(archive, tmp_path, runtime, key):
    runtime.unreachable = True
    with pytest.raises(RuntimeUnavailableError) as caught:
        service(runtime, key, tmp_path).unlock(request(archive))
    assert caught.value.transient


def test_a_runtime_that_is_down_during_the_fast_path_check_is_transient(tmp_path, runtime, key):
    runtime.unreachable = True
    known = dict.fromkeys(REFS, "sha256:" + "1" * 64)
    with pytest.raises(RuntimeUnavailableError):
        service(runtime, key, tmp_path).unlock(request(tmp_path / "x.enc", known_ids=known))
    assert key.opened == []


@pytest.mark.parametrize(
    "error, transient", [(AuthenticationError("bad credentials"), False), (ApiUnavailableError("503"), True)]
)
def test_a_login_failure_passes_through_without_a_key_request(archive, tmp_path, runtime, error, transient):
    key = FakeKeyClient(FRAGMENT, login_error=error)
    with pytest.raises(type(error)) as caught:
        service(runtime, key, tmp_path).unlock(request(archive))
    assert caught.value.transient is transient
    assert key.fragments == 0 and key.closes == 1 and runtime.loads == []


def test_a_missing_archive_stalls_before_any_login_and_says_what_to_do(tmp_path, runtime, key):
    missing = tmp_path / "missing.enc"
    with pytest.raises(ArchiveNotFoundError) as caught:
        service(runtime, key, tmp_path).unlock(request(missing))
    message = caught.value.message
    assert str(missing) in message and "put the archive on the node" in message
    assert not caught.value.transient and key.opened == []


def test_a_missing_archive_does_not_tell_which_images_a_node_holds(tmp_path, key):
    """Review of issue 18 (low): the message said which images a node holds (not loaded /
    present but not verified), to anyone with a Secret of junk credentials."""
    holds = FakeRuntime({REFS[0]: "sha256:" + "b" * 64})
    empty = FakeRuntime()
    messages = []
    for runtime in (holds, empty):
        with pytest.raises(ArchiveNotFoundError) as caught:
            service(runtime, key, tmp_path).unlock(request(tmp_path / "missing.enc"))
        messages.append(caught.value.message)
    assert messages[0] == messages[1] and not any(ref in messages[0] for ref in REFS)


def test_the_command_line_run_by_the_archives_owner_is_told_which_images_are_absent(tmp_path, runtime, key):
    cli = UnlockService(runtime, key.source(lambda: CREDS))  # no archive roots: the CLI
    with pytest.raises(ArchiveNotFoundError) as caught:
        cli.unlock(request(tmp_path / "missing.enc"))
    assert "not loaded" in caught.value.message and all(ref in caught.value.message for ref in REFS)


def test_a_runtime_that_is_down_costs_no_login_and_no_key(archive, tmp_path, runtime, key):
    """Found with containerd: the service logged in and fetched the key before it first
    touched the runtime."""
    runtime.unreachable = True
    with pytest.raises(RuntimeUnavailableError):
        service(runtime, key, tmp_path).unlock(request(archive))
    assert key.logins == 0 and key.fragments == 0
