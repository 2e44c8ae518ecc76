"""Adapter: the Docker Engine, through the docker SDK.

``load`` streams an iterator of plaintext chunks into the Engine's image-load API as a
chunked HTTP upload: no plaintext file, no whole archive in memory. If the iterator raises
(a broken or tampered archive), the upload is cut off short, the Engine — which unpacks the
whole body before it loads anything — loads nothing, and the iterator's own error is
re-raised unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence

import docker
import docker.errors
import requests

from imageunlock.engine.runtimes import DOCKER
from imageunlock.engine.runtimes.importlock import exclusive_import
from imageunlock.errors import ArchiveRejectedError, LoadError, RuntimeUnavailableError, UnlockError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 900.0  # one load of a multi-GiB archive easily passes the SDK's 60 s
DEFAULT_HOST = next(str(s.default) for s in DOCKER.settings if s.key == "docker_host")


def build(settings: Mapping[str, str | None], timeout: float | None) -> DockerRuntime:
    """The runtime registry's factory (runtimes/__init__.py)."""
    return DockerRuntime(base_url=settings.get("docker_host"), timeout=timeout or DEFAULT_TIMEOUT)


def _refusal(text: str) -> UnlockError:
    """Classify an Engine refusal of a load. Our stream checks passed, so the bytes are the
    archive's own: a content error (a layer that is not a tar, ...) fails the same way every
    time and is permanent; only trouble on the node is transient."""
    text = text.strip()[:500]
    if DOCKER.classifier.verdict(text) != "content":
        return LoadError(f"Docker Engine could not load the archive: {text}")
    return ArchiveRejectedError(
        f"Docker Engine refused the archive's content: {text}; it passed the stream checks, so the "
        "archive itself is malformed: rebuild it (retrying the same archive cannot help)"
    )


class DockerRuntime:
    name = DOCKER.name

    def __init__(self, base_url: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.base_url = base_url or DEFAULT_HOST
        self.timeout = timeout
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

    def load(self, chunks: Iterable[bytes], refs: Sequence[str] = ()) -> list[str]:
        """Upload an image archive; return what the Engine said it loaded. One load at a time
        per Engine on this node (importlock.py): the Engine copies each load body to its temp
        directory first, so loads one after another bound that copy to one archive."""
        with exclusive_import(self.name, self.base_url, self.timeout):
            return self._load(chunks)

    def _load(self, chunks: Iterable[bytes]) -> list[str]:
        failure: list[BaseException] = []

        def guarded() -> Iterator[bytes]:
            try:
                yield from chunks
            except BaseException as exc:  # remember ours, so SDK wrapping can't hide it
                failure.append(exc)
                raise

        loaded: list[str] = []
        try:
            for message in self.client.api.load_image(guarded(), quiet=True):
                if "error" in message:
                    raise _refusal(str(message["error"]))
                stream = message.get("stream", "")
                for prefix in ("Loaded image: ", "Loaded image ID: "):
                    if stream.startswith(prefix):
                        loaded.append(stream[len(prefix) :].strip())
        except UnlockError:
            raise
        except docker.errors.APIError as exc:
            if failure:
                raise failure[0] from None
            raise _refusal(str(exc.explanation or exc)) from None
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
