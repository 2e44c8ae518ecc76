# ImageUnlock operator image.
#
#   docker build -t imageunlock:0.1.0 .
#   docker run --rm imageunlock:0.1.0 --help
#
# One Dockerfile for every architecture (linux/amd64, linux/arm64): the runtime stage is the
# base image of the target architecture; the wheels for it are fetched and installed by a
# build stage that may run on the build machine's own architecture (BUILD_IMAGE), so a cross
# build runs almost nothing under emulation. Three stages:
#   target   the runtime base's python3 says what it is (architecture, Python X.Y, glibc);
#            for a foreign architecture this one command runs under emulation (QEMU user
#            mode through binfmt_misc, as does every RUN of the runtime stage);
#   build    wheels of the project's dependencies at exactly the versions pinned in
#            requirements.lock, for the target's architecture, Python and glibc — binary
#            wheels only, nothing compiled, for either architecture (pip download
#            --only-binary=:all: --platform ...) — then the runtime virtualenv installed from
#            those wheels alone (--no-index: nothing unpinned can get in), and every binary
#            in it checked to be for the target's machine;
#   runtime  the base image plus that virtualenv: no build tools, no pip in the
#            virtualenv, no wheels, no source tree. Its last step starts the installed
#            program on the target architecture (emulated for a foreign one).
# The image config's architecture is the runtime base's (the classic builder copies it from
# the FROM image): build arm64 from an arm64 base. `make images` builds both from local
# Debian bases; see README.md, "Architectures".
#
# Runtime contract:
#   * non-root: UID/GID ${UID}:${GID} (build args, default 10001). The Docker Engine socket
#     is reached through the socket's group, not as root: add that group to the process —
#     Kubernetes: securityContext.supplementalGroups: [<gid of /var/run/docker.sock>];
#     docker run / compose: --group-add <gid> / group_add: ["<gid>"]
#     (the gid on the node: `stat -c %g /var/run/docker.sock`).
#   * the containerd runtime (k3s, RKE2, kubeadm nodes: IMAGEUNLOCK_RUNTIME auto or
#     containerd) runs containerd's `ctr` (/usr/local/bin/ctr: the one binary, taken from
#     the base release's Debian `containerd` package for the target architecture) against
#     the node's containerd socket (the socket file alone) mounted at
#     /run/containerd/containerd.sock (IMAGEUNLOCK_CONTAINERD_ADDRESS), reached through its
#     group like Docker's (containerd's: usually 0).
#   * the TPM path (spec.keySealing TPM): Debian's tpm2-tools and libtss2 TCTI modules, run
#     against the node's /dev/tpmrm0 (IMAGEUNLOCK_TPM_TCTI; the chart's agent.tpm.enabled).
#   * no shell and no setuid/setgid file: the operator runs Python and `ctr` directly (no
#     shell=True, no os.system/popen), so the runtime stage removes sh/dash/bash once its
#     own RUN steps are done and clears every setuid/setgid bit (su, passwd, mount, ...).
#     Nothing can be installed into the image afterwards (dpkg's scripts need a shell):
#     change the base instead. `docker exec` into a container needs a program of the image
#     (python, imageunlock, ctr).
#   * read-only root filesystem: nothing is written outside /tmp (TMPDIR and HOME point
#     there). /tmp is declared a VOLUME, so `docker run --read-only` works as is; in
#     Kubernetes mount an emptyDir at /tmp (manifests/ and the chart do).
#   * ENTRYPOINT `imageunlock`, CMD `agent`: the node agent (kopf; NODE_NAME names its node),
#     settings from IMAGEUNLOCK_* environment variables, liveness probe on
#     http://0.0.0.0:8080/healthz (IMAGEUNLOCK_LIVENESS). `controller` runs the controller
#     instead; `docker run IMAGE unlock ...` a one-shot unlock.
#
# Build args:
#   BASE_IMAGE  a slim Python >= 3.11 image with the venv module, glibc-based, of the target
#               architecture (default: the official python:3.11-slim-bookworm). Any
#               Debian-like image with python3 and python3-venv works; scripts/base-image.sh
#               makes one for amd64 or arm64 without a registry.
#   BUILD_IMAGE the image the build stage runs on (default: BASE_IMAGE). For a cross build
#               give the same distribution release for the build machine's architecture
#               (same Python X.Y at the same path, which the build checks): the build stage
#               then runs natively. With BASE_IMAGE alone a foreign build still works, with
#               the build stage under emulation (pip only: still nothing is compiled).
#   UID, GID    the numeric user and group the operator runs as.
#   PIP_INDEX_URL   a PyPI mirror; building needs PyPI or such a mirror for the wheels.
#   EXTRA_CA_CERTS  PEM text of extra CA certificates for pip (a TLS-intercepting proxy),
#                   e.g. --build-arg EXTRA_CA_CERTS="$(cat /usr/local/share/ca-certificates/*.crt)".

ARG BASE_IMAGE=python:3.11-slim-bookworm
ARG BUILD_IMAGE=${BASE_IMAGE}

# ---------------------------------------------------------------------------- target
FROM ${BASE_IMAGE} AS target
COPY scripts/image-target.py /src/
RUN python3 /src/image-target.py describe > /src/target.json

# ---------------------------------------------------------------------------- build
FROM ${BUILD_IMAGE} AS build

# A PyPI mirror, and PEM certificates to trust besides pip's own (a TLS-intercepting proxy
# between the builder and PyPI). Both stay in this stage: the final image has neither.
ARG PIP_INDEX_URL
ARG EXTRA_CA_CERTS=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1

# Wheels of the project's runtime dependencies (pyproject.toml) at exactly the versions
# requirements.lock pins, for the target's architecture, Python and glibc (image-target.py
# pip-args), in a layer that only a new lock, dependency list or base invalidates. The test
# tools in the lock are not fetched. Every wheel must be pinned by the lock: a dependency the
# lock misses fails the build instead of floating to the latest release. Binary wheels only,
# for both architectures: PyPI has manylinux wheels of every compiled dependency for x86_64
# and aarch64, so nothing is compiled (a dependency without one fails the build here).
# Environment markers are evaluated by the build Python (same X.Y and OS as the target;
# none of the locked dependencies depends on the machine).
# The build tools live in a throwaway virtualenv (the base image's Python is never touched);
# its pip.conf (a virtualenv's site configuration) adds EXTRA_CA_CERTS to pip's CA bundle.
# setuptools and wheel (the project's build backend) come at their locked versions too.
COPY requirements.lock pyproject.toml scripts/image-target.py /src/
COPY --from=target /src/target.json /src/target.json
RUN python3 -m venv /opt/build \
 && if [ -n "$EXTRA_CA_CERTS" ]; then \
      bundle="$(/opt/build/bin/python -c 'import pip._vendor.certifi as c; print(c.where())')" \
      && { cat "$bundle"; printf '%s\n' "$EXTRA_CA_CERTS"; } > /opt/build/ca.pem \
      && printf '[global]\ncert = /opt/build/ca.pem\n' > /opt/build/pip.conf; \
    fi \
 && /opt/build/bin/pip install --quiet --constraint /src/requirements.lock setuptools wheel \
 && /opt/build/bin/python -c 'import tomllib; print("\n".join(tomllib.load(open("/src/pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /src/runtime-requirements.txt \
 && pip_args="$(python3 /src/image-target.py pip-args /src/target.json)" \
 && /opt/build/bin/pip download --quiet $pip_args --constraint /src/requirements.lock \
        --requirement /src/runtime-requirements.txt --dest /wheels \
 && python3 /src/image-target.py check-pinned /src/requirements.lock /wheels

# containerd's `ctr` for the target architecture: the one file from the base release's
# Debian `containerd` package (apt-get download + dpkg-deb: nothing is installed or run, so a
# cross build needs no emulation here), checked to be for the target's machine.
RUN arch="$(python3 /src/image-target.py debian-arch /src/target.json)" \
 && { [ "$arch" = "$(dpkg --print-architecture)" ] || dpkg --add-architecture "$arch"; } \
 && apt-get update -qq \
 && mkdir -p /tmp/ctr && cd /tmp/ctr \
 && apt-get download -qq "containerd:$arch" \
 && dpkg-deb --fsys-tarfile containerd_*.deb | tar -x ./usr/bin/ctr \
 && install -D -m 0755 usr/bin/ctr /opt/ctr/ctr \
 && python3 /src/image-target.py check-binaries /opt/ctr /src/target.json \
 && cd / && rm -rf /tmp/ctr /var/lib/apt/lists/*

# The project's own wheel (pure Python: built here, for any architecture), then the runtime
# virtualenv from the wheels alone (--no-index, nothing else can get in). The virtualenv's
# python is a link to the build Python's path, which the runtime base has too (checked
# above). pip picks wheels by the tags of the running Python; _PYTHON_HOST_PLATFORM (CPython's
# cross-build setting, which sysconfig.get_platform() returns) makes them the target's, so
# the build Python installs the target's wheels without running any of their code (a no-op
# for a native build). Byte code is the same on every architecture. Last, every binary in
# the virtualenv must be for the target's machine.
COPY README.md /src/
COPY operator /src/operator
RUN /opt/build/bin/pip wheel --quiet --no-deps --no-build-isolation --wheel-dir /wheels /src \
 && python3 -m venv --without-pip /opt/imageunlock \
 && _PYTHON_HOST_PLATFORM="$(python3 /src/image-target.py host-platform /src/target.json)" \
    /opt/build/bin/pip --python /opt/imageunlock/bin/python install --quiet \
        --no-index --find-links /wheels --only-binary :all: imageunlock \
 && python3 /src/image-target.py check-binaries /opt/imageunlock /src/target.json

# ---------------------------------------------------------------------------- runtime
FROM ${BASE_IMAGE}

ARG UID=10001
ARG GID=10001

# Debian's tpm2-tools (spec.keySealing TPM, `unlock --key-sealing tpm`: engine/keys/tpm.py runs
# them) with the libtss2 TCTI modules (device, swtpm, ...), the base release's packages for the
# target architecture: apt-get installs them in this stage (emulated for a foreign one) while
# there still is a shell for their maintainer scripts. No tpm2-pytss: PyPI has no wheel of it,
# and the build stage takes binary wheels only.
# A named account for the numeric IDs (tools that look the user up find it); no home,
# no login shell, no password. Then the hardening, last of the steps that need a shell:
# no file keeps a setuid or setgid bit (nothing in the image may gain privileges: su,
# passwd, chfn, mount, unix_chkpwd, ...), and the shells go (the product needs none, and a
# shell is what an attacker who gets code execution reaches for first). The RUN steps
# after this one use the exec form. -xdev: the image's own filesystem, not /proc or /sys.
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -qq -y --no-install-recommends tpm2-tools > /dev/null \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb \
 && groupadd --system --gid "${GID}" imageunlock \
 && useradd --system --uid "${UID}" --gid "${GID}" --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin imageunlock \
 && find / -xdev -perm /6000 -exec chmod ug-s {} + \
 && rm -f /bin/sh /bin/dash /bin/bash /bin/rbash /usr/bin/sh /usr/bin/dash /usr/bin/bash \
        /usr/bin/rbash /bin/busybox /usr/bin/busybox

LABEL org.opencontainers.image.title="imageunlock" \
      org.opencontainers.image.description="Kubernetes operator that unlocks encrypted Docker image archives into each node's container runtime (containerd or Docker)" \
      org.opencontainers.image.version="0.1.0"
ENV PATH=/opt/imageunlock/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TMPDIR=/tmp \
    HOME=/tmp \
    IMAGEUNLOCK_ARCHIVE_ROOT=/var/lib/imageunlock \
    IMAGEUNLOCK_DOCKER_HOST=unix:///var/run/docker.sock
# The only writable path under a read-only root filesystem.
VOLUME ["/tmp"]
# kopf's liveness endpoint (IMAGEUNLOCK_LIVENESS, default http://0.0.0.0:8080/healthz).
EXPOSE 8080
USER ${UID}:${GID}
ENTRYPOINT ["imageunlock"]
CMD ["agent"]

# Last, so that only these layers change when the code does. Owned by root: the operator
# cannot modify its own code. Then the installed program must start here, on the image's own
# architecture and base, as its own user (for a foreign architecture under emulation: a few
# seconds; it writes nothing). Exec form: there is no shell any more.
COPY --from=build /opt/ctr/ctr /usr/local/bin/ctr
COPY --from=build /opt/imageunlock /opt/imageunlock
RUN ["imageunlock", "--version"]
RUN ["ctr", "--version"]
RUN ["tpm2_unseal", "--version"]
