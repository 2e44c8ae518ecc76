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
# Needs root (or passwordless sudo) for debootstrap; installs debootstrap if it is missing.
# Environment: BASE_SUITE (default bookworm, the suite of python:3.11-slim-bookworm),
# BASE_MIRROR (default: the first non-security Debian URI in /etc/apt).
set -euo pipefail

suite=${BASE_SUITE:-bookworm}
recipe=2 # bump when the package list or the trimming below changes
include=python3,python3-venv,ca-certificates,passwd
cache="${XDG_CACHE_HOME:-$HOME/.cache}/imageunlock/base-image"
out="$cache/debian-$suite-python3-r$recipe.tar.gz"

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
echo "base-image: debootstrap $suite from $mirror (once; cached in $cache)" >&2
if ! $SUDO timeout 1500 debootstrap --variant=minbase --include="$include" "$suite" "$work/root" "$mirror" \
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
for old in "$cache"/debian-*-python3-r*.tar.gz; do # earlier recipes
  [ "$old" = "$out" ] || rm -f "$old"
done
echo "$out"
