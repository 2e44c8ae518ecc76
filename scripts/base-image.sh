#!/usr/bin/env bash
# A local stand-in for the official slim Python base image, for building the operator image
# where no registry is reachable (the image tests, air-gapped machines).
#
# Builds, once, a minimal Debian root filesystem with Python 3 and venv support
# (debootstrap --variant=minbase, from the machine's own Debian mirror) and caches it as a
# tarball under ${XDG_CACHE_HOME:-~/.cache}/imageunlock/base-image/. Prints the tarball's
# path. Import it and build against it with:
#
#   docker import "$(scripts/base-image.sh)" imageunlock-base:bookworm
#   docker build --build-arg BASE_IMAGE=imageunlock-base:bookworm -t imageunlock:dev .
#
# Another architecture: BASE_ARCH=arm64 (a Debian architecture name) debootstraps that
# architecture's packages; their maintainer scripts run under QEMU user emulation, which
# needs Debian's qemu-user-static registered with binfmt_misc with the F flag (scripts/setup.sh
# does both). That takes several minutes once (cached like the native one, in a file named
# with the architecture). Load such a root filesystem with its architecture in the image
# config (`docker import` would record the daemon's own):
#
#   scripts/rootfs-image.py "$(BASE_ARCH=arm64 scripts/base-image.sh)" --arch arm64 \
#       --tag imageunlock-base:bookworm-arm64 | docker load
#
# Needs root (or passwordless sudo) for debootstrap; installs debootstrap if it is missing.
# Environment: BASE_SUITE (default bookworm, the suite of python:3.11-slim-bookworm),
# BASE_MIRROR (default: the first non-security Debian URI in /etc/apt), BASE_ARCH (default:
# this machine's own).
set -euo pipefail

suite=${BASE_SUITE:-bookworm}
recipe=2 # bump when the package list or the trimming below changes
include=python3,python3-venv,ca-certificates,passwd
cache="${XDG_CACHE_HOME:-$HOME/.cache}/imageunlock/base-image"
native=$(dpkg --print-architecture 2>/dev/null || echo amd64)
arch=${BASE_ARCH:-$native}
# The machine's own architecture keeps the name it always had (existing caches stay valid).
name="debian-$suite-python3"
[ "$arch" = "$native" ] || name="debian-$suite-$arch-python3"
out="$cache/$name-r$recipe.tar.gz"

if [ -s "$out" ]; then
  echo "$out"
  exit 0
fi
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock -w 1800 9 || { echo "base-image: could not take $cache/.lock" >&2; exit 1; }
if [ -s "$out" ]; then # built by another process while we waited
  echo "$out"
  exit 0
fi

SUDO=""
if [ "$(id -u)" != 0 ]; then
  sudo -n true 2>/dev/null || { echo "base-image: debootstrap needs root or passwordless sudo" >&2; exit 1; }
  SUDO="sudo -n"
fi
if ! command -v debootstrap >/dev/null 2>&1; then
  echo "base-image: installing debootstrap" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive NEEDRESTART_SUSPEND=1 $SUDO apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
fi

foreign=()
if [ "$arch" != "$native" ]; then
  # debootstrap's second stage runs the target's binaries in a chroot: the kernel must hand
  # them to a statically linked QEMU opened at registration (flag F), as setup.sh registers.
  case "$arch" in arm64) qemu_arch=aarch64 ;; amd64) qemu_arch=x86_64 ;; armhf | armel) qemu_arch=arm ;; *) qemu_arch=$arch ;; esac
  handler=/proc/sys/fs/binfmt_misc/qemu-$qemu_arch
  if ! grep -qx enabled "$handler" 2>/dev/null || ! grep -q '^flags:.*F' "$handler"; then
    echo "base-image: $arch binaries cannot run here: no binfmt_misc handler qemu-$qemu_arch with flag F" \
      "(install qemu-user-static; scripts/setup.sh registers it)" >&2
    exit 1
  fi
  foreign=(--arch="$arch")
fi

mirror=${BASE_MIRROR:-}
if [ -z "$mirror" ]; then
  mirror=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '/^URIs:/ {for (i = 2; i <= NF; i++) print $i}' \
    | grep -v security | head -n1 || true)
fi
if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
  mirror=$(awk '/^deb / && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list)
fi
mirror=${mirror:-http://deb.debian.org/debian}

work=$(mktemp -d "$cache/build.XXXXXX")
cleanup() {
  # debootstrap mounts proc/sys inside the target; an interrupted run may leave them.
  grep -o " $work/root/[^ ]*" /proc/mounts 2>/dev/null | sort -r | xargs -r $SUDO umount -l 2>/dev/null || true
  $SUDO rm -rf --one-file-system "$work"
}
trap cleanup EXIT
echo "base-image: debootstrap $suite $arch from $mirror (once; cached in $cache)" >&2
if ! $SUDO timeout 1500 debootstrap "${foreign[@]}" --variant=minbase --include="$include" "$suite" "$work/root" "$mirror" \
    >"$work/debootstrap.log" 2>&1; then
  echo "base-image: debootstrap failed:" >&2
  tail -n 30 "$work/debootstrap.log" >&2
  exit 1
fi
# Slim it the way the official slim images are: no package caches, lists, docs, man pages
# or translations.
$SUDO rm -rf "$work/root/var/cache/apt/archives/"*.deb "$work/root/var/lib/apt/lists/"* \
  "$work/root/usr/share/doc" "$work/root/usr/share/man" "$work/root/usr/share/info" \
  "$work/root/usr/share/locale" "$work/root/usr/share/lintian" "$work/root/usr/share/bash-completion" \
  "$work/root/var/log/"*.log "$work/root/var/cache/debconf/"*-old
$SUDO tar -C "$work/root" --numeric-owner -czf "$work/rootfs.tar.gz" .
$SUDO chown "$(id -u):$(id -g)" "$work/rootfs.tar.gz"
mv "$work/rootfs.tar.gz" "$out"
for old in "$cache/$name"-r*.tar.gz; do # earlier recipes of this suite and architecture
  [ "$old" = "$out" ] || rm -f "$old"
done
echo "$out"
