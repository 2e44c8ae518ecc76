"""Adapter: containerd, through its ``ctr`` command line (Debian's ``containerd`` package).

On a node where kubelet talks to containerd (k3s, kubeadm, every cluster since dockershim
left Kubernetes in 1.24) pods run from containerd's ``k8s.io`` namespace, never from a
Docker Engine: this runtime imports there. It needs ``ctr`` on PATH and containerd's socket.

``load`` streams the plaintext into ``ctr images import --all-platforms -`` through a pipe:
no file, and memory bounded by one chunk (plus the kernel's pipe buffer). ``--all-platforms``
because ``docker load`` loads an image whatever its platform; without it ctr refuses one
that is not the node's ("image might be filtered out"). Two facts about ctr shape the rest:

* ctr imports as soon as its tar reader meets the end-of-archive marker (two zero blocks):
  it does not wait for the end of its input. So every trailing run of zero bytes is held
  back (as a count, not in memory) until non-zero data follows it or the stream has ended
  without error, and if the chunk iterator raises, ctr is killed (SIGKILL) before its input
  is closed. The stream's checks refuse anything but zero blocks after an end marker, so no
  marker can hide in the data released before that: ctr never sees a complete archive
  before the iterator has finished, and a killed ctr creates no image. Should ctr finish
  early all the same, the rest of the stream is still checked, and what ctr imported is
  removed if that fails.
* an interrupted import leaves the blobs it had already written in the content store, held
  by ctr's own lease (24 hours, then containerd's garbage collector deletes them); no image
  record, no snapshot.
* ctr creates every image record before it unpacks any: when the unpack fails (a layer that
  is no tar, a full disk) the records exist. Those this import created or changed are
  removed again, so no broken image stays pinned — and only those: a record counts as this
  import's only if its name is one the import may create (a requested ref: the stream
  checks refuse an archive that names anything else) or one ctr reported for it. Another
  import's images are never touched, and no other import runs meanwhile: every import
  into one containerd on a node (agent workers and CLI runs alike) holds that socket's
  import lock (importlock.py).

After the import every image ctr reports is labelled ``io.cri-containerd.pinned=pinned``
(ctr ≥ 2.0 also sets it during the import): the CRI reports such an image as pinned, and
kubelet's image garbage collection never removes a pinned image. containerd honours the
label from 1.7.3; an older daemon is logged as such. ``image_ids`` reads each image
record's manifest (``ctr content get``) for the config digest: the image ID the CRI (and
Docker) report. Refs are compared as containerd names them (``docker.io/azaion/x:1``).

Image lifecycle. ``load(owner=...)`` labels every image it imports
``unlock.loader.azaion.com/owner=<namespace>/<name>`` together with the pin (at import time
with ctr >= 2, right after it with ctr 1.x), and ``unlock.loader.azaion.com/ref=<its own
name>`` right after: the image record itself says which ImageUnlock this node loaded it for,
so a restarted agent finds it (``owned_refs``) and never takes an image it did not load for
its own — not even a copy someone made with ``ctr images tag``, which copies every label but
cannot make the ref label name the copy, nor the name imported or pulled again since
(containerd 1.6 keeps the labels on it): ``unlock.loader.azaion.com/digest`` holds the target
digest this node loaded. Labels read back are checked as on write (an owner
``<namespace>/<name>``, a tagged name); a record that fails is not ours.
``unpin`` removes the pin label (the owner label stays):
kubelet's image garbage collection may then remove the image under disk pressure.
``remove`` deletes image records by name (``ctr images rm``: a record is one name; another
name of the same image is another record, left alone) unless a container in the namespace —
running or stopped, the CRI's included: the CRI's containers are containerd containers in
``k8s.io`` carrying the CRI's own image ID — was made from that image (compared by image ID).
When no name is left for an image, the CRI's own ``sha256:<id>`` record goes too, or it would
keep the image's content (and its disk space) alive.

A full disk during an import is :class:`InsufficientStorageError`; besides the undo above, a
synchronous garbage collection then deletes the blobs and the unfinished ingest ctr left, so
the space the import took is free again (no other import runs: the import lock is held).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import platform
import re
import shutil
import stat
import subprocess
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import IO, Any

from imageunlock.engine.models import OwnershipRecord, check_owner, is_owner
from imageunlock.engine.refs import is_tagged_ref, normalize_ref
from imageunlock.engine.runtimes import CONTAINERD
from imageunlock.engine.runtimes.importlock import exclusive_import
from imageunlock.errors import (
    ArchiveRejectedError,
    ConfigurationError,
    InsufficientStorageError,
    LoadError,
    RuntimeUnavailableError,
    UnlockError,
)

log = logging.getLogger(__name__)

_DEFAULTS = {s.key: str(s.default) for s in CONTAINERD.settings}
DEFAULT_ADDRESS = _DEFAULTS["containerd_address"]
DEFAULT_NAMESPACE = _DEFAULTS["containerd_namespace"]  # the CRI's: the only one kubelet runs pods from
DEFAULT_TIMEOUT = 900.0
PINNED_LABEL = "io.cri-containerd.pinned=pinned"
PINNED_KEY = PINNED_LABEL.partition("=")[0]
OWNER_KEY = "unlock.loader.azaion.com/owner"  # value: <namespace>/<name> of the ImageUnlock
# value: the record's own name. ``ctr images tag`` copies every label to the new name: a
# record whose name is not this one is someone's copy, not an image this node loaded.
REF_KEY = "unlock.loader.azaion.com/ref"
# value: the target digest this node loaded. A later ``ctr import`` or CRI pull of the same
# name points the record at other content but keeps every label: no longer ours.
DIGEST_KEY = "unlock.loader.azaion.com/digest"
CRI_METADATA = "io.cri-containerd.container.metadata"  # the CRI's record of a container (JSON)
PINNING_FROM = (1, 7, 3)  # the first containerd whose CRI honours the pinned label
COMMAND_TIMEOUT = 60.0  # ctr calls other than the import
_ZEROS = bytes(64 * 1024)
BLOCK = 512  # the tar block
_OUTPUT_LIMIT = 64 * 1024  # bytes of ctr's stderr kept for an error message
_MAX_NAMES = 10_000
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_IMPORTED = re.compile(r"^unpacking (\S+) \((sha256:[0-9a-f]{64})\)")
_VERSION = re.compile(r"(\d+)\.(\d+)\.(\d+)")
_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "armv6l": "arm", "i686": "386"}


def _version(text: str | None) -> tuple[int, int, int] | None:
    found = _VERSION.search(text or "")
    return (int(found[1]), int(found[2]), int(found[3])) if found else None


class _Collector(threading.Thread):
    """Reads one of ctr's output pipes to its end (so ctr never blocks on a full pipe),
    keeping the names ctr reports as imported and the last ``_OUTPUT_LIMIT`` bytes."""

    def __init__(self, pipe: IO[bytes]) -> None:
        super().__init__(name="ctr-output", daemon=True)
        self.pipe = pipe
        self.tail = b""
        self.names: list[str] = []

    def run(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            for line in self.pipe:
                self.tail = (self.tail + line)[-_OUTPUT_LIMIT:]
                if (found := _IMPORTED.match(line.decode(errors="replace"))) and len(self.names) < _MAX_NAMES:
                    self.names.append(found[1])

    @property
    def text(self) -> str:
        return self.tail.decode(errors="replace")


class _Pipe:
    """ctr's standard input: writes whole chunks, holding back trailing zero bytes and one or
    two last bytes, so that what ctr has read never ends on a 512-byte tar block boundary
    until the stream has passed its checks. Should this process die mid-stream (the OOM
    killer, SIGKILL) and the kernel close ctr's input, ctr meets a truncated block — an
    error — never what Go's tar reader takes for a clean end of the archive."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.zeros = 0  # zero bytes received and not yet passed on
        self.pending = b""  # the last one or two bytes received, not yet passed on
        self.sent = 0  # bytes ctr has been given

    def feed(self, chunk: bytes) -> bool:
        """False once ctr has stopped reading."""
        if not chunk:
            return True
        if chunk[-1]:  # the usual case: no zeros to hold back
            return self.flush() and self._write(chunk)
        body = chunk.rstrip(b"\0")
        if not body:
            self.zeros += len(chunk)
            return True
        if not (self.flush() and self._write(body)):
            return False
        self.zeros = len(chunk) - len(body)
        return True

    def flush(self) -> bool:
        while self.zeros:
            n = min(self.zeros, len(_ZEROS))
            if not self._write(_ZEROS[:n]):
                return False
            self.zeros -= n
        return True

    def close(self) -> bool:
        """The stream has passed its checks: everything held back goes to ctr."""
        if not self.flush():
            return False
        pending, self.pending = self.pending, b""
        return self._send(pending)

    def _write(self, data: bytes) -> bool:
        if not data:
            return True
        available = len(self.pending) + len(data)
        keep = min(available, 1 if (self.sent + available - 1) % BLOCK else 2)
        pending, count = self.pending, available - keep
        from_pending = min(count, len(pending))
        self.pending = (pending[from_pending:] + data[-keep:])[-keep:]
        return self._send(pending[:from_pending]) and self._send(memoryview(data)[: count - from_pending])

    def _send(self, data: bytes | memoryview) -> bool:
        view = memoryview(data)
        try:
            while view:
                written = os.write(self.fd, view)
                self.sent += written
                view = view[written:]
        except BrokenPipeError:
            return False
        return True


def child_env() -> dict[str, str]:
    """What ``ctr`` inherits: where programs and temporary files are, nothing else (the CLI's
    IMAGEUNLOCK_PASSWORD, or anything else of ours in the environment, is none of its business)."""
    return {name: os.environ[name] for name in ("PATH", "TMPDIR") if name in os.environ} | {"LC_ALL": "C"}


class _Import:
    """One running ``ctr images import``: the process, its output readers and a watchdog."""

    def __init__(self, args: list[str], timeout: float) -> None:
        self.proc = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env()
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None and self.proc.stderr is not None
        self.stdin = self.proc.stdin
        self.out, self.err = _Collector(self.proc.stdout), _Collector(self.proc.stderr)
        self.out.start()
        self.err.start()
        self.expired = False
        self.watchdog = threading.Timer(timeout, self._expire)
        self.watchdog.daemon = True
        self.watchdog.start()
        self.pipe = _Pipe(self.stdin.fileno())

    def _expire(self) -> None:
        self.expired = True
        with contextlib.suppress(OSError):
            self.proc.kill()  # before its input ends: it imports nothing

    def kill(self) -> None:
        """SIGKILL first, close its input after: ctr must never see the end of its input."""
        with contextlib.suppress(OSError):
            self.proc.kill()
        self.finish(close_first=False)

    def finish(self, close_first: bool = True) -> int:
        """Close ctr's input (after a kill: only then), wait for it, collect its output."""
        if close_first:
            with contextlib.suppress(OSError):
                self.stdin.close()
        code = self.proc.wait()
        with contextlib.suppress(OSError):
            self.stdin.close()
        self.watchdog.cancel()
        self.out.join()
        self.err.join()
        return code

    @property
    def message(self) -> str:
        """ctr's own error line (``ctr: ...``), else its last line, shortened."""
        lines = [line.strip() for line in self.err.text.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("ctr: ")]
        return ((errors or lines or ["no error output"])[-1])[:500]


class ContainerdRuntime:
    name = CONTAINERD.name

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        namespace: str = DEFAULT_NAMESPACE,
        timeout: float = DEFAULT_TIMEOUT,
        ctr: str = "ctr",
    ) -> None:
        self.address = address.removeprefix("unix://")
        self.namespace = namespace
        self.timeout = timeout
        self.ctr = ctr
        self._configs: dict[str, str] = {}  # manifest or index digest -> config digest
        self._client: tuple[int, int, int] | None = None
        self._server: tuple[int, int, int] | None = None
        self._warned = False

    # -- running ctr -------------------------------------------------------------------

    def _binary(self) -> str:
        found = shutil.which(self.ctr)
        if found is None:
            raise ConfigurationError(
                f"{self.ctr!r} (containerd's command line) is not on PATH: the containerd runtime "
                "needs it (Debian: apt install containerd; the operator image must include it)"
            )
        return found

    def _unreachable(self, detail: str) -> RuntimeUnavailableError:
        return RuntimeUnavailableError(
            f"containerd at {self.address} is not reachable ({detail}); "
            "check that it runs and that its socket is mounted"
        )

    def _check_socket(self) -> None:
        """Fail fast: an absent socket makes older ctr wait 10 s before it gives up."""
        try:
            info = os.stat(self.address)
        except FileNotFoundError:
            raise self._unreachable("no socket") from None
        except OSError as exc:
            raise self._unreachable(exc.strerror or type(exc).__name__) from None
        if not stat.S_ISSOCK(info.st_mode):
            raise self._unreachable("not a socket")

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [self._binary(), "-a", self.address, "-n", self.namespace, *args]
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, errors="replace", timeout=COMMAND_TIMEOUT, env=child_env()
            )
        except subprocess.TimeoutExpired:
            raise self._unreachable(f"ctr {args[0]} did not answer within {COMMAND_TIMEOUT:.0f}s") from None
        if check and done.returncode != 0:
            raise self._failure(_last_line(done.stderr), load=False)
        return done

    def _failure(self, message: str, load: bool, fed: int = 0) -> UnlockError:
        """Classify what ctr said (``fed``: the bytes the import was given). Our stream checks
        passed, so a refused import is the archive's own content and permanent; only trouble
        reaching containerd or on the node is transient, and a full disk says so."""
        verdict = CONTAINERD.classifier.verdict(message)
        if verdict == "unreachable":
            return self._unreachable(message)
        if load and verdict == "no-space":
            return InsufficientStorageError("containerd", message, fed)
        if verdict in ("node", "no-space"):
            return LoadError(f"containerd could not import the archive: {message}")
        if not load:
            return self._unreachable(message)  # a listing or label call: containerd is the problem
        return ArchiveRejectedError(
            f"containerd refused the archive's content: {message}; it passed the stream checks, so the "
            "archive itself is malformed: rebuild it (retrying the same archive cannot help)"
        )

    def _versions(self) -> tuple[tuple[int, int, int], tuple[int, int, int] | None]:
        """ctr's own version and the daemon's (``ctr version``; raises when unreachable)."""
        if self._client is None or self._server is None:
            done = self._run("version", check=False)
            client = re.search(r"Client:\s*\n\s*Version:\s*(\S+)", done.stdout)
            server = re.search(r"Server:\s*\n\s*Version:\s*(\S+)", done.stdout)
            if done.returncode != 0 or server is None:
                raise self._failure(_last_line(done.stderr) or "no answer", load=False)
            self._client = _version(client[1] if client else None) or (0, 0, 0)
            self._server = _version(server[1])
        return self._client, self._server

    # -- the Runtime protocol --------------------------------------------------------------

    def close(self) -> None:
        return None  # every call is its own ctr process: nothing is held open

    def ping(self) -> None:
        self._check_socket()
        self._client = self._server = None  # ask again: the daemon may have been upgraded
        self._versions()

    def image_ids(self, refs: Sequence[str]) -> dict[str, str | None]:
        """``{ref: config digest or None when absent}``, each ref looked up under its
        CRI-normalised name."""
        self._check_socket()
        records = self._records()
        return {ref: self._config_digest(records.get(normalize_ref(ref))) for ref in refs}

    def load(self, chunks: Iterable[bytes], refs: Sequence[str], owner: str | None = None) -> list[str]:
        """Import the archive streamed as ``chunks`` (which may create only ``refs``); pin
        (and, with ``owner``, label as that ImageUnlock's) and return what ctr imported. One
        import at a time per containerd on this node."""
        labels = [PINNED_LABEL] + ([f"{OWNER_KEY}={check_owner(owner)}"] if owner is not None else [])
        binary = self._binary()
        self._check_socket()
        client, _server = self._versions()
        with exclusive_import(self.name, self.address, self.timeout):
            return self._load(binary, client, iter(chunks), {normalize_ref(ref) for ref in refs}, labels)

    def _load(
        self,
        binary: str,
        client: tuple[int, int, int],
        stream: Iterator[bytes],
        refs: set[str],
        labels: list[str],
    ) -> list[str]:
        args = [binary, "-a", self.address, "-n", self.namespace, "images", "import", "--all-platforms"]
        if client >= (2, 0, 0):  # client-side import (as ctr 1.x does); labelled from the start
            args += ["--local", *(arg for label in labels for arg in ("--label", label))]
        args.append("-")
        before = self._records()
        running = _Import(args, self.timeout)
        fed = 0
        try:
            for chunk in stream:
                fed += len(chunk)
                if not running.pipe.feed(chunk):
                    ended = False
                    break
            else:
                ended = True
            if ended:
                running.pipe.close()  # ctr may stop reading at the end marker: that is fine
        except BaseException:  # the stream failed (or we were interrupted): nothing may load
            running.kill()
            raise
        code = running.finish()
        if running.expired:
            _close(stream)
            raise LoadError(f"ctr did not finish importing within {self.timeout:.0f}s (IMAGEUNLOCK_RUNTIME_TIMEOUT)")
        if code < 0:
            _close(stream)
            raise LoadError(f"ctr was killed by signal {-code} while importing")
        if code != 0:
            _close(stream)
            failure = self._failure(running.message, load=True, fed=fed)
            full = isinstance(failure, InsufficientStorageError)
            if ended or full:  # ctr may have created records before failing
                self._undo(before, refs | set(running.out.names))
            if full:  # and free the space its blobs and ingest hold
                self._collect_garbage()
            raise failure
        names = running.out.names
        if not ended:
            # ctr finished before the stream did: the rest must still pass its checks, or
            # what ctr imported goes again.
            try:
                for _ in stream:
                    pass
            except BaseException:
                self._undo(before, set(names))
                raise
        self._pin(names, labels)
        return names

    # -- image lifecycle ---------------------------------------------------------------------

    def owned_refs(self) -> list[OwnershipRecord]:
        """The image records labelled ``unlock.loader.azaion.com/owner``: what this node loaded,
        and for which ImageUnlock."""
        self._check_socket()
        owned = []
        for name, (_kind, digest, text) in sorted(self._records().items()):
            labels = _labels(text)
            owner = labels.get(OWNER_KEY)
            if owner is None or labels.get(REF_KEY) != name or labels.get(DIGEST_KEY) != digest:
                continue  # someone's copy (ctr images tag), or content imported since
            if is_owner(owner) and is_tagged_ref(name):  # as load() labels it: never a forged owner
                owned.append(OwnershipRecord(name, owner))
            else:
                log.warning("image %s: malformed ownership label %s=%r ignored", name, OWNER_KEY, owner)
        return owned

    def unpin(self, refs: Sequence[str]) -> list[str]:
        """Remove the ``io.cri-containerd.pinned`` label from these refs' image records (the
        owner label stays): kubelet's image garbage collection may then remove them. Returns
        the names that were pinned and are not any more."""
        self._check_socket()
        records = self._records()
        unpinned = []
        for name in dict.fromkeys(normalize_ref(ref) for ref in refs):
            if name in records and PINNED_KEY in _labels(records[name][2]):
                self._run("images", "label", name, f"{PINNED_KEY}=")  # an empty value removes it
                unpinned.append(name)
        return unpinned

    def pin(self, refs: Sequence[str]) -> list[str]:
        """Label these refs' image records ``io.cri-containerd.pinned=pinned`` again where an
        :meth:`unpin` took it off (a rollback that found the images still there). Returns the
        names that were not pinned and now are."""
        self._check_socket()
        records = self._records()
        pinned = []
        for name in dict.fromkeys(normalize_ref(ref) for ref in refs):
            if name in records and PINNED_KEY not in _labels(records[name][2]):
                self._run("images", "label", name, PINNED_LABEL)
                pinned.append(name)
        return pinned

    def remove(self, refs: Sequence[str]) -> tuple[list[str], list[str]]:
        """Delete these refs' image records unless a container in the namespace, running or
        stopped (the CRI's too), was made from the image: ``(removed or already absent, kept
        because in use)``, as given. By name: an image another name still holds stays; the
        CRI's ``sha256:<id>`` record goes with the last name. Holds the import lock."""
        self._check_socket()
        with exclusive_import(self.name, self.address, self.timeout):
            records = self._records()
            used = self._images_in_use(records)
            removed: list[str] = []
            kept: list[str] = []
            gone: list[str] = []
            for ref in refs:
                name = normalize_ref(ref)
                if name not in records:
                    removed.append(ref)
                elif (config := self._config_digest(records[name])) is None or config in used:
                    kept.append(ref)  # in use, or its image ID cannot be told: keep it
                else:
                    removed.append(ref)
                    gone.append(name)
            if gone:
                self._run("images", "rm", "--sync", *gone)
                left = self._records()
                orphans = {self._config_digest(records[name]) for name in gone} - {
                    self._config_digest(record) for n, record in left.items() if not n.startswith("sha256:")
                }
                cri_records = [digest for digest in orphans if digest and digest in left]
                if cri_records:
                    self._run("images", "rm", "--sync", *cri_records)
            return removed, kept

    def _images_in_use(self, records: dict[str, tuple[str, str, str]]) -> set[str]:
        """Image IDs (config digests) of every container in the namespace: the image it names
        (``ctr containers info``) and, for the CRI's, the image ID the CRI recorded for it —
        what CRI ListContainers reports as its image ref."""
        used: set[str] = set()
        for container in self._run("containers", "ls", "-q").stdout.split():
            done = self._run("containers", "info", container, check=False)
            if done.returncode != 0:
                continue  # deleted meanwhile
            try:
                info = json.loads(done.stdout)
            except ValueError:
                continue
            image = info.get("Image") if isinstance(info, dict) else None
            if isinstance(image, str) and image:
                if _DIGEST.match(image):
                    used.add(image)
                if (config := self._config_digest(records.get(image))) is not None:
                    used.add(config)
            cri_ref = _cri_image_ref(info)
            if cri_ref is not None:
                used.add(cri_ref)
        return used

    def _collect_garbage(self) -> None:
        """A synchronous garbage collection (containerd runs one when a lease is removed with
        ``--sync``): deletes the blobs and the unfinished ingest a failed import left."""
        with contextlib.suppress(UnlockError):
            lease = self._run("leases", "create", "--expires", "1m").stdout.split()
            if lease:
                self._run("leases", "rm", "--sync", lease[0])

    # -- helpers -----------------------------------------------------------------------

    def _pin(self, names: Iterable[str], labels: Sequence[str] = (PINNED_LABEL,)) -> None:
        """Label each imported record: the pin, and with an owner also its own name (REF_KEY)."""
        owned = any(label.startswith(OWNER_KEY + "=") for label in labels)
        records = self._records() if owned else {}
        for name in names:
            mine = [f"{REF_KEY}={name}", f"{DIGEST_KEY}={records[name][1]}"] if name in records else []
            self._run("images", "label", name, *labels, *mine)
        server = self._server
        if server is not None and server < PINNING_FROM and not self._warned:
            self._warned = True
            log.warning(
                "containerd %s ignores the %s label (honoured from 1.7.3): kubelet's image garbage "
                "collection may remove unlocked images when the disk fills",
                ".".join(map(str, server)),
                PINNED_LABEL,
            )

    def _remove(self, names: Sequence[str]) -> None:
        if names:
            with contextlib.suppress(UnlockError):
                self._run("images", "rm", *names, check=False)

    def _undo(self, before: dict[str, tuple[str, str, str]], ours: set[str]) -> None:
        """After a refused import (a layer that does not unpack, a full disk): ctr creates every
        image record first and unpacks after, so records of this archive may exist, pinned
        (ctr >= 2 labels them at creation) and never to be collected. Remove those this import
        created or changed — among the names it may create (``ours``), never another's."""
        with contextlib.suppress(UnlockError):
            self._remove(
                [
                    name
                    for name, (_kind, digest, _labels) in self._records().items()
                    if name in ours and before.get(name, ("", "", ""))[1] != digest
                ]
            )

    def _records(self) -> dict[str, tuple[str, str, str]]:
        """``{image name: (target media type, target digest, labels)}`` from ``ctr images ls``."""
        records: dict[str, tuple[str, str, str]] = {}
        for line in self._run("images", "ls").stdout.splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 3 and _DIGEST.match(fields[2]):
                records[fields[0]] = (fields[1], fields[2], fields[-1] if "=" in fields[-1] else "")
        return records

    def _config_digest(self, record: tuple[str, str, str] | None) -> str | None:
        if record is None:
            return None
        digest = record[1]
        if digest not in self._configs:  # content-addressed: what a digest names never changes
            found = self._config_of(digest, depth=0)
            if found is None:
                return None  # absent or unreadable now: ask again next time
            self._configs[digest] = found
        return self._configs[digest]

    def _config_of(self, digest: str, depth: int) -> str | None:
        """The config digest of a manifest, or of the node's platform's manifest in an index."""
        document = self._content(digest)
        if isinstance(document, dict) and isinstance(config := document.get("config"), dict):
            found = config.get("digest")
            return found if isinstance(found, str) and _DIGEST.match(found) else None
        manifests = document.get("manifests") if isinstance(document, dict) else None
        if depth or not isinstance(manifests, list):
            return None
        wanted = {"os": "linux", "architecture": _ARCH.get(platform.machine(), platform.machine())}
        for entry in manifests:
            target = entry.get("platform") if isinstance(entry, dict) else None
            if isinstance(target, dict) and all(target.get(k) == v for k, v in wanted.items()):
                child = entry.get("digest")
                if isinstance(child, str) and _DIGEST.match(child):
                    return self._config_of(child, depth + 1)
        return None

    def _content(self, digest: str) -> Any:
        done = self._run("content", "get", digest, check=False)
        if done.returncode != 0:
            if "not found" in done.stderr:
                return None
            raise self._failure(_last_line(done.stderr), load=False)
        try:
            return json.loads(done.stdout)
        except ValueError:
            return None


def _labels(text: str) -> dict[str, str]:
    """``ctr images ls``'s labels column (``k=v,k2=v2``) as a dict."""
    return dict(item.partition("=")[::2] for item in text.split(",") if "=" in item)


def _cri_image_ref(info: Any) -> str | None:
    """The image ID the CRI recorded for one of its containers (``ctr containers info``: the
    extension ``io.cri-containerd.container.metadata``, a JSON document, base64 in ctr's output)."""
    extensions = info.get("Extensions") if isinstance(info, dict) else None
    extension = extensions.get(CRI_METADATA) if isinstance(extensions, dict) else None
    value = extension.get("value") if isinstance(extension, dict) else None
    if not isinstance(value, str):
        return None
    try:
        document = json.loads(base64.b64decode(value))
    except ValueError:
        return None
    metadata = document.get("Metadata") if isinstance(document, dict) else None
    ref = metadata.get("ImageRef") if isinstance(metadata, dict) else None
    return ref if isinstance(ref, str) and _DIGEST.match(ref) else None


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:500] if lines else ""


def _close(stream: Iterator[bytes]) -> None:
    close = getattr(stream, "close", None)
    if callable(close):
        close()


def build(settings: Mapping[str, str | None], timeout: float | None) -> ContainerdRuntime:
    """The runtime registry's factory (runtimes/__init__.py)."""
    return ContainerdRuntime(
        settings.get("containerd_address") or DEFAULT_ADDRESS,
        settings.get("containerd_namespace") or DEFAULT_NAMESPACE,
        timeout or DEFAULT_TIMEOUT,
    )
