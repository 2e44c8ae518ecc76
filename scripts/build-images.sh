#!/usr/bin/env bash
# Build the operator image for each architecture given (amd64, arm64) from the one Dockerfile,
# tagged $IMAGE:$VERSION-<arch>, and, with --push, push them and the manifest list
# $IMAGE:$VERSION that serves each node its own architecture (the name the chart and
# manifests/ use).
#
#   scripts/build-images.sh amd64 arm64            # make images
#   scripts/build-images.sh --push amd64 arm64     # make push-images (a registry you can push to)
#
# Bases: without a registry, each architecture's base is a local Debian bookworm with python3
# (scripts/base-image.sh, debootstrap; cached), loaded by scripts/rootfs-image.py so that its
# config — and so the image's — records the architecture. A foreign architecture needs QEMU
# user emulation (qemu-user-static registered with binfmt_misc; scripts/setup.sh does it):
# its base's package scripts run emulated once (several minutes, then cached), and of the
# image build only the target stage's python3 call, useradd and the final start check do.
# The build stage runs on this machine's own base (BUILD_IMAGE), fetching the target's wheels.
# Other bases: BASE_IMAGE_AMD64 / BASE_IMAGE_ARM64 name an image of that architecture already
# in the Engine (e.g. `docker pull --platform linux/arm64 python:3.11-slim-bookworm` and tag it);
# then give the native one as the other variable too, since it is the build stage's base.
#
# Environment: IMAGE (default azaion/imageunlock), VERSION (default: imageunlock.__version__),
# DOCKER_HOST (the Engine to build in), MANIFEST_INSECURE=1 (a plain-HTTP registry),
# PIP_INDEX_URL, and extra CAs for pip from /usr/local/share/ca-certificates (a
# TLS-intercepting proxy), as the image test does.
# Uses Docker's classic builder (DOCKER_BUILDKIT=0), whose behaviour with local bases of
# another architecture this was tested with (dockerd 20.10).
set -euo pipefail
cd "$(dirname "$0")/.."

push=0
if [ "${1:-}" = --push ]; then
  push=1
  shift
fi
(($#)) || set -- amd64 arm64
image=${IMAGE:-azaion/imageunlock}
version=${VERSION:-$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' operator/imageunlock/__init__.py)}
native=$(dpkg --print-architecture 2>/dev/null || echo amd64)
for arch in "$@"; do
  case "$arch" in amd64 | arm64) ;; *) echo "build-images: unsupported architecture $arch (amd64, arm64)" >&2; exit 2 ;; esac
done

# The base of one architecture: a given image, or the local Debian one (loaded once; the
# tarball's name in its history says which tarball it came from).
base_for() {
  local arch=$1 var="BASE_IMAGE_${1^^}" tarball tag
  local given=${!var:-}
  if [ -n "$given" ]; then
    echo "$given"
    return
  fi
  tarball=$(BASE_ARCH=$arch bash scripts/base-image.sh)
  tag="imageunlock-base:bookworm-$arch"
  if ! docker image inspect --format '{{json .RootFS}}' "$tag" >/dev/null 2>&1 \
     || ! docker history --no-trunc --format '{{.CreatedBy}}' "$tag" | grep -qF "$(basename "$tarball")"; then
    echo "build-images: loading $tag from $tarball" >&2
    python3 scripts/rootfs-image.py "$tarball" --arch "$arch" --tag "$tag" | docker load -q >&2
  fi
  echo "$tag"
}

build_args=(--network host)
shopt -s nullglob
cas=(/usr/local/share/ca-certificates/*.crt /usr/local/share/ca-certificates/*/*.crt)
shopt -u nullglob
if ((${#cas[@]})); then
  build_args+=(--build-arg "EXTRA_CA_CERTS=$(cat "${cas[@]}")")
fi
[ -z "${PIP_INDEX_URL:-}" ] || build_args+=(--build-arg "PIP_INDEX_URL=$PIP_INDEX_URL")

build_base=$(base_for "$native")
for arch in "$@"; do
  base=$(base_for "$arch")
  tag="$image:$version-$arch"
  echo "build-images: building $tag (base $base, build stage on $build_base)" >&2
  DOCKER_BUILDKIT=0 docker build "${build_args[@]}" \
    --build-arg "BASE_IMAGE=$base" --build-arg "BUILD_IMAGE=$build_base" -t "$tag" .
  got=$(docker image inspect --format '{{.Os}}/{{.Architecture}}' "$tag")
  if [ "$got" != "linux/$arch" ]; then
    echo "build-images: $tag is $got, not linux/$arch (the base's config decides it)" >&2
    exit 1
  fi
  echo "build-images: $tag ($got)" >&2
done

if ((push)); then
  # The per-architecture images first (a manifest list refers to pushed manifests), then the
  # list under the plain tag. `docker manifest` reads each entry's platform from its config.
  # Same with buildx instead: docker buildx imagetools create -t $image:$version <the tags>
  refs=()
  for arch in "$@"; do
    docker push "$image:$version-$arch"
    refs+=("$image:$version-$arch")
  done
  docker manifest rm "$image:$version" >/dev/null 2>&1 || true # a stale local list
  docker manifest create ${MANIFEST_INSECURE:+--insecure} "$image:$version" "${refs[@]}"
  for arch in "$@"; do # arm64 is v8 (the Jetsons' ARMv8.2); say so even where the config lost it
    [ "$arch" != arm64 ] || docker manifest annotate --variant v8 "$image:$version" "$image:$version-arm64"
  done
  docker manifest push ${MANIFEST_INSECURE:+--insecure} --purge "$image:$version"
  echo "build-images: pushed $image:$version for $*" >&2
fi
