# ImageUnlock operator image.
#
#   docker build -t imageunlock:0.1.0 .
#   docker run --rm imageunlock:0.1.0 --help
#
# Two stages from the same slim Python base:
#   build    wheels of the project and of its dependencies at the versions pinned in
#            requirements.lock, then the runtime virtualenv installed from those wheels
#            alone (--no-index: nothing unpinned can get in);
#   runtime  the base image plus that virtualenv: no build tools, no pip in the
#            virtualenv, no wheels, no source tree.
#
# Runtime contract:
#   * non-root: UID/GID ${UID}:${GID} (build args, default 10001). The Docker Engine socket
#     is reached through the socket's group, not as root: add that group to the process —
#     Kubernetes: securityContext.supplementalGroups: [<gid of /var/run/docker.sock>];
#     docker run / compose: --group-add <gid> / group_add: ["<gid>"]
#     (the gid on the node: `stat -c %g /var/run/docker.sock`).
#   * the containerd runtime (IMAGEUNLOCK_RUNTIME=containerd: k3s, RKE2, kubeadm nodes) runs
#     containerd's `ctr` command, which this image does not contain: an image for that
#     runtime needs `ctr` on PATH (the one binary from Debian's containerd package) and the
#     node's containerd socket mounted at /run/containerd/containerd.sock
#     (IMAGEUNLOCK_CONTAINERD_ADDRESS), reached through its group like Docker's.
#   * read-only root filesystem: nothing is written outside /tmp (TMPDIR and HOME point
#     there). /tmp is declared a VOLUME, so `docker run --read-only` works as is; in
#     Kubernetes mount an emptyDir at /tmp (manifests/ and the chart do).
#   * ENTRYPOINT `imageunlock`, CMD `operator`: the kopf operator, settings from IMAGEUNLOCK_*
#     environment variables, liveness probe on http://0.0.0.0:8080/healthz
#     (IMAGEUNLOCK_LIVENESS). `docker run IMAGE unlock ...` runs a one-shot unlock instead.
#
# Build args:
#   BASE_IMAGE  a slim Python >= 3.11 image with the venv module (default: the official
#               python:3.11-slim-bookworm). Any Debian-like image with python3 and
#               python3-venv works; scripts/base-image.sh makes one without a registry.
#   UID, GID    the numeric user and group the operator runs as.
#   PIP_INDEX_URL   a PyPI mirror; building needs PyPI or such a mirror for the wheels.
#   EXTRA_CA_CERTS  PEM text of extra CA certificates for pip (a TLS-intercepting proxy),
#                   e.g. --build-arg EXTRA_CA_CERTS="$(cat /usr/local/share/ca-certificates/*.crt)".

ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------- build
FROM ${BASE_IMAGE} AS build

# A PyPI mirror, and PEM certificates to trust besides pip's own (a TLS-intercepting proxy
# between the builder and PyPI). Both stay in this stage: the final image has neither.
ARG PIP_INDEX_URL
ARG EXTRA_CA_CERTS=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1

# Wheels of the project's runtime dependencies (pyproject.toml) at exactly the versions
# requirements.lock pins, in a layer that only a new lock or dependency list invalidates.
# The test tools in the lock are not built. Every wheel must be pinned by the lock: a
# dependency the lock misses fails the build instead of floating to the latest release.
# The build tools live in a throwaway virtualenv (the base image's Python is never touched);
# its pip.conf (a virtualenv's site configuration) adds EXTRA_CA_CERTS to pip's CA bundle.
# setuptools and wheel (the project's build backend) come at their locked versions too.
COPY requirements.lock pyproject.toml /src/
RUN python3 -m venv /opt/build \
 && if [ -n "$EXTRA_CA_CERTS" ]; then \
      bundle="$(/opt/build/bin/python -c 'import pip._vendor.certifi as c; print(c.where())')" \
      && { cat "$bundle"; printf '%s\n' "$EXTRA_CA_CERTS"; } > /opt/build/ca.pem \
      && printf '[global]\ncert = /opt/build/ca.pem\n' > /opt/build/pip.conf; \
    fi \
 && /opt/build/bin/pip install --quiet --constraint /src/requirements.lock setuptools wheel \
 && /opt/build/bin/python -c 'import tomllib; print("\n".join(tomllib.load(open("/src/pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /src/runtime-requirements.txt \
 && /opt/build/bin/pip wheel --quiet --constraint /src/requirements.lock \
        --requirement /src/runtime-requirements.txt --wheel-dir /wheels \
 && /opt/build/bin/python -c 'import pathlib, re, sys; \
norm = lambda name, version: re.sub(r"[-_.]+", "-", name).lower() + "==" + version; \
pinned = {norm(*line.strip().split("==", 1)) for line in open("/src/requirements.lock") if "==" in line}; \
built = {norm(*w.name.split("-")[:2]) for w in pathlib.Path("/wheels").glob("*.whl")}; \
bad = sorted(built - pinned); \
sys.exit("not pinned by requirements.lock: %s" % bad if bad else None)'

# The project's own wheel, then the runtime virtualenv from the wheels alone (--no-index,
# nothing else can get in).
COPY README.md /src/
COPY operator /src/operator
RUN /opt/build/bin/pip wheel --quiet --no-deps --no-build-isolation --wheel-dir /wheels /src \
 && python3 -m venv --without-pip /opt/imageunlock \
 && /opt/build/bin/pip --python /opt/imageunlock/bin/python install --quiet \
        --no-index --find-links /wheels --only-binary :all: imageunlock \
 && /opt/imageunlock/bin/imageunlock --help >/dev/null

# ---------------------------------------------------------------------------- runtime
FROM ${BASE_IMAGE}

ARG UID=10001
ARG GID=10001

# A named account for the numeric IDs (tools that look the user up find it); no home,
# no login shell, no password.
RUN groupadd --system --gid "${GID}" imageunlock \
 && useradd --system --uid "${UID}" --gid "${GID}" --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin imageunlock

LABEL org.opencontainers.image.title="imageunlock" \
      org.opencontainers.image.description="Kubernetes operator that unlocks encrypted Docker image archives into the node's Docker Engine" \
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
CMD ["operator"]

# Last, so that only this layer changes when the code does. Owned by root: the operator
# cannot modify its own code.
COPY --from=build /opt/imageunlock /opt/imageunlock
