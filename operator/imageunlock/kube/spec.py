"""Parsing an ImageUnlock ``spec`` (pure).

The CRD's OpenAPI schema already refuses most bad input at ``kubectl apply`` time; this
module re-checks everything the operator relies on (a cluster may run an older CRD, and
the same rules serve the CLI), and reports *all* problems at once with the field path.

Two steps: :func:`parse_spec` reads the spec alone (the same answer on every node), and
:func:`check_runtime` holds the result to the runtime of the node it is to be unlocked on
(what ``auto`` means there, and whether a named runtime is that one).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from imageunlock.defaults import DEFAULT_IMAGES
from imageunlock.engine import keys, runtimes
from imageunlock.engine.models import UnlockRequest
from imageunlock.engine.reclaim import DEFAULT_POLICY, ReclaimPolicy
from imageunlock.errors import ConfigurationError

# Docker's grammar for a tag and for a repository name (with an optional registry host).
TAG_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
IMAGE_PATTERN = rf"^(?:[A-Za-z0-9.-]+(?::[0-9]+)?/)?{_COMPONENT}(?:/{_COMPONENT})*$"
SHA256_PATTERN = r"^[0-9a-fA-F]{64}$"
MAX_KEY_CACHE = 30 * 24 * 3600  # spec.keyCacheSeconds: at most 30 days (the CRD's maximum)
KEY_SEALING = ("None", "TPM")
MAX_PCR = 23


@dataclass(frozen=True)
class UnlockSpec:
    archive_path: str
    version: str
    images: tuple[str, ...]
    key_source: keys.KeySourceSpec
    runtime: str = runtimes.AUTO  # as asked (a registered name or auto); check_runtime resolves it
    archive_sha256: str | None = None
    reclaim_policy: ReclaimPolicy = DEFAULT_POLICY
    key_cache_seconds: int = 0  # 0: the key is fetched per unlock (agent/reconciler.py)

    @property
    def refs(self) -> list[str]:
        return [f"{name}:{self.version}" for name in self.images]

    key_sealing: str = "None"  # or "TPM": the key sealed to the node's TPM (engine/keys/sealed.py)
    key_sealing_pcrs: tuple[int, ...] = ()

    def to_request(self, known_ids: Mapping[str, str] | None = None, owner: str | None = None) -> UnlockRequest:
        return UnlockRequest(
            archive_path=self.archive_path,
            version=self.version,
            images=self.images,
            archive_sha256=self.archive_sha256,
            known_ids=dict(known_ids or {}),
            owner=owner,
        )


def parse_spec(
    spec: Mapping[str, object],
    default_api_url: str | None,
    allowed_api_urls: Sequence[str] = (),
) -> UnlockSpec:
    """``allowed_api_urls`` empty means any URL (the CLI); the operator always passes a list,
    since the credentials Secret is sent to whatever URL the spec names. ``spec.runtime`` is
    only checked to be a registered name or ``auto`` here: :func:`check_runtime` is the node's
    part."""
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

    key_source = _key_source(spec, keys.KeySettings(default_api_url, tuple(allowed_api_urls)), problems)

    wanted = spec.get("runtime") or runtimes.AUTO
    if wanted not in (known := (*runtimes.names(), runtimes.AUTO)):  # spec.runtime: a name, or the node's own
        problems.append(f"spec.runtime {wanted!r} is not one of {', '.join(known)}")

    digest = spec.get("archiveSha256")
    if digest is not None:
        text("archiveSha256", digest, SHA256_PATTERN, " (64 hexadecimal digits)")

    policy = spec.get("reclaimPolicy") or DEFAULT_POLICY.value
    if policy not in (known := tuple(p.value for p in ReclaimPolicy)):
        problems.append(f"spec.reclaimPolicy {policy!r} is not one of {', '.join(known)}")
    cache = spec.get("keyCacheSeconds")
    if cache is not None and (isinstance(cache, bool) or not isinstance(cache, int) or not 0 <= cache <= MAX_KEY_CACHE):
        problems.append(f"spec.keyCacheSeconds {cache!r} must be a whole number of seconds from 0 to {MAX_KEY_CACHE}")
        cache = 0
    sealing, pcrs = _key_sealing(spec, problems)

    if problems:
        raise ConfigurationError("; ".join(problems))
    return UnlockSpec(
        archive_path=archive_path,
        version=version,
        images=tuple(images),
        key_source=key_source,
        runtime=str(wanted),
        archive_sha256=str(digest).lower() if digest else None,
        reclaim_policy=ReclaimPolicy(policy) if policy in known else DEFAULT_POLICY,
        key_cache_seconds=int(cache or 0),
        key_sealing=sealing,
        key_sealing_pcrs=pcrs,
    )


def check_runtime(spec: UnlockSpec, runtime: str) -> UnlockSpec:
    """``spec`` on a node whose agent loads into ``runtime`` (the Node's containerRuntimeVersion,
    or IMAGEUNLOCK_RUNTIME): ``auto`` becomes that runtime; another one is refused, never
    silently swapped."""
    if spec.runtime not in (runtimes.AUTO, runtime):
        raise ConfigurationError(
            f"spec.runtime {spec.runtime!r} is not this node's runtime ({runtime}: the Node's "
            f"containerRuntimeVersion, or the agent setting IMAGEUNLOCK_RUNTIME): use auto, or select "
            f"{spec.runtime} nodes with spec.nodeSelector"
        )
    return replace(spec, runtime=runtime)


def _key_sealing(spec: Mapping[str, object], problems: list[str]) -> tuple[str, tuple[int, ...]]:
    """``spec.keySealing`` (None or TPM) and ``spec.keySealingPCRs`` (SHA-256 PCRs 0-23, TPM only)."""
    sealing = spec.get("keySealing") or "None"
    if sealing not in KEY_SEALING:
        problems.append(f"spec.keySealing {sealing!r} is not one of {', '.join(KEY_SEALING)}")
        sealing = "None"
    raw = spec.get("keySealingPCRs") or []
    if not isinstance(raw, list) or not all(type(p) is int and 0 <= p <= MAX_PCR for p in raw):
        problems.append(f"spec.keySealingPCRs must be a list of PCR numbers 0 to {MAX_PCR}")
        return str(sealing), ()
    if resettable := sorted({16, 23}.intersection(raw)):
        problems.append(
            f"spec.keySealingPCRs {resettable} bind nothing (any program may reset PCR 16 and 23): "
            "use PCRs that record the boot, e.g. [0, 2, 4, 7]"
        )
    if raw and sealing != "TPM":
        problems.append("spec.keySealingPCRs needs spec.keySealing TPM")
    return str(sealing), tuple(sorted(set(raw)))


def _key_source(spec: Mapping[str, object], settings: keys.KeySettings, problems: list[str]) -> keys.KeySourceSpec:
    """``spec.keySource`` (a union: exactly one registered member), or the top-level
    ``spec.resourceApi`` it grew from; exactly one of the two."""
    union, legacy = spec.get("keySource"), spec.get("resourceApi")
    members = ", ".join(keys.members())
    if (union is None) == (legacy is None):
        problems.append(
            f"give exactly one of spec.keySource and spec.resourceApi ({'both are' if union else 'neither is'} set; "
            "spec.resourceApi is the same as spec.keySource.resourceApi)"
        )
        return keys.KeySourceSpec("")
    if union is None:
        kind, where, raw = keys.RESOURCE_API, "spec.resourceApi", legacy
    else:
        only = next(iter(union.items())) if isinstance(union, Mapping) and len(union) == 1 else None
        found = keys.key_source_kind(str(only[0])) if only else None
        if only is None or found is None:
            problems.append(f"spec.keySource must name exactly one key source: one of {members}")
            return keys.KeySourceSpec("")
        kind, where, raw = found, f"spec.keySource.{found.member}", only[1]
    if not isinstance(raw, Mapping):
        problems.append(f"{where} must be an object")
        raw = {}
    return kind.parse(raw, where, settings, problems)
