"""Adapter: a node-local record of which refs this node loaded, for which ImageUnlock.

For a runtime whose image records carry no labels of ours (the Docker Engine: an image's
labels are part of its config, fixed by the archive). One JSON file per Engine,
``<IMAGEUNLOCK_STATE_DIR>/owned-<runtime>-<hash of the Engine's ID>.json`` (default dir
``/var/lib/imageunlock-state``, a hostPath the DaemonSet mounts, so it survives a restart of the
agent): ``{"version": 1, "refs": {ref: {"owner": "<namespace>/<name>", "id": image ID}}}``.
Names and image IDs only — no key, no credential. Written atomically (a temporary file in
the same directory, fsync, rename, fsync of the directory), mode 0600 in a 0700 directory.
Callers hold the runtime's import lock (importlock.py) while they read and rewrite it, so
agent workers and CLI runs on the node take turns.

A file that cannot be read or parsed counts as empty: the node then forgets what it owns
and touches nothing (the safe direction), and says so in the log. It is read only when it is
a plain file of the agent's user that no one else may write, of at most 4 MiB, never through
a symlink (``read_state_file``); each record read back is checked as on write (an owner
``<namespace>/<name>``, a tagged image name, never an image ID): one that fails is dropped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping

from imageunlock.engine.models import is_owner
from imageunlock.engine.refs import is_tagged_ref
from imageunlock.engine.runtimes import DEFAULT_STATE_DIR, STATE_DIR_ENV, read_state_file, state_dir

log = logging.getLogger(__name__)
__all__ = ["DEFAULT_STATE_DIR", "STATE_DIR_ENV", "OwnedFile", "state_dir"]

VERSION = 1


class OwnedFile:
    """``{ref: (owner, image ID)}`` of one runtime instance, in ``directory``."""

    def __init__(self, directory: str, runtime: str, instance: str) -> None:
        key = hashlib.sha256(instance.encode()).hexdigest()[:24]
        self.directory = directory
        self.path = os.path.join(directory, f"owned-{runtime}-{key}.json")

    def read(self) -> dict[str, tuple[str, str]]:
        raw = read_state_file(self.path, "ownership record")
        if raw is None:
            return {}
        try:
            document = json.loads(raw)
        except ValueError as exc:
            log.warning("ownership record %s is unreadable (%s): treating it as empty", self.path, exc)
            return {}
        refs = document.get("refs") if isinstance(document, dict) else None
        if not isinstance(refs, dict):
            log.warning("ownership record %s has no refs: treating it as empty", self.path)
            return {}
        found: dict[str, tuple[str, str]] = {}
        for ref, entry in refs.items():
            if isinstance(entry, dict) and _valid(ref, entry.get("owner"), entry.get("id")):
                found[ref] = (entry["owner"], entry["id"])
        if dropped := len(refs) - len(found):
            log.warning("ownership record %s: %d malformed record(s) ignored", self.path, dropped)
        return found

    def write(self, entries: Mapping[str, tuple[str, str]]) -> None:
        document = {
            "version": VERSION,
            "refs": {ref: {"owner": owner, "id": image_id} for ref, (owner, image_id) in sorted(entries.items())},
        }
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".owned-", suffix=".tmp", dir=self.directory)  # mode 0600
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(document, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _valid(ref: str, owner: object, image_id: object) -> bool:
    """A record as :meth:`OwnedFile.write` makes one: a tagged ref, an ImageUnlock's owner."""
    return is_tagged_ref(ref) and is_owner(owner) and isinstance(image_id, str)
