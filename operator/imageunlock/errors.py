"""Error taxonomy shared by the engine, the CLI and the operator.

Each error carries a ``reason`` (a CamelCase word for a Kubernetes condition) and whether it
is ``transient`` (retry with backoff: network, 5xx, a runtime that is down) or not (a user
mistake that retrying cannot fix: bad credentials, a wrong path, a corrupt archive).

Messages are written for the person who has to fix the problem, and never contain a
password, token or key fragment: they are shown in statuses, events and logs.
"""

from __future__ import annotations

from typing import Literal


class UnlockError(Exception):
    reason = "UnlockFailed"
    transient = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class TransientError(UnlockError):
    reason = "TransientFailure"
    transient = True


class ApiUnavailableError(TransientError):
    reason = "ResourceApiUnavailable"


class RuntimeUnavailableError(TransientError):
    reason = "RuntimeUnavailable"


class BusyError(TransientError):
    reason = "ArchiveBusy"


class RuntimeBusyError(TransientError):
    """Another import into the same runtime on this node holds the import lock."""

    reason = "RuntimeBusy"


class AuthenticationError(UnlockError):
    reason = "AuthenticationFailed"


class LoginRefusedError(AuthenticationError):
    """The resource API refused the login itself (401/403): the credentials are wrong. Same
    reason as any authentication failure; other nodes may take this verdict for the same
    version of the Secret instead of trying the same password (agent/verdicts.py)."""


class AwaitingLoginVerdictError(TransientError):
    """Another node tries this version of the credentials first; this one waits for its
    verdict rather than sending the same, possibly wrong, password too."""

    reason = "AwaitingLoginVerdict"


class ApiRejectedError(UnlockError):
    reason = "ResourceApiRejected"


class ConfigurationError(UnlockError):
    """The request itself is wrong: spec, Secret, paths, settings."""

    reason = "InvalidConfiguration"


class ArchiveNotFoundError(UnlockError):
    reason = "ArchiveNotFound"


class DigestMismatchError(UnlockError):
    reason = "ArchiveDigestMismatch"


class ImagesNotVerifiedError(UnlockError):
    reason = "ImagesMissing"

    def __init__(self, missing: list[str], wrong: list[str] | None = None) -> None:
        self.missing = list(missing)
        self.wrong = list(wrong or [])
        parts = []
        if self.missing:
            parts.append("missing: " + ", ".join(self.missing))
        if self.wrong:
            parts.append("unexpected image ID: " + ", ".join(self.wrong))
        super().__init__("images not verified after load (" + "; ".join(parts) + ")")


class LoadError(TransientError):
    """The runtime refused an archive that had passed our own checks (disk full, ...).

    Its own words are kept; they hold no secret.
    """

    reason = "LoadFailed"


class InsufficientStorageError(LoadError):
    """The runtime ran out of disk space while importing (``no space left on device``, a disk
    quota). Transient: the node fixes it by freeing space (or a reclaim of superseded images
    does), so it is retried with backoff. Nothing of the import stays (each runtime undoes it).

    Carries the runtime's own words and the archive's size: a runtime needs about twice that
    free while it imports (Docker: the load body's temp copy, then the layers; containerd: the
    blobs, then their snapshots)."""

    reason = "InsufficientStorage"

    def __init__(self, runtime: str, words: str, archive_bytes: int) -> None:
        self.runtime = runtime
        self.words = words
        self.archive_bytes = archive_bytes
        super().__init__(
            f"not enough disk space on the node for the {_mib(archive_bytes)} archive ({runtime} needs about "
            f"twice that free while it imports; nothing was loaded): {words}"
        )

    def for_archive(self, archive_bytes: int) -> InsufficientStorageError:
        """The same error, naming the archive's full size (a runtime only counts what it was
        given before it failed)."""
        return InsufficientStorageError(self.runtime, self.words, max(archive_bytes, self.archive_bytes))


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"


class NodeDiskPressureError(TransientError):
    """The node reports kubelet's ``DiskPressure`` condition: no import starts (it would fill
    the disk further, and kubelet may be evicting pods to free it). Images already loaded stay
    usable; the import starts once the condition clears (the agent watches its Node)."""

    reason = "NodeDiskPressure"


class ForeignTagsError(UnlockError):
    """The archive would create or move image tags other than the requested ``NAME:VERSION``
    refs (e.g. ``nginx:latest``): refused before its tail is released, nothing loaded."""

    reason = "ArchiveHasForeignTags"


class ArchiveRejectedError(UnlockError):
    """The runtime refused archive content that passed our own checks (a layer that is not a
    tar, ...): retrying the same bytes cannot help, so it is permanent."""

    reason = "ArchiveRejected"


class RefConflictError(UnlockError):
    """Another ImageUnlock, created earlier, loads the same ref from another archive."""

    reason = "RefConflict"


ARCHIVE_ERROR_MESSAGE = (
    "archive could not be unlocked: the key does not match or the archive is corrupt, truncated or not an image archive"
)


class ArchiveError(UnlockError):
    """The archive could not be decrypted or unpacked. Always the same message."""

    reason = "ArchiveInvalid"

    def __init__(self) -> None:
        super().__init__(ARCHIVE_ERROR_MESSAGE)


class ImagesNotInArchiveError(UnlockError):
    """The archive is intact but does not hold every image asked for (nothing was loaded)."""

    reason = "ImagesNotInArchive"

    def __init__(self, missing: list[str]) -> None:
        self.missing = missing
        super().__init__(
            "archive does not contain " + ", ".join(missing) + "; nothing was loaded "
            "(check spec.version and spec.images against the archive)"
        )


class KeySealError(UnlockError):
    """Sealing a key to the node's TPM, or unsealing it, failed for a reason other than the two
    below (the owner hierarchy has an auth value, the SHA-256 PCR bank is not allocated, an
    unforeseen TPM answer). The caller gets the key from the resource API instead. Messages
    carry the TPM's own response code and words, never key bytes."""

    reason = "KeySealFailed"


class TpmUnavailableError(KeySealError):
    """The TPM could not be reached (no device, the software TPM is down, the tools are not
    installed) or answered "busy, try again" (out of object slots, lockout, retry): retried."""

    reason = "TpmUnavailable"
    transient = True


UnsealCause = Literal["OtherArchive", "OtherTpm", "PcrChanged", "BlobInvalid"]


class UnsealRefusedError(KeySealError):
    """The TPM, or the blob's own header, refuses to give the key back: the blob was sealed for
    another archive (``OtherArchive``), by another TPM or before this one was cleared
    (``OtherTpm``), under PCR values that have changed since (``PcrChanged``), or is not a
    sealed blob at all (``BlobInvalid``). Retrying the same blob cannot help; the caller gets
    the key from the resource API and seals it again. ``cause`` is one of those stable words."""

    reason = "UnsealRefused"

    def __init__(self, cause: UnsealCause, message: str) -> None:
        self.cause: UnsealCause = cause
        super().__init__(message)


class KubernetesUnavailableError(TransientError):
    reason = "KubernetesApiUnavailable"


class InternalError(UnlockError):
    """A bug or an unforeseen library error: retried with backoff, details only in the log."""

    reason = "InternalError"
    transient = True


def reasons() -> list[str]:
    """Every condition reason an error here can carry, sorted (the failure counter's labels)."""
    found, todo = set(), [UnlockError]
    while todo:
        cls = todo.pop()
        found.add(cls.reason)
        todo += cls.__subclasses__()
    return sorted(found)
