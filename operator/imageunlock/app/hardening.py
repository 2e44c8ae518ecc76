"""Process hardening for the agent, which may keep keys in memory (spec.keyCacheSeconds).

``non_dumpable`` sets ``PR_SET_DUMPABLE`` to 0 (Linux, through libc's ``prctl``): no core
dump of the process, and ``/proc/<pid>/mem``, ``ptrace`` and ``process_vm_readv`` are refused
to every other process of the same user (only a process with ``CAP_SYS_PTRACE`` — root on the
node — can still read its memory: SECURITY.md states that trade).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3


def non_dumpable() -> bool:
    """Make this process non-dumpable; False (and a warning) where that is not possible."""
    if not sys.platform.startswith("linux"):
        log.warning("not on Linux: the agent process stays dumpable")
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")
    except OSError as exc:
        log.warning("the agent process could not be made non-dumpable: %s", exc)
        return False
    return bool(libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == 0)
