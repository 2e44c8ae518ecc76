"""Node-local state files (the agent's state directory), read as untrusted input: whoever can
put a file there must not make the agent hang (a FIFO), follow a link, or read a huge file.
Shared by the runtimes' ownership records, the agent's reclaim policies and the sealed keys.
"""

from __future__ import annotations

import logging
import os
import stat

log = logging.getLogger(__name__)

STATE_FILE_MAX = 4 * 1024 * 1024  # a state file holds names and policies: far below this


def read_state_file(path: str, what: str) -> bytes | None:
    """The bytes of the state file ``path`` (``what`` names it in the log); None when it does
    not exist, or when it is not a plain file this process wrote: a symlink (not followed), a
    FIFO or device (never blocked on), a file of another user or one others may write, or one
    over 4 MiB. Such a file counts as absent — the node then touches nothing, the safe
    direction — with one warning; it is left as it is."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None
    except OSError as exc:  # ELOOP: a symlink
        log.warning("%s %s not opened (%s): treating it as empty", what, path, exc.strerror or exc)
        return None
    try:
        problem = _unsafe(os.fstat(fd))
        if problem is None:
            chunks: list[bytes] = []
            size = 0
            while chunk := os.read(fd, STATE_FILE_MAX + 1 - size):
                chunks.append(chunk)
                size += len(chunk)
                if size > STATE_FILE_MAX:  # grown since the fstat
                    problem = f"larger than {STATE_FILE_MAX} bytes"
                    break
            else:
                return b"".join(chunks)
    except OSError as exc:
        problem = str(exc.strerror or exc)
    finally:
        os.close(fd)
    log.warning("%s %s is ignored (%s): treating it as empty", what, path, problem)
    return None


def _unsafe(info: os.stat_result) -> str | None:
    """Why a state file with this ``fstat`` is not to be read; None when it may be."""
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if info.st_uid != os.geteuid():
        return f"owned by uid {info.st_uid}, not {os.geteuid()}"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return "writable by group or others"
    if info.st_size > STATE_FILE_MAX:
        return f"larger than {STATE_FILE_MAX} bytes"
    return None
