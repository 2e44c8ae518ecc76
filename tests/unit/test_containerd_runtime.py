"""The containerd adapter's pure parts (no daemon): the hold-back of trailing zeros, how ctr's
messages are classified, how an image's ID is read from its manifest; and the runtime factory."""

from __future__ import annotations

import os
import platform

import pytest

from imageunlock.app.config import AgentConfig
from imageunlock.engine.runtimes import make_runtime
from imageunlock.engine.runtimes.containerd import _ARCH, ContainerdRuntime, _Pipe
from imageunlock.engine.runtimes.docker import DockerRuntime
from imageunlock.errors import (
    ArchiveRejectedError,
    ConfigurationError,
    InsufficientStorageError,
    LoadError,
    RuntimeUnavailableError,
)


def _read_all(fd: int) -> bytes:
    os.set_blocking(fd, False)
    data = b""
    try:
        while chunk := os.read(fd, 1 << 20):
            data += chunk
    except BlockingIOError:
        pass
    return data


def test_trailing_zeros_are_held_back_as_a_count_until_data_follows_or_the_stream_ends():
    read, write = os.pipe()
    try:
        pipe = _Pipe(write)
        assert pipe.feed(b"header" + bytes(1000))  # the last byte is held too (see below)
        assert _read_all(read) == b"heade" and pipe.zeros == 1000
        assert pipe.feed(bytes(5000)) and _read_all(read) == b"" and pipe.zeros == 6000  # a count, not bytes
        assert pipe.feed(b"\0\0more\0")
        assert _read_all(read) == b"r" + bytes(6002) + b"mor" and pipe.zeros == 1
        assert pipe.close() and _read_all(read) == b"e\0" and pipe.zeros == 0
    finally:
        os.close(read)
        os.close(write)


def test_a_closed_pipe_is_reported_not_raised():
    read, write = os.pipe()
    os.close(read)
    try:
        assert _Pipe(write).feed(b"x" * 10) is False
    finally:
        os.close(write)


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        (
            'ctr: failed to dial "/run/containerd/containerd.sock": connection error: connect: connection refused',
            RuntimeUnavailableError,
        ),
        ("ctr: rpc error: code = Unavailable desc = transport is closing", RuntimeUnavailableError),
        ("ctr: failed to write /var/lib/containerd/ingest/x/data: no space left on device", InsufficientStorageError),
        ("ctr: write /var/lib/containerd/ingest/x/data: disk quota exceeded: unknown", InsufficientStorageError),
        ("ctr: apply layer: read /a/b: input/output error", LoadError),
        ("ctr: failed to extract layer sha256:ab: archive/tar: invalid tar header: unpack", ArchiveRejectedError),
        # words inside a path come from the archive's member names: they cannot make it transient
        ("ctr: failed to extract layer: open etc/no space left/x: invalid argument", ArchiveRejectedError),
    ],
)
def test_ctr_messages_are_classified(message, kind):
    error = ContainerdRuntime("/nonexistent.sock")._failure(message, load=True)
    assert type(error) is kind and message in error.message


def test_a_failing_listing_is_the_runtime_being_unavailable_not_the_archive():
    assert isinstance(ContainerdRuntime()._failure("ctr: something odd", load=False), RuntimeUnavailableError)


CONFIG = "sha256:" + "c" * 64


def test_the_image_id_is_the_config_digest_of_the_manifest_or_of_the_nodes_manifest_in_an_index(monkeypatch):
    runtime = ContainerdRuntime()
    arch = _ARCH.get(platform.machine(), platform.machine())
    other = "s390x" if arch != "s390x" else "amd64"
    documents = {
        "sha256:" + "1" * 64: {"config": {"digest": CONFIG}},
        "sha256:" + "2" * 64: {
            "manifests": [
                {"digest": "sha256:" + "3" * 64, "platform": {"os": "linux", "architecture": other}},
                {"digest": "sha256:" + "1" * 64, "platform": {"os": "linux", "architecture": arch}},
            ]
        },
        "sha256:" + "4" * 64: {
            "manifests": [{"digest": "sha256:" + "3" * 64, "platform": {"os": "linux", "architecture": other}}]
        },
        "sha256:" + "3" * 64: {"config": {"digest": "sha256:" + "d" * 64}},
    }
    asked: list[str] = []
    monkeypatch.setattr(runtime, "_content", lambda digest: asked.append(digest) or documents.get(digest))
    assert runtime._config_digest(("manifest", "sha256:" + "1" * 64, "")) == CONFIG
    assert runtime._config_digest(("index", "sha256:" + "2" * 64, "")) == CONFIG
    assert runtime._config_digest(("index", "sha256:" + "4" * 64, "")) is None  # no manifest for this node
    assert runtime._config_digest(("manifest", "sha256:" + "9" * 64, "")) is None  # content gone
    assert runtime._config_digest(None) is None
    before = len(asked)
    assert runtime._config_digest(("manifest", "sha256:" + "1" * 64, "")) == CONFIG
    assert len(asked) == before  # content-addressed: read once


def test_make_runtime_builds_by_name_and_refuses_others():
    docker = make_runtime("docker", docker_host="unix:///tmp/d.sock", timeout=5)
    assert isinstance(docker, DockerRuntime) and docker.base_url == "unix:///tmp/d.sock" and docker.timeout == 5
    containerd = make_runtime("containerd", containerd_address="unix:///run/k3s/containerd/containerd.sock")
    assert isinstance(containerd, ContainerdRuntime) and containerd.name == "containerd"
    assert containerd.address == "/run/k3s/containerd/containerd.sock" and containerd.namespace == "k8s.io"
    with pytest.raises(ConfigurationError, match="unknown container runtime"):
        make_runtime("podman")


def test_operator_settings_for_the_runtime():
    default = AgentConfig.from_env({"RESOURCE_API_URL": "https://api.test"})
    assert (
        default.runtime,
        default.runtime_settings["containerd_address"],
        default.runtime_settings["containerd_namespace"],
    ) == (
        "auto",
        "/run/containerd/containerd.sock",
        "k8s.io",
    )
    k3s = AgentConfig.from_env(
        {
            "RESOURCE_API_URL": "https://api.test",
            "IMAGEUNLOCK_RUNTIME": "containerd",
            "IMAGEUNLOCK_CONTAINERD_ADDRESS": "/run/k3s/containerd/containerd.sock",
        }
    )
    assert (
        k3s.runtime == "containerd"
        and k3s.runtime_settings["containerd_address"] == "/run/k3s/containerd/containerd.sock"
    )
    with pytest.raises(ConfigurationError, match="IMAGEUNLOCK_RUNTIME='podman'"):
        AgentConfig.from_env({"RESOURCE_API_URL": "https://api.test", "IMAGEUNLOCK_RUNTIME": "podman"})


@pytest.mark.parametrize("seed", range(20))
def test_what_ctr_has_read_never_ends_on_a_tar_block_until_the_stream_passed(tmp_path, seed):
    """Should the agent die mid-stream, the kernel closes ctr's input wherever the agent's
    writes had got to; Go's tar reader takes an end on a block boundary for the end of the
    archive (and ctr imports what it read). So no write may leave ctr's input there —
    including a chunk whose last non-zero byte opens a block, its zeros held back."""
    import random

    from imageunlock.engine.runtimes.containerd import BLOCK, _Pipe

    rng = random.Random(seed)
    sink = tmp_path / "ctr-stdin"
    fd = os.open(sink, os.O_WRONLY | os.O_CREAT)
    pipe, fed = _Pipe(fd), bytearray()
    try:
        for _ in range(60):
            size = rng.choice([BLOCK, 2 * BLOCK, 1, 7, 1024 * 128, rng.randrange(1, 5000)])
            chunk = bytearray(rng.randbytes(size))
            if rng.random() < 0.4:  # a non-zero byte opening a block, then zeros
                cut = rng.randrange(0, size)
                chunk[cut:] = bytes(size - cut)
                if cut:
                    chunk[cut - 1] = 1
            assert pipe.feed(bytes(chunk))
            fed += chunk
            written = os.fstat(fd).st_size
            assert written == pipe.sent and (written == 0 or written % BLOCK), (written, len(fed))
        assert pipe.close()
    finally:
        os.close(fd)
    assert sink.read_bytes() == bytes(fed)  # and, once passed, every byte went through


def test_ctr_inherits_no_credentials_from_our_environment(tmp_path, monkeypatch):
    """The CLI reads the resource API password from IMAGEUNLOCK_PASSWORD; ctr (a child of the
    agent or the CLI) must not get it in its /proc/PID/environ, nor anything else of ours."""
    monkeypatch.setenv("IMAGEUNLOCK_PASSWORD", "canary-password")
    monkeypatch.setenv("IMAGEUNLOCK_EMAIL", "canary@example.com")
    ctr = tmp_path / "ctr"
    ctr.write_text(f"#!/bin/sh\nenv > {tmp_path / 'env'}\n")
    ctr.chmod(0o755)
    runtime = ContainerdRuntime(address=str(tmp_path / "no.sock"), ctr=str(ctr))
    runtime._run("version", check=False)
    seen = (tmp_path / "env").read_text()
    assert "canary" not in seen and "PATH=" in seen
