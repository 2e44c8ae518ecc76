"""Parsing an ImageUnlock ``spec`` (pure).

The CRD's OpenAPI schema already refuses most bad input at ``kubectl apply`` time; this
module re-checks everything the operator relies on (a cluster may run an older CRD, and
the same rules serve the CLI), and reports *all* problems at once with the field path.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from imageunlock.engine import runtimes
from imageunlock.engine.keys.apiurl import allowed, parse_api_url
from imageunlock.engine.models import DEFAULT_IMAGES, UnlockRequest
from imageunlock.errors import ConfigurationError

# Docker's grammar for a tag and for a repository name (with an optional registry host).
TAG_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
IMAGE_PATTERN = rf"^(?:[A-Za-z0-9.-]+(?::[0-9]+)?/)?{_COMPONENT}(?:/{_COMPONENT})*$"
SHA256_PATTERN = r"^[0-9a-fA-F]{64}$"
SECRET_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"


@dataclass(frozen=True)
class UnlockSpec:
    archive_path: str
    version: str
    images: tuple[str, ...]
    api_url: str
    secret_name: str
    runtime: str = "docker"  # resolved: never "auto"
    archive_sha256: str | None = None

    def to_request(self, known_ids: Mapping[str, str] | None = None) -> UnlockRequest:
        return UnlockRequest(
            archive_path=self.archive_path,
            version=self.version,
            images=self.images,
            archive_sha256=self.archive_sha256,
            known_ids=dict(known_ids or {}),
        )


def url_allowed(url: str, allowed_urls: Sequence[str]) -> bool:
    """Whether ``url`` parses strictly and lies under one of the ``allowed_urls`` bases
    (same scheme, host and port; a path at or below on a segment boundary)."""
    try:
        target = parse_api_url(url)
    except ConfigurationError:
        return False
    bases = []
    for base in allowed_urls:
        try:
            bases.append(parse_api_url(base))
        except ConfigurationError:
            continue
    return allowed(target, bases)


def parse_spec(
    spec: Mapping[str, object],
    default_api_url: str | None,
    allowed_api_urls: Sequence[str] = (),
    runtime: str = "docker",
) -> UnlockSpec:
    """``allowed_api_urls`` empty means any URL (the CLI); the operator always passes a list,
    since the credentials Secret is sent to whatever URL the spec names. ``runtime`` is the
    one the operator loads into: what ``auto`` means, and the only one it serves."""
    problems: list[str] = []

    def text(path: str, value: object, pattern: str | None = None, hint: str = "") -> str:
        if not isinstance(value, str) or not value:
            problems.append(f"spec.{path} is required")
            return ""
        if pattern and not re.fullmatch(pattern, value):
            problems.append(f"spec.{path} {value!r} is invalid{hint}")
        return value

    archive_path = text("archivePath", spec.get("archivePath"))
    if archive_path and not archive_path.startswith("/"):
        problems.append(f"spec.archivePath {archive_path!r} must be an absolute path")
    version = text("version", spec.get("version"), TAG_PATTERN, " (a Docker tag: letters, digits, _ . -)")

    raw_images = spec.get("images") or list(DEFAULT_IMAGES)
    images: list[str] = []
    if not isinstance(raw_images, list):
        problems.append("spec.images must be a list of image names")
    else:
        for i, name in enumerate(raw_images):
            images.append(text(f"images[{i}]", name, IMAGE_PATTERN, " (an image name without a tag)"))
        if len(set(images)) != len(images):
            problems.append("spec.images lists an image twice")

    api = spec.get("resourceApi") or {}
    if not isinstance(api, Mapping):
        problems.append("spec.resourceApi must be an object")
        api = {}
    api_url = api.get("url") or default_api_url
    if not api_url:
        problems.append("spec.resourceApi.url is required (the operator has no RESOURCE_API_URL default)")
    else:
        try:
            parsed = parse_api_url(api_url, "spec.resourceApi.url")
        except ConfigurationError as exc:
            problems.append(exc.message)
        else:
            api_url = parsed.url  # requests are only ever built from the canonical form
            if allowed_api_urls and not url_allowed(api_url, allowed_api_urls):
                problems.append(
                    f"spec.resourceApi.url {api_url!r} is not an allowed resource API "
                    f"({', '.join(allowed_api_urls)}; operator setting IMAGEUNLOCK_API_URL_ALLOWLIST): "
                    "the credentials are only ever sent to allowed APIs"
                )
    ref = api.get("credentialsSecretRef") or {}
    secret_name = text(
        "resourceApi.credentialsSecretRef.name",
        ref.get("name") if isinstance(ref, Mapping) else None,
        SECRET_NAME_PATTERN,
        " (a Secret name in the same namespace)",
    )

    wanted = spec.get("runtime") or runtimes.AUTO
    if wanted not in (known := (*runtimes.names(), runtimes.AUTO)):  # spec.runtime: a name, or the node's own
        problems.append(f"spec.runtime {wanted!r} is not one of {', '.join(known)}")
    elif wanted not in (runtimes.AUTO, runtime):
        problems.append(
            f"spec.runtime {wanted!r} is not this node's runtime ({runtime}: the Node's "
            f"containerRuntimeVersion, or the agent setting IMAGEUNLOCK_RUNTIME): use auto, or select "
            f"{wanted} nodes with spec.nodeSelector"
        )

    digest = spec.get("archiveSha256")
    if digest is not None:
        text("archiveSha256", digest, SHA256_PATTERN, " (64 hexadecimal digits)")

    if problems:
        raise ConfigurationError("; ".join(problems))
    return UnlockSpec(
        archive_path=archive_path,
        version=version,
        images=tuple(images),
        api_url=str(api_url),
        secret_name=secret_name,
        runtime=runtime,
        archive_sha256=str(digest).lower() if digest else None,
    )
