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
import logging
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from imageunlock.engine.models import Runtime
from imageunlock.errors import ConfigurationError

log = logging.getLogger(__name__)

# The node-local state directory (a hostPath the DaemonSet mounts): what the node loaded for
# whom (owned.py), the reclaim policies and sealed keys the agent remembers across restarts.
# Never the archive directory (/var/lib/imageunlock, mounted read-only): whoever can write
# in the state directory decides which images the agent takes for its own.
STATE_DIR_ENV = "IMAGEUNLOCK_STATE_DIR"
DEFAULT_STATE_DIR = "/var/lib/imageunlock-state"
STATE_FILE_MAX = 4 * 1024 * 1024  # a state file holds names and policies: far below this


def state_dir() -> str:
    return os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR


def read_state_file(path: str, what: str) -> bytes | None:
    """The bytes of the state file ``path`` (``what`` names it in the log); None when it does
    not exist, or when it is not a plain file this process wrote: a symlink (not followed), a
    FIFO or device (never blocked on), a file of another user or one others may write, or one
    over 4 MiB. Such a file counts as absent — the node then touches nothing, the safe
    direction — with one warning; it is left as it is."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None
    except OSError as exc:  # ELOOP: a symlink
        log.warning("%s %s not opened (%s): treating it as empty", what, path, exc.strerror or exc)
        return None
    try:
        problem = _unsafe(os.fstat(fd))
        if problem is None:
            chunks: list[bytes] = []
            size = 0
            while chunk := os.read(fd, STATE_FILE_MAX + 1 - size):
                chunks.append(chunk)
                size += len(chunk)
                if size > STATE_FILE_MAX:  # grown since the fstat
                    problem = f"larger than {STATE_FILE_MAX} bytes"
                    break
            else:
                return b"".join(chunks)
    except OSError as exc:
        problem = str(exc.strerror or exc)
    finally:
        os.close(fd)
    log.warning("%s %s is ignored (%s): treating it as empty", what, path, problem)
    return None


def _unsafe(info: os.stat_result) -> str | None:
    """Why a state file with this ``fstat`` is not to be read; None when it may be."""
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if info.st_uid != os.geteuid():
        return f"owned by uid {info.st_uid}, not {os.geteuid()}"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return "writable by group or others"
    if info.st_size > STATE_FILE_MAX:
        return f"larger than {STATE_FILE_MAX} bytes"
    return None


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
