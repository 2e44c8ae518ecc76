"""The ImageUnlock resource as typed models (pure: pydantic only, no I/O).

One model per shape the API server stores: the spec, one node's entry of ``status.nodes``
(written by that node's agent) and the summary (the rest of ``status``, written by the
controller). The CRD (crds/loader.azaion.com_imageunlocks.yaml) declares the very same fields:
tests/unit/test_schema.py holds the two equal both ways, so the API server never prunes a field
the operator writes and the operator never drops one the server holds.

Fields are snake_case here and camelCase on the wire (the aliases). A field that is None is
not written (:meth:`Model.dump`); fields the CRD may hold and a model does not know (a newer
CRD) are ignored when reading.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel

from imageunlock.engine.models import Phase
from imageunlock.kube.labels import readiness_key_problem


class Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True)

    def dump(self) -> dict[str, Any]:
        """The wire form: camelCase, every field that holds a value (None: left out)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


# --- spec ---------------------------------------------------------------------------------
# The shape only: kube/spec.py checks the values (and names every problem at once).


class SecretRef(Model):
    name: str


class ResourceApi(Model):
    url: str | None = None  # default: the operator's RESOURCE_API_URL
    credentials_secret_ref: SecretRef


class KeySource(Model):
    """A union: exactly one member is set (kube/spec.py checks that, and the member's values
    through the key-source registry, engine/keys)."""

    resource_api: ResourceApi | None = None


class SelectorRequirement(Model):
    key: str
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[str] | None = None


class NodeSelector(Model):
    match_labels: dict[str, str] | None = None
    match_expressions: list[SelectorRequirement] | None = None


class ImageUnlockSpec(Model):
    archive_path: str
    version: str
    images: list[str] | None = None  # the CRD's default: the seven Azaion services
    key_source: KeySource | None = None  # or the top-level resource_api: exactly one of the two
    resource_api: ResourceApi | None = None
    runtime: str | None = None  # a runtime's name, or "auto" (the CRD's enum)
    node_selector: NodeSelector | None = None
    archive_sha256: str | None = None
    # A Node label key: the controller sets <key>=<version> on every selected node that is
    # Ready for this generation and removes it from every other node (controller/readiness.py).
    readiness_label: str | None = None

    @field_validator("readiness_label")
    @classmethod
    def _readiness_label(cls, value: str | None) -> str | None:
        if value is not None and (problem := readiness_key_problem(value)):
            raise ValueError(problem)
        return value

    # What happens on a node to images this ImageUnlock no longer wants (engine/reclaim.py).
    reclaim_policy: Literal["Retain", "Unpin", "Delete"] | None = None  # the CRD's default: Unpin
    key_cache_seconds: int | None = None  # 0 / absent: the key is fetched per unlock
    key_sealing: Literal["None", "TPM"] | None = None  # the CRD's default: None
    # with TPM only: SHA-256 bank PCRs (0-23); "PCRs", not to_camel's "Pcrs"
    key_sealing_pcrs: list[int] | None = Field(None, alias="keySealingPCRs")


# --- status: one node's entry -------------------------------------------------------------


class Image(Model):
    """An image reference (NAME:VERSION) and the image ID the runtime verified for it."""

    name: str = ""
    id: str = ""


class Progress(Model):
    bytes_done: int | None = None
    bytes_total: int | None = None
    percent: int | None = None


class Reclaimed(Model):
    """What the node's agent last gave back of this ImageUnlock's earlier versions."""

    policy: Literal["Unpin", "Delete"]
    version: str  # the tags of the refs (e.g. "1.0.0")
    count: int  # how many were unpinned or removed
    refs: list[str] | None = None  # which (a large fleet leaves the lists out: kube/nodes.py)
    kept: list[str] | None = None  # Delete: left because a container uses them
    time: str


class NodeEntry(Model):
    """One node's entry of ``status.nodes``, keyed by ``name`` and written whole by that node's
    agent (server-side apply under its own field manager).

    Kept small, for a 1000-node object stays far below the ~1.5 MiB limit (README, "Scale"):
    no conditions (the phase says which one holds, ``reason`` why: kube/conditions.py), and on
    a large fleet a Ready entry holds the digest of its images instead of the list
    (kube/nodes.py, DETAILED_NODES).

    A new per-node field: declare it here and under ``status.nodes.items`` in the CRD (and its
    chart copy), then set it where the reconciler makes the entry; the agent applies the
    entry as it is and the controller reads it typed (tests/unit/test_schema.py holds this
    model and the CRD equal)."""

    name: str
    runtime: str | None = None
    phase: Phase | None = None
    reason: str | None = None
    message: str | None = None
    observed_generation: int | None = None  # the generation this node finished (Ready or Stalled)
    images: list[Image] | None = None
    images_digest: str | None = None
    progress: Progress | None = None  # while the node works
    last_unlock_time: str | None = None
    last_verified_time: str | None = None
    last_handled_requested_at: str | None = None
    reclaimed: Reclaimed | None = None  # the last reclaim of superseded refs on this node
    # The credentials Secret's resourceVersion the resource API refused the login for (this
    # generation): other nodes adopt the verdict for that resourceVersion (agent/verdicts.py).
    login_refused_version: str | None = None


# --- status: the summary ------------------------------------------------------------------


class Condition(Model):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str | None = None
    message: str | None = None
    observed_generation: int | None = None
    last_transition_time: str | None = None


class StatusImage(Image):
    present: bool = False


class SummaryProgress(Progress):
    text: str | None = None  # the PROGRESS column


class ImageUnlockStatus(Model):
    """``status``: the controller's summary over the nodes, and the nodes' own entries (which
    only the agents write: the summary never sets ``nodes``)."""

    observed_generation: int | None = None
    phase: Phase | None = None
    ready_nodes: str | None = None  # the NODES column: "ready/desired"
    nodes_ready: int | None = None
    nodes_desired: int | None = None
    nodes: list[NodeEntry] = Field(default_factory=list)
    message: str | None = None
    last_unlock_time: str | None = None
    last_verified_time: str | None = None
    last_handled_requested_at: str | None = None
    progress: SummaryProgress | None = None
    images: list[StatusImage] | None = None
    conditions: list[Condition] = Field(default_factory=list)
