"""The error taxonomy: which failures are transient, and the reasons status shows."""

from __future__ import annotations

import inspect

import pytest

from imageunlock import errors


def all_errors() -> list[type[errors.UnlockError]]:
    return [c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, errors.UnlockError)]


TRANSIENT = {
    "TransientError",
    "ApiUnavailableError",
    "RuntimeUnavailableError",
    "BusyError",
    "AwaitingLoginVerdictError",  # another node tries the same credentials first (issue 21)
    "RuntimeBusyError",
    "LoadError",
    "InsufficientStorageError",  # a node fixes it by freeing space: retried with backoff
    "NodeDiskPressureError",  # kubelet (or the admin) frees space: retried, at once when it clears
    "KubernetesUnavailableError",
    "TpmUnavailableError",  # the TPM answers again (swtpm restarted, a busy TPM): retried
    "InternalError",
}


@pytest.mark.parametrize("cls", all_errors(), ids=lambda c: c.__name__)
def test_only_unavailable_parts_and_bugs_are_transient(cls):
    """Issue 8, item 7: every failure caused by archive content or the user is permanent."""
    assert cls.transient is (cls.__name__ in TRANSIENT)


def test_reasons_are_camel_case_words_and_unique_per_class():
    reasons = {cls.__name__: cls.reason for cls in all_errors()}
    assert all(r[:1].isupper() and r.isalnum() for r in reasons.values()), reasons
    # LoginRefusedError is AuthenticationError narrowed to the login call (issue 21: the verdict
    # other nodes adopt): the same condition reason on purpose
    concrete = [r for name, r in reasons.items() if name not in ("UnlockError", "TransientError", "LoginRefusedError")]
    assert len(concrete) == len(set(concrete))


def test_the_archive_error_is_always_the_same_message():
    assert str(errors.ArchiveError()) == errors.ARCHIVE_ERROR_MESSAGE == errors.ArchiveError().message


def test_image_errors_name_the_refs():
    error = errors.ImagesNotVerifiedError(["a:1"], ["b:1"])
    assert "missing: a:1" in error.message and "unexpected image ID: b:1" in error.message
    assert "a:1, b:1" in errors.ImagesNotInArchiveError(["a:1", "b:1"]).message


def test_insufficient_storage_names_the_runtimes_words_and_the_archives_size():
    error = errors.InsufficientStorageError("containerd", "ctr: write x: no space left on device", 3 << 20)
    assert error.reason == "InsufficientStorage" and error.transient
    assert "no space left on device" in error.message and "3.0 MiB" in error.message
    # the service knows the whole archive's size; the runtime only what it took before failing
    whole = error.for_archive(64 << 20)
    assert "64.0 MiB" in whole.message and whole.words == error.words and whole.archive_bytes == 64 << 20
