"""``imageunlock`` command line.

``imageunlock unlock --archive PATH --version TAG --api-url URL [--image NAME]... [--docker-host URL]``
unlocks one archive into the local Docker Engine, or with ``--runtime containerd`` into
containerd's ``k8s.io`` namespace (``--containerd-address``, ``--containerd-namespace``), where
kubelet runs pods from on a containerd node. Credentials come from the environment
(``IMAGEUNLOCK_EMAIL``, ``IMAGEUNLOCK_PASSWORD``), never from the command line, where other
users could read them. Progress goes to stderr; the exit status is 0 only when every image is
verified, 75 (EX_TEMPFAIL) for a transient fault worth retrying, 1 for any other failure,
each with one actionable line on stderr. On a terminal the progress is drawn as bars (rich);
otherwise it is plain ``imageunlock: <Phase>: <message>`` lines that scripts can parse.
``--output json`` adds one JSON object on stdout at the end (the schema is in README.md);
without it stdout stays empty. ``imageunlock --version`` prints the program's version.

``--key-sealing tpm [--tpm-tcti TCTI]`` keeps the archive's key sealed to the device's TPM 2.0
(only the sealed blob, beside the state file): a later unlock of the same archive unseals it
with no resource API; a new archive, a changed PCR or another TPM falls back to the API.

``imageunlock encrypt`` makes an archive in the same format (the publishing side);
``imageunlock agent`` runs the node agent (the DaemonSet) and ``imageunlock controller`` the
controller that writes each ImageUnlock's cluster summary.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TextIO

from imageunlock import __version__
from imageunlock.defaults import DEFAULT_IMAGES
from imageunlock.engine import runtimes
from imageunlock.engine.keys import DEFAULT_TCTI
from imageunlock.engine.keys.resource_api import ResourceApiKeySource
from imageunlock.engine.models import Credentials, KeySource, Phase, Runtime, UnlockRequest, UnlockResult
from imageunlock.engine.reclaim import DEFAULT_POLICY, Reclaimed, ReclaimPolicy, superseded
from imageunlock.engine.service import UnlockService
from imageunlock.errors import ConfigurationError, UnlockError

if TYPE_CHECKING:  # rich itself is imported only when a terminal is there to draw on
    from rich.console import Console
    from rich.progress import TaskID

    from imageunlock.engine.keys.sealed import SealedKeySource

EXIT_OK, EXIT_FAILED, EXIT_TEMPFAIL = 0, 1, 75  # usage errors: argparse's own 2

DEFAULT_API_URL = "https://api.azaion.com"
DEFAULT_ARCHIVE = "/opt/azaion/images.enc"
DEFAULT_VERSION = "latest"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imageunlock", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    # Only here: `unlock --version TAG` is the image tag, a different option of the subcommand.
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    unlock = sub.add_parser(
        "unlock",
        help="unlock an encrypted image archive into the Docker Engine or containerd",
        description="Credentials are read from IMAGEUNLOCK_EMAIL and IMAGEUNLOCK_PASSWORD.",
    )
    unlock.add_argument(
        "--archive",
        default=os.environ.get("IMAGES_PATH", DEFAULT_ARCHIVE),
        help="encrypted archive (default: $IMAGES_PATH or %(default)s)",
    )
    unlock.add_argument(
        "--version",
        default=os.environ.get("API_VERSION", DEFAULT_VERSION),
        help="image tag every image must have (default: $API_VERSION or %(default)s)",
    )
    unlock.add_argument(
        "--api-url",
        default=os.environ.get("RESOURCE_API_URL", DEFAULT_API_URL),
        help="resource API base URL (default: $RESOURCE_API_URL or %(default)s)",
    )
    unlock.add_argument(
        "--image",
        action="append",
        dest="images",
        metavar="NAME",
        help="image name to verify, repeatable (default: the 7 Azaion services)",
    )
    unlock.add_argument(
        "--runtime",
        choices=runtimes.names(),
        default=runtimes.DOCKER.name,
        help="container runtime to load into; kubelet on a containerd node runs pods from "
        "containerd, not Docker (default: %(default)s)",
    )
    for setting in (s for kind in runtimes.kinds() for s in kind.settings):  # --docker-host, --containerd-...
        default = (os.environ.get(setting.cli_env) if setting.cli_env else None) or setting.default
        unlock.add_argument(setting.flag, dest=setting.key, metavar=setting.metavar, default=default, help=setting.help)
    unlock.add_argument("--sha256", help="expected SHA-256 of the encrypted archive")
    unlock.add_argument(
        "--state-file",
        default=_default_state_file(),
        help="where the image IDs of verified unlocks are kept; only images holding those IDs "
        "are taken as already present (default: %(default)s)",
    )
    unlock.add_argument(
        "--reclaim-policy",
        choices=[p.value for p in ReclaimPolicy],
        default=DEFAULT_POLICY.value,
        help="what happens to the images of the version the previous unlock into this runtime verified "
        "(recorded in the state file), once this one is verified: Unpin lets kubelet's image garbage "
        "collection take them (containerd; nothing on Docker), Delete removes them unless a container "
        "uses them, Retain keeps them (default: %(default)s)",
    )
    unlock.add_argument(
        "--key-sealing",
        choices=("none", "tpm"),
        default="none",
        help="tpm: after a verified unlock, seal the archive's key to this device's TPM 2.0 and keep "
        "only the sealed blob beside the state file; later unlocks of the same archive then need "
        "no resource API (default: %(default)s)",
    )
    unlock.add_argument(
        "--tpm-tcti",
        default=None,
        metavar="TCTI",
        help="how to reach the TPM, as a TPM software stack TCTI string "
        f"(default: $IMAGEUNLOCK_TPM_TCTI or {DEFAULT_TCTI})",
    )
    unlock.add_argument(
        "--lock-timeout", type=float, default=600.0, help="seconds to wait for another unlock of the same archive"
    )
    unlock.add_argument(
        "--output",
        dest="format",
        choices=("text", "json"),
        default="text",
        help="json: also print one JSON object with the outcome on stdout at the end (default: %(default)s)",
    )

    encrypt = sub.add_parser("encrypt", help="encrypt an image tar into an archive (publishing side)")
    encrypt.add_argument("--input", required=True, help="plaintext image tar (docker save output)")
    encrypt.add_argument("--output", required=True, help="encrypted archive to write")
    encrypt.add_argument("--fragment-file", required=True, help="file holding the key fragment")

    sub.add_parser("agent", help="run the node agent (kopf; one per node), settings from the environment")
    sub.add_parser("controller", help="run the controller (kopf; the Lease holder writes): cluster summaries")
    return parser


class _Lines:
    """Not a terminal: one stderr line per phase, then every 10 % of the archive (scripts parse these)."""

    def __init__(self) -> None:
        self.phase: Phase | None = None
        self.decile = -1

    def __enter__(self) -> _Lines:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def __call__(self, phase: Phase, message: str, done: int, total: int) -> None:
        if phase != self.phase:
            self.phase, self.decile = phase, -1
            print(f"imageunlock: {phase.value}: {message}", file=sys.stderr, flush=True)
        if total and phase in (Phase.LOADING, Phase.PENDING) and done:
            decile = done * 10 // total
            if decile > self.decile:
                self.decile = decile
                print(
                    f"imageunlock: {phase.value}: {done * 100 // total}% of {total} bytes", file=sys.stderr, flush=True
                )


class _Bars:
    """A terminal: one line per phase, and a bar with rate and ETA while hashing (Pending) and Loading."""

    def __init__(self, console: Console) -> None:
        from rich import progress as rp

        columns = (rp.BarColumn(), rp.TaskProgressColumn(), rp.DownloadColumn(), rp.TransferSpeedColumn())
        self.progress = rp.Progress("{task.description}", *columns, rp.TimeRemainingColumn(), console=console)
        self.phase: Phase | None = None
        self.task: TaskID | None = None

    def __enter__(self) -> _Bars:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()  # leaves the last bars on screen, so error lines come after them

    def __call__(self, phase: Phase, message: str, done: int, total: int) -> None:
        if phase != self.phase:
            self.phase, self.task = phase, None
            self.progress.console.print(f"imageunlock: {phase.value}: {message}", markup=False, highlight=False)
        if total and phase in (Phase.LOADING, Phase.PENDING):
            if self.task is None:
                self.task = self.progress.add_task(message, total=total)
            self.progress.update(self.task, completed=done)


def _renderer(stream: TextIO) -> _Lines | _Bars:
    """Bars only for a person at a terminal; anything else keeps the plain, parseable lines."""
    if not stream.isatty():
        return _Lines()
    try:
        from rich.console import Console
    except ImportError:  # rich missing from a slim install: plain lines still say everything
        return _Lines()
    return _Bars(Console(file=stream))


def _default_state_file() -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "imageunlock", "verified-images.json")


def _read_document(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            document = json.load(f)
    except (OSError, ValueError):
        return {}
    return document if isinstance(document, dict) else {}


def _read_state(path: str) -> dict[str, str]:
    """``{ref: image ID}`` verified by earlier unlocks; anything unreadable counts as none
    (the next unlock is then a full one, which is always safe)."""
    images = _read_document(path).get("images")
    if not isinstance(images, dict):
        return {}
    return {k: v for k, v in images.items() if isinstance(k, str) and isinstance(v, str)}


def _read_current(path: str, runtime: str) -> list[str]:
    """The refs the last unlock into ``runtime`` verified (the state file's ``current``)."""
    current = _read_document(path).get("current")
    entry = current.get(runtime) if isinstance(current, dict) else None
    refs = entry.get("refs") if isinstance(entry, dict) else None
    return [ref for ref in refs if isinstance(ref, str)] if isinstance(refs, list) else []


def _write_state(
    path: str,
    verified: Mapping[str, str],
    current: tuple[str, str, Sequence[str]] | None = None,
    forget: Sequence[str] = (),
) -> None:
    """Record verified IDs. The directory must be the user's own and writable by no one else
    (a shared one would let another user plant IDs the fast path then trusts); the file is
    written through a fresh private temporary file, never through a name someone could
    have made a symlink."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    info = os.stat(directory)
    if info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise OSError(errno.EPERM, "directory is not the user's own or is writable by others", directory)
    document = _read_document(path)
    images = {ref: image_id for ref, image_id in {**_read_state(path), **verified}.items() if ref not in forget}
    known = document.get("current")
    currents: dict[str, Any] = dict(known) if isinstance(known, dict) else {}
    if current is not None:  # (runtime, version, refs): where the next run's reclaim starts
        runtime, version, refs = current
        currents[runtime] = {"version": version, "refs": list(refs)}
    body = {"images": images, **({"current": currents} if currents else {})}
    _write_atomically(path, json.dumps(body, indent=1, sort_keys=True).encode(), 0o600)


def _write_atomically(path: str, data: bytes | Iterable[bytes], mode: int = 0o644) -> None:
    """Write via a new temporary file beside ``path`` (O_EXCL: never an existing file or a
    planted symlink), then rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".imageunlock-", suffix=".part")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            for chunk in [data] if isinstance(data, bytes) else data:
                f.write(chunk)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _credentials() -> Credentials:
    email = os.environ.get("IMAGEUNLOCK_EMAIL", "")
    password = os.environ.get("IMAGEUNLOCK_PASSWORD", "")
    if not email or not password:
        raise ConfigurationError("set IMAGEUNLOCK_EMAIL and IMAGEUNLOCK_PASSWORD to the resource API account")
    return Credentials(email=email, password=password)


def _unlock(args: argparse.Namespace) -> int:
    runtime = runtimes.make_runtime(
        args.runtime, **{s.key: getattr(args, s.key) for s in runtimes.runtime_kind(args.runtime).settings}
    )
    # The account comes from the environment; the URL is the user's own choice (no allow-list).
    keys: KeySource = ResourceApiKeySource(args.api_url, _credentials)
    sealed = None
    if args.key_sealing == "tpm":
        keys = sealed = _sealed(args, keys)
    service = UnlockService(runtime, keys, lock_timeout=args.lock_timeout)
    request = UnlockRequest(
        archive_path=os.path.abspath(args.archive),
        version=args.version,
        images=tuple(args.images or DEFAULT_IMAGES),
        archive_sha256=args.sha256,
        known_ids=_read_state(args.state_file),
    )
    previous = _read_current(args.state_file, args.runtime)
    try:
        with _renderer(sys.stderr) as report:
            result = service.unlock(request, report)
        # Only now, with this version verified: a failed unlock keeps the old one runnable.
        reclaimed = _reclaim(runtime, ReclaimPolicy(args.reclaim_policy), previous, request.known_ids, result)
    except UnlockError as exc:
        if sealed is not None:
            sealed.failed(exc)  # a sealed key that did not unlock is not kept
        raise
    finally:
        runtime.close()
    if sealed is not None and not result.fast_path:
        if sealed.unsealed:
            print("imageunlock: the key came from this device's TPM (no resource API)", file=sys.stderr)
        sealed.keep()
    how = "already present" if result.fast_path else "loaded and verified"
    print(f"imageunlock: Ready: {len(result.images)} image(s) {how} at {args.version}", file=sys.stderr)
    if reclaimed is not None and (reclaimed.done or reclaimed.kept):
        print(f"imageunlock: Reclaimed: {reclaimed.message()}", file=sys.stderr)
    try:
        _write_state(
            args.state_file,
            {} if result.fast_path else result.images,
            # after a failed reclaim the old refs stay current: the next run tries again
            None if reclaimed is None else (args.runtime, args.version, list(result.images)),
            forget=reclaimed.done if reclaimed is not None and reclaimed.policy is ReclaimPolicy.DELETE else (),
        )
    except OSError as exc:  # the images are fine; only the next run's fast path is lost
        print(
            f"imageunlock: warning: could not record verified image IDs in {args.state_file}: {exc.strerror or exc}",
            file=sys.stderr,
        )
    outcome: dict[str, Any] = {
        "ready": True,
        "fastPath": result.fast_path,
        "version": args.version,
        "images": [{"name": ref, "id": image_id} for ref, image_id in result.images.items()],
        "archiveBytes": result.archive_bytes,
    }
    if reclaimed is not None and (reclaimed.done or reclaimed.kept):
        outcome["reclaimed"] = {
            "policy": reclaimed.policy.value,
            "refs": list(reclaimed.done),
            "kept": list(reclaimed.kept),
        }
    _emit_json(args, outcome)
    return EXIT_OK


def _reclaim(
    runtime: Runtime, policy: ReclaimPolicy, previous: Sequence[str], verified: Mapping[str, str], result: UnlockResult
) -> Reclaimed | None:
    """The refs of the version the previous run verified (``previous``), now that this one is
    verified: only those still holding the very image that run verified (``verified``: the
    state file's IDs), none this run wants. None when the runtime failed (the next run tries
    again). Images this run found rather than loaded are pinned again first."""
    try:
        if result.fast_path:  # a rollback to a version an earlier run unpinned: pinned again
            runtime.pin(list(result.images))
        refs = superseded({ref: verified.get(ref, "") for ref in previous}, runtime.image_ids(previous), result.images)
        if not refs or policy is ReclaimPolicy.RETAIN:
            return Reclaimed(policy, ())
        if policy is ReclaimPolicy.DELETE:
            removed, kept = runtime.remove(refs)
            return Reclaimed(policy, tuple(removed), tuple(kept))
        return Reclaimed(policy, tuple(runtime.unpin(refs)))
    except UnlockError as exc:
        print(f"imageunlock: warning: could not reclaim the previous version: {exc.message}", file=sys.stderr)
        return None


def _sealed(args: argparse.Namespace, keys: KeySource) -> SealedKeySource:
    """``keys`` behind the key sealed to this device's TPM, its blobs beside the state file."""
    from imageunlock.engine.keys.sealed import SEALED_DIR, SealedKeySource, SealedKeyStore, Sealing, archive_identity

    tcti = args.tpm_tcti or os.environ.get("IMAGEUNLOCK_TPM_TCTI") or DEFAULT_TCTI
    store = SealedKeyStore(os.path.join(os.path.dirname(os.path.abspath(args.state_file)), SEALED_DIR))
    identity = archive_identity("cli", f"resourceApi {args.api_url}", os.path.abspath(args.archive), sha256=args.sha256)
    return SealedKeySource(keys, store, identity, Sealing(tcti=tcti))


def _encrypt(args: argparse.Namespace) -> int:
    from imageunlock.engine.crypto import encrypt_stream, read_chunks

    with open(args.fragment_file, "rb") as f:
        fragment = f.read()
    if not fragment:
        raise ConfigurationError(f"fragment file {args.fragment_file!r} is empty")
    with open(args.input, "rb") as src:
        _write_atomically(args.output, encrypt_stream(read_chunks(src), fragment))
    return EXIT_OK


def _emit_json(args: argparse.Namespace, outcome: dict[str, Any]) -> None:
    """``--output json``: the outcome for scripts, the only thing ever written to stdout."""
    if getattr(args, "format", "text") == "json":
        print(json.dumps(outcome), flush=True)


def _fail(args: argparse.Namespace, code: int, reason: str, message: str, transient: bool) -> int:
    print(f"imageunlock: error: {message}", file=sys.stderr)
    error = {"reason": reason, "message": message, "transient": transient}
    _emit_json(args, {"ready": False, "error": error})
    return code


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "unlock":
            return _unlock(args)
        if args.command == "encrypt":
            return _encrypt(args)
        if args.command == "agent":  # each role's stack is imported only when it runs
            from imageunlock.agent.handlers import run
        else:
            from imageunlock.controller.handlers import run
        return run()
    except UnlockError as exc:
        code = EXIT_TEMPFAIL if exc.transient else EXIT_FAILED
        return _fail(args, code, exc.reason, exc.message, exc.transient)
    except OSError as exc:
        return _fail(args, EXIT_FAILED, "OSError", f"{exc.strerror or exc} ({exc.filename or ''})", False)
    except KeyboardInterrupt:
        error = {"reason": "Interrupted", "message": "interrupted", "transient": False}
        _emit_json(args, {"ready": False, "error": error})
        return 130
    except Exception as exc:  # a bug: still one line, the traceback only with -v
        logging.getLogger(__name__).debug("unexpected error", exc_info=True)
        message = f"unexpected {type(exc).__name__}; run with -v for details"
        return _fail(args, EXIT_FAILED, "InternalError", message, False)


if __name__ == "__main__":
    sys.exit(main())
