#!/usr/bin/env python3
"""Build-stage helper of the Dockerfile: wheels for the image's architecture, fetched and
installed by the build stage's own (native) Python, so that nothing runs under emulation but
what must.

    describe                  (target stage, the runtime base's python3) its architecture,
                              Python and C library as JSON on stdout
    pip-args TARGET.json      (build stage) check the build Python can install for that
                              target; print the pip options that select its wheels
    host-platform TARGET.json the target's sysconfig platform (for _PYTHON_HOST_PLATFORM)
    debian-arch TARGET.json   the target's Debian architecture name (amd64, arm64)
    check-pinned LOCK DIR     every wheel in DIR is at a version LOCK pins
    check-binaries DIR TARGET.json
                              every ELF file below DIR is for the target's machine

Standard library only; runs on the Python of any supported base (>= 3.11).
"""

from __future__ import annotations

import json
import os
import platform
import re
import sys
import sysconfig
from pathlib import Path

# Debian's names of the architectures the image is built for (uname -m names).
DEBIAN_ARCHES = {"x86_64": "amd64", "aarch64": "arm64"}
# ELF e_machine of the architectures the image is built for (uname -m names).
ELF_MACHINES = {0x3E: "x86_64", 0xB7: "aarch64"}
OLDEST_MANYLINUX = 17  # manylinux2014 = manylinux_2_17: the oldest tag aarch64 wheels carry


def describe() -> dict[str, object]:
    libc, libc_version = platform.libc_ver()
    return {
        "machine": platform.machine(),
        "platform": sysconfig.get_platform(),
        "python": "{}.{}".format(*sys.version_info[:2]),
        "executable": sys.executable,
        "libc": libc,
        "libc_version": libc_version,
    }


def load(path: str) -> dict[str, str]:
    return json.loads(Path(path).read_text())


def pip_args(target: dict[str, str]) -> list[str]:
    """The options of `pip download` that select the target's wheels and nothing else.

    The runtime virtualenv is created here by the build stage's python3 and used in the final
    image by the base's python3 at the same path, so both must be the same Python X.Y at the
    same path: the same distribution release for each architecture (BUILD_IMAGE).
    """
    build = describe()
    problems = [
        f"{key}: build {build[key]!r}, target {target[key]!r}"
        for key in ("python", "executable")
        if build[key] != target[key]
    ]
    if target["libc"] != "glibc":
        problems.append(f"libc: target {target['libc']!r} (only glibc bases have manylinux wheels)")
    if problems:
        sys.exit(
            "BUILD_IMAGE cannot install for BASE_IMAGE (use the same distribution release "
            "for both architectures): " + "; ".join(problems)
        )
    machine = target["machine"]
    major, minor = (int(part) for part in target["libc_version"].split(".")[:2])
    if major != 2 or minor < OLDEST_MANYLINUX:
        sys.exit(f"target glibc {target['libc_version']} is older than manylinux2014")
    # manylinux2014_<m> also admits manylinux2010/manylinux1 (x86_64); the PEP 600 tags up to
    # the target's glibc admit newer wheels (pip does not derive them from --platform).
    platforms = [f"manylinux2014_{machine}"] + [
        f"manylinux_2_{m}_{machine}" for m in range(OLDEST_MANYLINUX, minor + 1)
    ]
    cp = "cp" + target["python"].replace(".", "")
    args = ["--only-binary=:all:", "--implementation", "cp", "--python-version", target["python"]]
    for abi in (cp, "abi3", "none"):
        args += ["--abi", abi]
    for tag in platforms:
        args += ["--platform", tag]
    return args


def check_pinned(lock: str, directory: str) -> None:
    def norm(name: str, version: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower() + "==" + version

    lines = Path(lock).read_text().splitlines()
    pinned = {norm(*line.strip().split("==", 1)) for line in lines if "==" in line}
    wheels = {norm(*w.name.split("-")[:2]) for w in Path(directory).glob("*.whl")}
    bad = sorted(wheels - pinned)
    if bad:
        sys.exit(f"not pinned by requirements.lock: {bad}")


def check_binaries(directory: str, target: dict[str, str]) -> None:
    """Every ELF file (extension module, shared library) is for the target's machine."""
    wrong, seen = [], 0
    for root, _dirs, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            if os.path.islink(path):
                continue
            with open(path, "rb") as f:
                head = f.read(20)
            if len(head) < 20 or head[:4] != b"\x7fELF":
                continue
            seen += 1
            order = "little" if head[5] == 1 else "big"
            machine = ELF_MACHINES.get(int.from_bytes(head[18:20], order), f"e_machine {head[18:20].hex()}")
            if machine != target["machine"]:
                wrong.append(f"{path}: {machine}")
    if wrong:
        sys.exit(f"binaries not for {target['machine']}: " + ", ".join(wrong[:10]))
    print(f"image-target: {seen} binaries, all {target['machine']}", file=sys.stderr)


def main(argv: list[str]) -> None:
    match argv:
        case ["describe"]:
            print(json.dumps(describe(), sort_keys=True))
        case ["pip-args", target]:
            print(" ".join(pip_args(load(target))))
        case ["host-platform", target]:
            print(load(target)["platform"])
        case ["debian-arch", target]:
            print(DEBIAN_ARCHES[load(target)["machine"]])
        case ["check-pinned", lock, directory]:
            check_pinned(lock, directory)
        case ["check-binaries", directory, target]:
            check_binaries(directory, load(target))
        case _:
            sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
