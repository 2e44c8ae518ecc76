#!/usr/bin/env bash
# Install everything `make test` / `make demo` need on a fresh machine; fast when already done.
#  - Debian packages: docker.io (dockerd, docker CLI, containerd), openssl
#  - .venv with the pinned requirements.lock, this package and tools/controlplane (editable)
#  - the local Kubernetes control plane (built once, cached under ~/.cache)
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v dockerd >/dev/null 2>&1 || need_apt+=(docker.io)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
command -v ctr >/dev/null 2>&1 || need_apt+=(containerd)
command -v debootstrap >/dev/null 2>&1 || need_apt+=(debootstrap)  # the image test's local base image
if ((${#need_apt[@]})); then
  echo "setup: installing Debian packages: ${need_apt[*]}" >&2
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
stamp=.venv/.installed
want="$(sha256sum requirements.lock pyproject.toml tools/controlplane/pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: creating .venv from requirements.lock" >&2
  "$PY" -m venv .venv
  .venv/bin/pip install -qq --disable-pip-version-check -r requirements.lock
  .venv/bin/pip install -qq --disable-pip-version-check --no-deps --no-build-isolation -e .
  # The control plane is a separate, development-only distribution: importable as
  # `controlplane` in .venv, never part of the operator's wheel or image.
  .venv/bin/pip install -qq --disable-pip-version-check --no-deps --no-build-isolation -e tools/controlplane
  echo "$want" > "$stamp"
fi

if [ "${SETUP_SKIP_CONTROLPLANE:-}" != 1 ]; then
  .venv/bin/python -m controlplane build >&2
fi
