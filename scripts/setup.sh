#!/usr/bin/env bash
# Install everything `make test` / `make demo` need on a fresh machine; fast when already done.
#  - Debian packages: docker.io (dockerd, docker CLI, containerd), openssl, debootstrap,
#    qemu-user-static (the arm64 image test runs arm64 binaries under QEMU user emulation),
#    shellcheck (make lint: actionlint runs it on the workflows' run: scripts),
#    tpm2-tools (the TPM adapter's tools: engine/keys/tpm.py) and swtpm (the software TPM 2.0
#    that tests/tpm starts); both pull in the libtss2 libraries and their TCTI modules
#  - the binfmt_misc handler that hands arm64 binaries to QEMU (the kernel's, machine-wide)
#  - .venv with the pinned requirements.lock, this package and tools/controlplane (editable)
#  - the local Kubernetes control plane (built once, cached under ~/.cache)
#  - Debian's prometheus package (prometheus, promtool) unpacked into the cache, not installed:
#    the rules tests and the alert e2e start it themselves (tests/support/prometheus.py)
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v dockerd >/dev/null 2>&1 || need_apt+=(docker.io)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
command -v ctr >/dev/null 2>&1 || need_apt+=(containerd)
command -v debootstrap >/dev/null 2>&1 || need_apt+=(debootstrap)  # the image test's local base image
command -v shellcheck >/dev/null 2>&1 || need_apt+=(shellcheck)  # make lint: actionlint checks the workflows' scripts with it
command -v tpm2_unseal >/dev/null 2>&1 || need_apt+=(tpm2-tools)  # keys sealed to the TPM (engine/keys/tpm.py)
command -v swtpm >/dev/null 2>&1 || need_apt+=(swtpm)  # tests/tpm: a software TPM 2.0 (tests/support/tpm.py)
native_arch=$(dpkg --print-architecture 2>/dev/null || echo amd64)
if [ "$native_arch" != arm64 ]; then  # the arm64 image test, emulated
  [ -x /usr/bin/qemu-aarch64-static ] || need_apt+=(qemu-user-static)
fi
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
if ((${#need_apt[@]})); then
  echo "setup: installing Debian packages: ${need_apt[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

# arm64 binaries run through binfmt_misc: qemu-user-static ships the handler's definition
# (flags OPF: F opens QEMU at registration, so it also works inside containers and chroots);
# systemd registers it at boot, a machine without systemd (a container, CI) does not. The
# registration is the kernel's, machine-wide, until reboot. If it cannot be done here, the
# arm64 image test says why (and fails under CI).
handler=/proc/sys/fs/binfmt_misc/qemu-aarch64
if [ "$native_arch" != arm64 ] && [ ! -e "$handler" ] && [ -f /usr/lib/binfmt.d/qemu-aarch64.conf ]; then
  if { mountpoint -q /proc/sys/fs/binfmt_misc \
         || $SUDO mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc; } 2>/dev/null \
     && grep -v '^#' /usr/lib/binfmt.d/qemu-aarch64.conf | grep . \
          | $SUDO tee /proc/sys/fs/binfmt_misc/register >/dev/null 2>&1; then
    echo "setup: registered the arm64 binfmt_misc handler (QEMU user emulation)" >&2
  else
    echo "setup: warning: could not register the arm64 binfmt_misc handler; the arm64 image test cannot run" >&2
  fi
fi

# Prometheus for the tests: `apt-get download` + `dpkg-deb -x` (as tools/controlplane unpacks its
# packages), so no system service is installed or started. tests/support/prometheus.py looks here.
prom_cache="${XDG_CACHE_HOME:-$HOME/.cache}/imageunlock/prometheus"
if [ ! -x "$prom_cache/usr/bin/prometheus" ] || [ ! -x "$prom_cache/usr/bin/promtool" ]; then
  echo "setup: fetching Debian's prometheus package into $prom_cache" >&2
  debs=$(mktemp -d)
  download() { (cd "$debs" && apt-get download -qq -o APT::Sandbox::User=root prometheus >/dev/null 2>&1); }
  download || { $SUDO apt-get update -qq && download; }
  rm -rf "$prom_cache.partial"; mkdir -p "$(dirname "$prom_cache")"
  dpkg-deb -x "$debs"/prometheus_*.deb "$prom_cache.partial"
  rm -rf "$debs" "$prom_cache"
  mv "$prom_cache.partial" "$prom_cache"
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
