"""The runtime registry: every container runtime the agent and the CLI can load into.

Each runtime is one :class:`RuntimeKind`: its name (``spec.runtime``, ``IMAGEUNLOCK_RUNTIME``,
``--runtime``), the scheme kubelet reports for it in ``containerRuntimeVersion``, its settings
(agent variables and CLI flags), its adapter module and its error classifier. Everything that
names runtimes derives from here: the agent's settings, the spec check, the node-runtime
detection, the CLI's flags and the messages; a unit test holds the CRD's enums equal to
:func:`names`.

Pure: a kind names its adapter module and :func:`make_runtime` imports it only when that
runtime is built, so choosing containerd never imports the docker SDK, and the pure modules
(kube.spec, kube.nodes) read names and schemes without any adapter.

A new runtime: an adapter module here with a ``build(settings, timeout) -> Runtime`` function,
one ``register(RuntimeKind(...))`` below, and its name in the CRD's two runtime enums and the
chart's ``agent.runtime`` enum (values.schema.json) (docs/architecture.md;
tests/support/fake_runtime.py is the recipe, run by a unit test).
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from imageunlock.engine.models import Runtime

# re-exported: the state directory's files are read by engine.statefiles
from imageunlock.engine.statefiles import STATE_FILE_MAX as STATE_FILE_MAX
from imageunlock.engine.statefiles import read_state_file as read_state_file
from imageunlock.errors import ConfigurationError

# The node-local state directory (a hostPath the DaemonSet mounts): what the node loaded for
# whom (owned.py), the reclaim policies and sealed keys the agent remembers across restarts.
# Never the archive directory (/var/lib/imageunlock, mounted read-only): whoever can write
# in the state directory decides which images the agent takes for its own.
STATE_DIR_ENV = "IMAGEUNLOCK_STATE_DIR"
DEFAULT_STATE_DIR = "/var/lib/imageunlock-state"


def state_dir() -> str:
    return os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR


AUTO = "auto"  # spec.runtime and IMAGEUNLOCK_RUNTIME: the node's own runtime


def plain_words(text: str) -> str:
    """``text`` lower-cased without anything path-like. A runtime's messages quote member names
    from the archive (``open .../no space left/x``): only the words outside any path may
    classify an error, or an archive could make its own refusal look transient."""
    text = text.lower().replace("input/output", "input-output").replace("i/o", "i-o")
    return " ".join(re.sub(r"\S*/\S*", " ", text).split())


@dataclass(frozen=True)
class Classifier:
    """How a runtime's error messages are read: words saying that the runtime cannot be
    reached, that the disk is full (a state of its own: InsufficientStorage), or that the
    node (not the archive) is in trouble; anything else a load reports is the archive's own
    content (permanent: the stream checks passed)."""

    unreachable: tuple[str, ...] = ()
    node_trouble: tuple[str, ...] = ()
    no_space: tuple[str, ...] = ("no space left", "disk quota exceeded")

    def verdict(self, message: str) -> Literal["unreachable", "no-space", "node", "content"]:
        words = plain_words(message)
        if any(marker in words for marker in self.unreachable):
            return "unreachable"
        if any(marker in words for marker in self.no_space):
            return "no-space"
        if any(marker in words for marker in self.node_trouble):
            return "node"
        return "content"


@dataclass(frozen=True)
class Setting:
    """One setting of a runtime: ``key`` is its name in :func:`make_runtime` and in the
    agent's ``runtime_settings``; the agent reads the first of ``env`` that is set, the CLI
    has ``flag`` (default: ``cli_env``, then ``default``)."""

    key: str
    env: tuple[str, ...]
    flag: str
    default: str | None
    help: str
    cli_env: str | None = None
    metavar: str | None = None


@dataclass(frozen=True)
class RuntimeKind:
    name: str
    cri_scheme: str  # containerRuntimeVersion "<scheme>://<version>" on a Node
    adapter: str  # the module with build(settings: Mapping[str, str | None], timeout: float | None) -> Runtime
    classifier: Classifier
    settings: tuple[Setting, ...] = ()


_KINDS: dict[str, RuntimeKind] = {}


def register(kind: RuntimeKind) -> RuntimeKind:
    if kind.name == AUTO or not re.fullmatch(r"[a-z][a-z0-9-]*", kind.name):
        raise ConfigurationError(f"runtime name {kind.name!r} is not usable")
    _KINDS[kind.name] = kind
    return kind


def names() -> tuple[str, ...]:
    return tuple(_KINDS)


def kinds() -> tuple[RuntimeKind, ...]:
    return tuple(_KINDS.values())


def listed(words: tuple[str, ...], last: str = "or") -> str:
    """``a, b or c``: runtime names in a message."""
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} {last} {words[-1]}"


def runtime_kind(name: str) -> RuntimeKind:
    try:
        return _KINDS[name]
    except KeyError:
        raise ConfigurationError(f"unknown container runtime {name!r} (one of {', '.join(_KINDS)})") from None


def runtime_of(container_runtime_version: str) -> str | None:
    """``containerd://1.7.3`` → ``containerd``, ``docker://24.0.7`` → ``docker``; kubelet's
    value for anything else (``cri-o://…``) → None (not a runtime the agent loads into)."""
    scheme = container_runtime_version.partition("://")[0].lower()
    return next((kind.name for kind in _KINDS.values() if kind.cri_scheme == scheme), None)


def default_settings() -> dict[str, str | None]:
    """Every registered runtime's settings at their defaults."""
    return {s.key: s.default for kind in _KINDS.values() for s in kind.settings}


def make_runtime(name: str, *, timeout: float | None = None, **settings: str | None) -> Runtime:
    """The runtime called ``name``, built from ``settings`` (keys of any runtime; those of
    others are ignored; ``None`` means the setting's default). Its adapter module is
    imported only now: the docker SDK is not needed to load into containerd."""
    kind = runtime_kind(name)
    values: Mapping[str, str | None] = {s.key: settings.get(s.key) or s.default for s in kind.settings}
    build = importlib.import_module(kind.adapter).build
    runtime: Runtime = build(values, timeout)
    return runtime


DOCKER = register(
    RuntimeKind(
        name="docker",
        cri_scheme="docker",
        adapter="imageunlock.engine.runtimes.docker",
        classifier=Classifier(
            node_trouble=(
                "read-only file system",
                "too many open files",
                "cannot allocate memory",
                "connection reset",
                "broken pipe",
                "i-o timeout",  # i/o, input/output: spelt without "/" (path-like words are dropped)
                "context canceled",
                "input-output error",
            ),
        ),
        settings=(
            Setting(
                "docker_host",
                env=("IMAGEUNLOCK_DOCKER_HOST", "DOCKER_HOST"),
                flag="--docker-host",
                default="unix:///var/run/docker.sock",
                cli_env="DOCKER_HOST",
                help="Docker Engine URL (default: $DOCKER_HOST or unix:///var/run/docker.sock)",
            ),
        ),
    )
)

CONTAINERD = register(
    RuntimeKind(
        name="containerd",
        cri_scheme="containerd",
        adapter="imageunlock.engine.runtimes.containerd",
        classifier=Classifier(
            unreachable=(
                "cannot access socket",
                "failed to dial",
                "error while dialing",
                "connection refused",
                "code = unavailable",
                "transport is closing",
                "connection reset",
            ),
            node_trouble=(
                "read-only file system",
                "too many open files",
                "cannot allocate memory",
                "input-output error",
                "i-o timeout",
                "context canceled",
                "code = resourceexhausted",
            ),
        ),
        settings=(
            Setting(
                "containerd_address",
                env=("IMAGEUNLOCK_CONTAINERD_ADDRESS",),
                flag="--containerd-address",
                default="/run/containerd/containerd.sock",
                metavar="PATH",
                help="containerd's socket, with --runtime containerd (k3s: /run/k3s/containerd/containerd.sock; "
                "default: %(default)s)",
            ),
            Setting(
                "containerd_namespace",
                env=("IMAGEUNLOCK_CONTAINERD_NAMESPACE",),
                flag="--containerd-namespace",
                default="k8s.io",  # the CRI's namespace: the only one kubelet runs pods from
                metavar="NS",
                help="containerd namespace, with --runtime containerd; kubelet uses k8s.io (default: %(default)s)",
            ),
        ),
    )
)
