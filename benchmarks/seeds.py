"""The seeds' baseline pipeline, as the old Loader's binary_split module did it: a child process.

    python benchmarks/seeds.py --archive A --api-url U --docker-host H --version V --out TAR --image NAME...

login → key fragment → decrypt to a plaintext tar on disk (64 KiB chunks) → ``docker load -i``
it → delete it → ``docker image inspect`` each image. Credentials come from
``IMAGEUNLOCK_EMAIL`` / ``IMAGEUNLOCK_PASSWORD``. Run standalone (no repository imports), so
its own CPU and RSS are the seeds' and not the benchmark's.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys

CHUNK = 64 * 1024  # the seeds' decrypt chunk


def seeds_pipeline(archive: str, api_url: str, docker_host: str, version: str, images: list[str], out: str) -> None:
    import requests
    from cryptography.hazmat.primitives import padding
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    email, password = os.environ["IMAGEUNLOCK_EMAIL"], os.environ["IMAGEUNLOCK_PASSWORD"]
    login = requests.post(f"{api_url}/login", json={"email": email, "password": password}, timeout=30)
    login.raise_for_status()
    token = login.json()["token"]
    response = requests.get(
        f"{api_url}/binary-split/key-fragment", headers={"Authorization": f"Bearer {token}"}, timeout=30
    )
    response.raise_for_status()
    key = hashlib.sha256(response.content).digest()

    # decrypt_archive(encrypted_path, key_fragment, output_path)
    with open(archive, "rb") as src, open(out, "wb") as dst:
        iv = src.read(16)
        decryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
        unpadder = padding.PKCS7(128).unpadder()
        while chunk := src.read(CHUNK):
            dst.write(unpadder.update(decryptor.update(chunk)))
        dst.write(unpadder.update(decryptor.finalize()) + unpadder.finalize())
    try:
        # docker_load(tar_path)
        subprocess.run(
            ["docker", "-H", docker_host, "load", "-i", out], check=True, stdout=subprocess.DEVNULL, timeout=3600
        )
    finally:
        try:
            os.remove(out)
        except OSError as exc:
            print(f"seeds: could not remove {out}: {exc}", file=sys.stderr)
    # check_images_loaded(version)
    for name in images:
        subprocess.run(
            ["docker", "-H", docker_host, "image", "inspect", f"{name}:{version}"],
            check=True, stdout=subprocess.DEVNULL, timeout=120,
        )  # fmt: skip


def command(
    python: str, archive: str, api_url: str, docker_host: str, version: str, out: str, images: list[str]
) -> list[str]:
    """The argv that runs :func:`seeds_pipeline` as a child process."""
    return [
        python, os.path.abspath(__file__), "--archive", archive, "--api-url", api_url,
        "--docker-host", docker_host, "--version", version, "--out", out,
        *[arg for name in images for arg in ("--image", name)],
    ]  # fmt: skip


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="seeds.py")
    parser.add_argument("--archive", required=True)
    parser.add_argument("--api-url", required=True)
    parser.add_argument("--docker-host", required=True)
    parser.add_argument("--version", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--image", action="append", required=True)
    args = parser.parse_args(argv)
    seeds_pipeline(args.archive, args.api_url, args.docker_host, args.version, args.image, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
