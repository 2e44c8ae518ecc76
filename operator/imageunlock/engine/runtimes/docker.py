"""Adapter: the Docker Engine, through the docker SDK.

``load`` streams an iterator of plaintext chunks into the Engine's image-load API as a
chunked HTTP upload: no plaintext file, no whole archive in memory. If the iterator raises
(a broken or tampered archive), the upload is cut off short, the Engine — which unpacks the
whole body before it loads anything — loads nothing, and the iterator's own error is
re-raised unchanged.

Image lifecycle: the Engine has no pinning (``unpin`` does nothing) and no labels of ours on
an image, so what this node loaded, for which ImageUnlock, is kept in a node-local JSON file
(owned.py). ``remove`` untags by ref (``docker rmi REF`` without force: the image goes only
with its last name) and keeps every ref whose image ID any container — running or stopped —
was created from.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence

import docker
import docker.errors
import requests

from imageunlock.engine.models import OwnershipRecord, check_owner
from imageunlock.engine.runtimes import DOCKER
from imageunlock.engine.runtimes.importlock import exclusive_import
from imageunlock.engine.runtimes.owned import OwnedFile, state_dir
from imageunlock.errors import (
    ArchiveRejectedError,
    InsufficientStorageError,
    LoadError,
    RuntimeUnavailableError,
    UnlockError,
)

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 900.0  # one load of a multi-GiB archive easily passes the SDK's 60 s
DEFAULT_HOST = next(str(s.default) for s in DOCKER.settings if s.key == "docker_host")


def build(settings: Mapping[str, str | None], timeout: float | None) -> DockerRuntime:
    """The runtime registry's factory (runtimes/__init__.py)."""
    return DockerRuntime(base_url=settings.get("docker_host"), timeout=timeout or DEFAULT_TIMEOUT)


def _refusal(text: str, fed: int = 0) -> UnlockError:
    """Classify an Engine refusal of a load (``fed``: the bytes it was given). Our stream
    checks passed, so the bytes are the archive's own: a content error (a layer that is not a
    tar, ...) fails the same way every time and is permanent; only trouble on the node is
    transient, and a full disk says so."""
    text = text.strip()[:500]
    verdict = DOCKER.classifier.verdict(text)
    if verdict == "no-space":
        return InsufficientStorageError("the Docker Engine", text, fed)
    if verdict == "node":
        return LoadError(f"Docker Engine could not load the archive: {text}")
    return ArchiveRejectedError(
        f"Docker Engine refused the archive's content: {text}; it passed the stream checks, so the "
        "archive itself is malformed: rebuild it (retrying the same archive cannot help)"
    )


class DockerRuntime:
    name = DOCKER.name

    def __init__(
        self, base_url: str | None = None, timeout: float = DEFAULT_TIMEOUT, state_dir: str | None = None
    ) -> None:
        self.base_url = base_url or DEFAULT_HOST
        self.timeout = timeout
        self.state_dir = state_dir  # None: IMAGEUNLOCK_STATE_DIR, read when first needed
        self._owned: OwnedFile | None = None
        self._client: docker.DockerClient | None = None
        self._lock = threading.Lock()

    # The client is made on first use: version negotiation talks to the Engine, and the
    # operator must start (and report) while the Engine is still down.
    @property
    def client(self) -> docker.DockerClient:
        with self._lock:
            if self._client is None:
                try:
                    self._client = docker.DockerClient(base_url=self.base_url, timeout=self.timeout)
                except docker.errors.DockerException as exc:
                    raise self._unavailable(exc) from None
            return self._client

    def _unavailable(self, exc: BaseException) -> RuntimeUnavailableError:
        return RuntimeUnavailableError(
            f"Docker Engine at {self.base_url} is not reachable ({type(exc).__name__}); "
            "check that it runs and that the socket is mounted"
        )

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def ping(self) -> None:
        try:
            self.client.ping()
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            self._forget()
            raise self._unavailable(exc) from None

    def _forget(self) -> None:
        with self._lock:
            self._client = None

    def image_ids(self, refs: Iterable[str]) -> dict[str, str | None]:
        """``{ref: image ID or None when absent}``."""
        result: dict[str, str | None] = {}
        for ref in refs:
            try:
                result[ref] = self.client.api.inspect_image(ref)["Id"]
            except docker.errors.ImageNotFound:
                result[ref] = None
            except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
                self._forget()
                raise self._unavailable(exc) from None
        return result

    def load(self, chunks: Iterable[bytes], refs: Sequence[str] = (), owner: str | None = None) -> list[str]:
        """Upload an image archive; return what the Engine said it loaded. One load at a time
        per Engine on this node (importlock.py): the Engine copies each load body to its temp
        directory first, so loads one after another bound that copy to one archive. With
        ``owner``, the requested refs it loaded are recorded as that ImageUnlock's."""
        if owner is not None:
            check_owner(owner)
        with exclusive_import(self.name, self.base_url, self.timeout):
            loaded = self._load(chunks)
            if owner is not None:
                self._record(owner, [ref for ref in refs if ref in loaded])
            return loaded

    # -- image lifecycle ---------------------------------------------------------------------

    def owned(self) -> OwnedFile:
        """This Engine's ownership file, named after the Engine's ID (it stays the same across
        restarts of the Engine and of the agent; two Engines on a node never share one)."""
        if self._owned is None:
            try:
                engine_id = str(self.client.info()["ID"])
            except (docker.errors.DockerException, requests.exceptions.RequestException, KeyError) as exc:
                self._forget()
                raise self._unavailable(exc) from None
            self._owned = OwnedFile(self.state_dir or state_dir(), self.name, engine_id)
        return self._owned

    def _record(self, owner: str, refs: Sequence[str]) -> None:
        ids = self.image_ids(refs)
        try:
            entries = self.owned().read()
            entries.update({ref: (owner, image_id) for ref, image_id in ids.items() if image_id})
            self.owned().write(entries)
        except OSError as exc:  # the images are loaded; only their later reclaim is lost
            log.warning(
                "could not record that %s loaded %d image(s) in %s (%s): they will never be reclaimed",
                owner,
                len(ids),
                self.owned().path,
                exc.strerror or exc,
            )

    def owned_refs(self) -> list[OwnershipRecord]:
        """The refs recorded as loaded here that still name the image ID that was loaded (a
        ref someone re-tagged or removed since is not ours any more)."""
        entries = self.owned().read()
        ids = self.image_ids(list(entries))
        return [
            OwnershipRecord(ref, owner) for ref, (owner, image_id) in sorted(entries.items()) if ids[ref] == image_id
        ]

    def unpin(self, refs: Sequence[str]) -> list[str]:
        """Nothing: the Docker Engine has no pinning and no image garbage collection of its own
        (only kubelet's, through cri-dockerd, which pins nothing). Returns ``[]``."""
        return []

    def pin(self, refs: Sequence[str]) -> list[str]:
        """Nothing, as :meth:`unpin`. Returns ``[]``."""
        return []

    def remove(self, refs: Sequence[str]) -> tuple[list[str], list[str]]:
        """``docker rmi REF`` (no force) for each ref whose image no container — running or
        stopped, ``docker ps -a`` — was created from (compared by image ID). By ref, never by
        ID: an image that another tag still names only loses this tag. Returns ``(removed or
        already absent, kept because a container uses the image)``; removed refs leave the
        ownership file. Holds the import lock: no load runs meanwhile."""
        with exclusive_import(self.name, self.base_url, self.timeout):
            try:
                used = {c.get("ImageID") for c in self.client.api.containers(all=True)}
            except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
                self._forget()
                raise self._unavailable(exc) from None
            removed: list[str] = []
            kept: list[str] = []
            for ref, image_id in self.image_ids(refs).items():
                if image_id is not None and (image_id in used or not self._untag(ref)):
                    kept.append(ref)
                else:
                    removed.append(ref)
            entries = self.owned().read()
            if any(ref in entries for ref in removed):
                self.owned().write({ref: entry for ref, entry in entries.items() if ref not in removed})
            return removed, kept

    def _untag(self, ref: str) -> bool:
        """``docker rmi REF``; False when the Engine refuses because a container uses the
        image (one created since the check)."""
        try:
            self.client.api.remove_image(ref, force=False, noprune=False)
        except docker.errors.ImageNotFound:
            return True
        except docker.errors.APIError as exc:
            if exc.status_code == 409:
                return False
            raise self._unavailable(exc) from None
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            self._forget()
            raise self._unavailable(exc) from None
        return True

    def _load(self, chunks: Iterable[bytes]) -> list[str]:
        failure: list[BaseException] = []
        fed = [0]

        def guarded() -> Iterator[bytes]:
            try:
                for chunk in chunks:
                    fed[0] += len(chunk)
                    yield chunk
            except BaseException as exc:  # remember ours, so SDK wrapping can't hide it
                failure.append(exc)
                raise

        loaded: list[str] = []
        try:
            for message in self.client.api.load_image(guarded(), quiet=True):
                if "error" in message:
                    raise _refusal(str(message["error"]), fed[0])
                stream = message.get("stream", "")
                for prefix in ("Loaded image: ", "Loaded image ID: "):
                    if stream.startswith(prefix):
                        loaded.append(stream[len(prefix) :].strip())
        except UnlockError:
            raise
        except docker.errors.APIError as exc:
            if failure:
                raise failure[0] from None
            raise _refusal(str(exc.explanation or exc), fed[0]) from None
        except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as exc:
            if failure:
                raise failure[0] from None
            self._forget()
            raise self._unavailable(exc) from None
        if failure:  # the SDK swallowed our error: still never a success
            raise failure[0] from None
        return loaded

    def remove_image(self, ref: str) -> None:
        with contextlib.suppress(docker.errors.ImageNotFound):
            self.client.api.remove_image(ref, force=True)
